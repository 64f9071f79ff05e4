"""`rlhf status RUN_DIR [PIPELINE.yaml]`: where each stage of a run directory stands, at a glance.

Each stage is one of:

    complete    its manifest says so and every output still has its recorded sha256
    stale       complete, but the pipeline file would re-run it (its config, seed, inputs or an upstream
                stage changed), in the dry run's words
    corrupted   an output no longer matches its manifest's hash, or the manifest is unreadable
    partial     a build that did not finish (`.<stage>.building/`, or a folder without a complete
                manifest), with its last complete checkpoint
    not run     in the pipeline, but nothing of it in the run directory

Without a pipeline file, the stages found in RUN_DIR are judged against their own manifests only
(complete, corrupted or partial), and a complete stage whose upstream stages' outputs are no longer
those it was built on (the hashes its manifest records) is stale. The pipeline that the manifests
record is named, not used: its path was relative to wherever the run started, the file may have been
edited since, and command-line overrides are not recorded, so judging against it could call a stage
up to date that is not. With a pipeline file, every stage of it is listed in run order, and the
`next` column says what
`rlhf run PIPELINE.yaml --run-dir RUN_DIR` would do (the same decisions as `rlhf run --dry-run`:
`rlhf.pipeline.stage_decisions`). RUN_DIR always wins over the file's `run_dir`.

Status reads only (no lock, no folder) and imports no torch, so that it answers in well under two
seconds. It hashes the data files and outputs but does not parse the data or load plug-ins (the judge,
reward functions): `rlhf run --dry-run` makes those checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.artifacts import CHECKPOINTS, MANIFEST, RunLock, aside_dir, building_dir, complete_manifest, sha256_json, verify_outputs
from rlhf.checkpoints import newest_checkpoint
from rlhf.errors import ArtifactError, UserError
from rlhf.stages import STAGES, headline_metrics, stage_order

if TYPE_CHECKING:
    from rlhf.pipeline import Decision


@dataclass
class StageStatus:
    """One row of the status table."""

    stage: str
    status: str
    """complete, stale, corrupted, partial or not run (see the module docstring)."""
    reason: str
    notes: list[str] = field(default_factory=list)
    """What else the run directory holds of it: an interrupted rebuild or swap."""
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """The stage's headline metrics (`rlhf.stages.headline_metrics`) from its manifest."""
    next: str | None = None
    """What `rlhf run PIPELINE --run-dir RUN_DIR` would do with it: skip, run, or resume from a checkpoint;
    None without a pipeline file."""
    pipeline: str | None = None
    """The pipeline file its manifest records."""


@dataclass
class RunStatus:
    run_dir: str
    pipeline: str | None
    stages: list[StageStatus]
    lock: str | None = None
    """Who holds the run directory's lock (a run in progress), None if it is free."""
    stop: str | None = None
    """The error `rlhf run PIPELINE` would stop with before training, if any (only with a pipeline file)."""
    recorded_pipelines: list[str] = field(default_factory=list)
    """The pipeline files the manifests name (`pipeline`): a hint for which one to pass."""


def judge_stage(run_dir: Path, name: str, lock_held: bool) -> StageStatus | None:
    """Stage `name` judged against its own manifest; None if the run directory holds nothing of it."""
    folder, building = run_dir / name, building_dir(run_dir, name)
    try:
        manifest = complete_manifest(folder)
    except ArtifactError:  # not JSON: the run stops on it too
        return StageStatus(name, "corrupted", f"{folder / MANIFEST} is unreadable (not JSON)")
    notes = ["a swap was interrupted (the next run settles it)"] if aside_dir(run_dir, name).exists() else []
    if manifest is None:
        if not building.exists() and not folder.is_dir():
            old = aside_dir(run_dir, name).name
            return StageStatus(name, "partial", f"only {old}/ is left: a swap was interrupted; the next run puts it back") if notes else None
        staging = building if building.exists() else folder  # the folder a resumed build takes over (`begin_build`)
        doing = "a build in progress" if lock_held else "an interrupted build"
        return StageStatus(name, "partial", f"{doing} in {staging.name}/, {checkpoint_note(staging)}", notes=notes)
    if building.exists():
        doing = "being rebuilt (a run holds the lock)" if lock_held else "an interrupted rebuild"
        notes.append(f"{doing} in {building.name}/, {checkpoint_note(building)}")
    problem = verify_outputs(folder, manifest)
    changed = None if problem else changed_upstream(run_dir, manifest)
    status = "corrupted" if problem else "stale" if changed else "complete"
    return StageStatus(
        name, status, problem or changed or f"{len(manifest.get('outputs', {}))} outputs match their recorded sha256",
        notes=notes, started=manifest.get("started"), finished=manifest.get("finished"), seconds=manifest.get("seconds"),
        metrics=headline_metrics(name, manifest.get("metrics")), pipeline=manifest.get("pipeline"),
    )  # fmt: skip


def changed_upstream(run_dir: Path, manifest: dict) -> str | None:
    """Why a complete stage no longer follows from the upstream stages it was built on (their outputs'
    hashes, which its manifest records, differ from theirs now, or they are gone), else None."""
    for parent, recorded in sorted((manifest.get("upstream") or {}).items()):
        try:
            now = complete_manifest(run_dir / parent)
        except ArtifactError:
            now = None
        if now is None:
            return f"upstream stage '{parent}' is no longer complete in the run directory"
        if sha256_json(now.get("outputs")) != recorded:
            return f"upstream stage '{parent}' changed after it ran (its outputs are not those this stage was built on)"
    return None


def checkpoint_note(staging: Path) -> str:
    """The last complete checkpoint of a staging folder, as a resumed build would find it."""
    newest = newest_checkpoint(staging / CHECKPOINTS)
    return f"last complete checkpoint {newest.name}" if newest else "no complete checkpoint"


def run_status(run_dir: str | Path, pipeline: str | None = None) -> RunStatus:
    """Every stage's row, the lock's holder and, with a pipeline file, what `rlhf run` would do. Reads only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: {'not a directory' if run_dir.exists() else 'no such run directory'}")
    lock = RunLock(run_dir)
    holder = lock.holder()
    found = {name: judge_stage(run_dir, name, holder is not None) for name in STAGES}
    recorded = sorted({str(row.pipeline) for row in found.values() if row is not None and row.pipeline})
    status = RunStatus(str(run_dir), pipeline, [], lock.in_use(holder) if holder is not None else None, recorded_pipelines=recorded)
    if pipeline is None:
        status.stages = [row for row in found.values() if row is not None]
        return status

    from rlhf.config import load_pipeline
    from rlhf.pipeline import plan_checks, stage_decisions

    config = load_pipeline(pipeline, [], run_dir=str(run_dir))
    stages = stage_order(config)
    try:
        decisions = stage_decisions(config, stages, run_dir, forced=set())
        stop = plan_checks(config, stages, run_dir, forced=set())[1]
    except ArtifactError as error:  # an unreadable manifest: the run stops on it before deciding anything
        decisions, stop = {}, error
    status.stop = str(stop) if stop is not None else None
    for name in stages:
        row = found[name] or StageStatus(name, "not run", "never ran")
        decision = decisions.get(name)
        if decision is not None:
            if row.status == "complete" and decision.runs:
                row.status, row.reason = "stale", decision.why
            row.next = next_action(decision)
        status.stages.append(row)
    for name, row in found.items():  # what the run directory holds beyond the pipeline: the run leaves it alone
        if row is not None and name not in stages:
            row.next = "none (not in the pipeline)"
            status.stages.append(row)
    return status


def next_action(decision: Decision) -> str:
    """A `rlhf.pipeline.Decision` in a word or two: skip, run (from scratch, and why not resumed), or where it resumes."""
    if not decision.runs:
        return "skip"
    if decision.resume.startswith("resume"):
        return decision.resume
    return f"run; {decision.resume}" if decision.resume else "run"


def format_status(status: RunStatus) -> str:
    """The status as an aligned text table, with the lock, the run's stop error and a hint around it."""
    if status.pipeline:
        lines = [f"{status.run_dir} against {status.pipeline}"]
    else:
        lines = [f"{status.run_dir} (each stage against its own manifest)"]
    if not status.stages:
        lines.append("no stage has started here")
    else:
        header = ["stage", "status", "finished", "took", *(["next"] if status.pipeline else []), "headline metrics"]
        table = [header] + [
            [row.stage, row.status, short_time(row.finished), f"{row.seconds:.1f} s" if row.seconds is not None else "",
             *([row.next or ""] if status.pipeline else []), format_metrics(row.metrics)]
            for row in status.stages
        ]  # fmt: skip
        widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in table]
        # Why, for every stage that is not simply complete (a complete one's outputs all match their hashes).
        why = [f"  {row.stage}: {'; '.join([row.reason, *row.notes])}" for row in status.stages if row.status != "complete" or row.notes]
        lines += ["why:", *why] if why else []
    if status.lock:
        lines.append(f"lock: {status.lock}")
    elif status.stop:
        lines.append(f"rlhf run would stop: {status.stop}")
    if not status.pipeline and status.recorded_pipelines:
        lines.append(
            f"recorded pipeline: {', '.join(status.recorded_pipelines)}; to see what is stale and what `rlhf run` "
            f"would do: rlhf status {status.run_dir} {status.recorded_pipelines[0]}"
        )
    return "\n".join(lines)


def short_time(stamp: str | None) -> str:
    """'2026-12-04T23:08:53+00:00' as '2026-12-04 23:08' (the manifest keeps the full time)."""
    return stamp[:16].replace("T", " ") if stamp else ""


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in metrics.items())


def status_json(status: RunStatus) -> str:
    return json.dumps(asdict(status), indent=1)
