"""Run a pipeline's stages through one artifact directory, each after the stages it reads
(`rlhf.stages.stage_order`), skipping what is up to date.

A stage's fingerprint hashes its resolved config, the sha256 of its input files, the seed and its
upstream stages' output hashes. A stage whose complete manifest records the same fingerprint,
and whose outputs still match their hashes, is skipped; when an upstream stage's outputs change,
every stage downstream of it runs again.

A stage that runs is built beside its complete folder, in `<run_dir>/.<stage>.building/`; once it
returns and its weights are finite, its manifest is written there and the folder is swapped in for
the old one (`finish_stage`). A stage that fails leaves the old one complete and loadable, and the
next unchanged run skips it; an interrupted build resumes from its staging folder's checkpoints.

`describe_plan` (`rlhf run --dry-run`) says what a run would do and why, and every check's verdict,
without writing anything.

Under torchrun or `accelerate launch` every process runs the pipeline; the main process alone
writes to the run directory (see `run_pipeline`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Collection, NamedTuple

import yaml

from rlhf.artifacts import (
    CHECKPOINTS, RunLock, aside_dir, building_dir, complete_manifest, is_complete, nonfinite_weights, now, plain,
    read_manifest, recover_swap, sha256_file, sha256_json, swap_in, verify_outputs, write_manifest,
)  # fmt: skip
from rlhf.config import PipelineConfig, fingerprinted_config, stage_config_dict
from rlhf.console import say
from rlhf.distributed import is_main_process, on_main
from rlhf.errors import ArtifactError, ConfigError, DataError, TrainingDiverged, UserError
from rlhf.model_card import command_line, write_card
from rlhf.stages import STAGES, StageContext, stage_module, stage_order
from rlhf.tracking import check_installed


def plan(config: PipelineConfig, only: str | None = None, start: str | None = None) -> list[str]:
    """The stages to consider, each after the upstream stages it reads (`rlhf.stages.stage_order`); `--from`
    starts at a stage of that order."""
    stages = stage_order(config)
    for flag, name in (("--only", only), ("--from", start)):
        if name is not None and name not in stages:
            raise ConfigError(f"{flag} {name}: not a stage of {config.source} (it has {', '.join(stages)})")
    if only:
        return [only]
    if start:
        return stages[stages.index(start) :]
    return stages


def input_hashes(files: list[str]) -> dict[str, str]:
    hashes = {}
    for name in files:
        path = Path(name)
        if path.is_dir():
            hashes[name] = sha256_json({p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
        elif path.is_file():
            hashes[name] = sha256_file(path)
        else:
            raise DataError(f"{path}: file not found")
    return hashes


def fingerprint(config: PipelineConfig, name: str, run_dir: Path) -> tuple[str, dict]:
    """(fingerprint, the facts it hashes) for stage `name`."""
    module = stage_module(name)
    upstream = {}
    for parent in module.upstream(config.stages[name]):
        manifest = complete_manifest(run_dir / parent)
        upstream[parent] = sha256_json(manifest.get("outputs")) if manifest else None
    facts = {
        "config": fingerprinted_config(config.stages[name]),
        "seed": config.seed,
        "inputs": input_hashes(module.inputs(config.stages[name])),
        "upstream": upstream,
    }
    return sha256_json(facts), facts


def missing_upstream(run_dir: Path, parent: str) -> ArtifactError:
    return ArtifactError(f"{run_dir / parent}: upstream stage '{parent}' has not completed; run it first")


def check_inputs(config: PipelineConfig, stages: list[str], run_dir: Path) -> None:
    """Bad input fails here, before anything is written (not even the run directory): every planned
    stage's trackers, data files and plug-ins, and the upstream stages that the plan does not run."""
    for name in stages:
        module = stage_module(name)
        check_installed(getattr(config.stages[name], "report_to", []), f"{config.source}: stages.{name}")
        try:
            module.read_inputs(config.stages[name])
        except ConfigError as error:
            raise ConfigError(f"{config.source}: stages.{name}: {error}") from None
        for parent in module.upstream(config.stages[name]):
            # (a stage that a crash left in .<stage>.old is put back by `recover_swap`, under the lock)
            if parent not in stages and not (is_complete(run_dir / parent) or is_complete(aside_dir(run_dir, parent))):
                # another run may be rebuilding it right now: then the directory is busy, not incomplete
                lock = RunLock(run_dir)
                holder = lock.holder()
                raise ArtifactError(lock.in_use(holder)) if holder is not None else missing_upstream(run_dir, parent)


def output_verdicts(run_dir: Path, forced: set[str]) -> dict[str, str | None]:
    """Stage -> None if the outputs its complete manifest records still have their hashes, else the
    problem; for every complete stage of `run_dir` that is not forced."""
    verdicts = {}
    for name in STAGES:
        manifest = complete_manifest(run_dir / name)
        if name in forced or manifest is None:
            continue
        verdicts[name] = verify_outputs(run_dir / name, manifest)
    return verdicts


def artifact_error(name: str, problem: str) -> ArtifactError:
    return ArtifactError(f"stage '{name}': {problem}; re-run it with: rlhf run ... --from {name}")


def check_artifacts(run_dir: Path, stages: list[str], forced: set[str]) -> None:
    """Stop before any training if a completed stage's outputs no longer match its manifest."""
    for name, problem in output_verdicts(run_dir, forced).items():
        if problem:
            raise artifact_error(name, problem)


def forced_stages(stages: list[str], start: str | None, force: bool) -> set[str]:
    """The planned stages that run whether or not they are up to date (--force, or --from)."""
    return set(stages) if force or start else set()


def next_run(config: PipelineConfig, name: str, run_dir: Path, forced: set[str]) -> tuple[str, dict] | None:
    """(fingerprint, the facts it hashes) if stage `name` must run; None, saying so, if it is up to date."""
    stage_fingerprint, facts = fingerprint(config, name, run_dir)
    manifest = complete_manifest(run_dir / name)
    if name not in forced and manifest and manifest.get("fingerprint") == stage_fingerprint:
        say(name, f"up to date, skipped (finished {manifest.get('finished')})", quiet_too=True)
        return None
    missing = [parent for parent, outputs in facts["upstream"].items() if outputs is None]
    if missing:
        raise missing_upstream(run_dir, missing[0])
    return stage_fingerprint, facts


def finish_stage(run_dir: Path, name: str, manifest: dict) -> None:
    """Mark the staging folder of stage `name` complete and swap it in, unless its weights hold a NaN or inf.
    Its model card (`rlhf.model_card`) is written just before the manifest, so a complete stage has one."""
    building = building_dir(run_dir, name)
    problem = nonfinite_weights(building)
    if problem:
        raise TrainingDiverged(f"{name}: {problem}; not marked complete (the previous {name} output, if any, is kept)")
    write_card(building, name, manifest, command_line(manifest["pipeline"], name))
    write_manifest(building, manifest)
    swap_in(run_dir, name)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """The run directory's lock, taken by the main process for all of them."""
    lock = RunLock(run_dir)
    on_main(lock.acquire)
    try:
        yield
    finally:
        if is_main_process():
            lock.release()


def run_pipeline(config: PipelineConfig, only: str | None = None, start: str | None = None, force: bool = False) -> None:
    """Run the planned stages in order. Under torchrun or `accelerate launch` every process calls this:
    the main one checks the inputs, takes the lock, decides what runs, writes every manifest and swaps
    each built stage in (its decisions and errors reach the others through `on_main`, the others
    waiting); data-parallel stages (`DATA_PARALLEL = True` in their module) run on every process, the
    others on the main one while the rest wait."""
    run_dir = Path(config.run_dir)
    stages = plan(config, only, start)
    forced = forced_stages(stages, start, force)
    on_main(lambda: check_inputs(config, stages, run_dir))
    with run_lock(run_dir):
        on_main(lambda: [recover_swap(run_dir, name) for name in STAGES])
        on_main(lambda: check_artifacts(run_dir, stages, forced))
        for name in stages:
            decision = on_main(lambda: next_run(config, name, run_dir, forced))
            if decision is None:
                continue
            stage_fingerprint, facts = decision
            say(name, "running", quiet_too=True)
            started, clock = now(), time.perf_counter()
            context = StageContext(name, config.stages[name], run_dir, config.seed, stage_fingerprint, source=config.source)
            module = stage_module(name)
            metrics = module.run(context) if getattr(module, "DATA_PARALLEL", False) else on_main(lambda: module.run(context))
            seconds = time.perf_counter() - clock
            on_main(lambda: finish_stage(
                run_dir, name,
                {"stage": name, "fingerprint": stage_fingerprint, **facts, "started": started,
                 "seconds": round(seconds, 1), "metrics": metrics, "pipeline": config.source},
            ))  # fmt: skip
            say(name, f"done in {seconds:.1f} s", quiet_too=True)


# ----------------------------------------------------------------------------- the dry run


def describe_plan(
    config: PipelineConfig, only: str | None = None, start: str | None = None, force: bool = False
) -> tuple[list[str], UserError | None]:
    """What `run_pipeline` would do, writing nothing (not even the run directory or its lock): the lines to
    print (each planned stage's resolved config, its decision and why, every check's verdict), and the error
    the run would stop with (None if it would go ahead). Bad input raises here, as it does for the run."""
    run_dir = Path(config.run_dir)
    stages = plan(config, only, start)
    forced = forced_stages(stages, start, force)
    check_inputs(config, stages, run_dir)

    # 1. The resolved config: the values after extends, overrides and defaults.
    stage_configs = {name: plain(stage_config_dict(config.stages[name])) for name in stages}
    resolved = {"run_dir": config.run_dir, "seed": config.seed, "stages": stage_configs}
    lines = [f"dry run of {config.source} (nothing is written)", "", "resolved config:"]
    lines += ["  " + line for line in yaml.safe_dump(resolved, sort_keys=False).splitlines()]

    # 2. The plan: what runs and why. A stage whose upstream runs first is judged against that too.
    lines += ["", f"plan for {run_dir}:"]
    lines += [f"  {name}: {decision}" for name, decision in stage_decisions(config, stages, run_dir, forced, start).items()]

    # 3. The checks the run makes before training, in its order: inputs, lock, interrupted swaps, recorded outputs.
    check_lines, error = plan_checks(config, stages, run_dir, forced)
    lines += ["", "checks:", *check_lines, "", f"the run would stop: {error}" if error else "every check passed"]
    return lines, error


class Decision(NamedTuple):
    """What a run would do with one planned stage, and why, as the dry run words it."""

    runs: bool
    why: str
    """For a skip, 'up to date (finished ...)'; for a run, its reasons, or the upstream stages that run first."""
    resume: str = ""
    """Where a build would start ('resume from checkpoint step 40 in .sft.building/', 'from scratch (...)'), or ''."""

    def __str__(self) -> str:
        return f"{'run' if self.runs else 'skip'}: {self.why}" + (f"; {self.resume}" if self.resume else "")


def stage_decisions(
    config: PipelineConfig, stages: list[str], run_dir: Path, forced: set[str], start: str | None = None
) -> dict[str, Decision]:
    """Planned stage -> what `run_pipeline` would do with it (writing nothing). A stage whose upstream runs
    first runs too, unless that upstream's outputs come out identical (the run re-judges it then)."""
    decisions: dict[str, Decision] = {}
    rebuilt: dict[str, tuple[str, str]] = {}  # stage that runs -> (the stage whose change causes it, what changed)
    for name in stages:
        reasons, stage_fingerprint = run_reasons(config, name, run_dir, forced, start, rebuilt)
        first = [parent for parent in stage_module(name).upstream(config.stages[name]) if parent in rebuilt]
        if not reasons and not first:
            decisions[name] = Decision(False, f"up to date (finished {read_manifest(run_dir / name).get('finished')})")
            continue
        rebuilt[name] = (name, "; ".join(reasons)) if reasons else rebuilt[first[0]]
        causes: dict[str, list[str]] = {}
        for parent in first:
            causes.setdefault("{}: {}".format(*rebuilt[parent]), []).append(parent)
        because = [f"upstream {', '.join(ps)} {'runs' if len(ps) == 1 else 'run'} first ({cause})" for cause, ps in causes.items()]
        unless = "" if reasons else f" (skipped after all if the outputs of {', '.join(first)} come out identical)"
        resume = "" if first else resume_note(run_dir, name, stage_fingerprint)
        decisions[name] = Decision(True, "; ".join(reasons or because) + unless, resume)
    return decisions


def plan_checks(config: PipelineConfig, stages: list[str], run_dir: Path, forced: set[str]) -> tuple[list[str], UserError | None]:
    """The verdict of each check the run makes before training (inputs, lock, interrupted swaps, recorded
    outputs), and the error it would stop with (None if none). Reads only; `check_inputs` has already passed."""
    lines = []
    for name in stages:
        module = stage_module(name)
        files = ", ".join(module.inputs(config.stages[name])) or "no data files"
        lines.append(f"  {name}: inputs read and checked: {files}")
        for parent in module.upstream(config.stages[name]):
            state = "planned before it" if parent in stages else f"complete in {run_dir / parent}"
            lines.append(f"  {name}: upstream {parent}: {state}")
    error: UserError | None = None
    lock = RunLock(run_dir)
    holder = lock.holder() if run_dir.is_dir() else None
    if holder is not None:
        error = ArtifactError(lock.in_use(holder))
        lines.append(f"  lock: FAILED: {error}")
    else:
        lines.append(f"  lock: {run_dir} is free" if run_dir.is_dir() else f"  lock: {run_dir} does not exist yet (the run creates it)")
    for name in STAGES:
        if aside_dir(run_dir, name).exists() or is_complete(building_dir(run_dir, name)):
            lines.append(f"  {name}: a swap was interrupted; the run settles it first (recover_swap), which this plan does not foresee")
    for name, problem in output_verdicts(run_dir, forced).items():
        if problem:
            error = error or artifact_error(name, problem)
            lines.append(f"  {name}: outputs: FAILED: {artifact_error(name, problem)}")
        else:
            lines.append(f"  {name}: outputs: {len(read_manifest(run_dir / name).get('outputs', {}))} files match their recorded sha256")
    return lines, error


def changed_keys(recorded: Any, current: Any, where: str = "") -> list[str]:
    """The dotted keys whose values differ between a recorded config and the current one, old -> new."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        keys = []
        for key in sorted({*recorded, *current}, key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in recorded:
                keys.append(f"{path} (not recorded) -> {current[key]!r}")
            elif key not in current:
                keys.append(f"{path} {recorded[key]!r} -> (gone)")
            else:
                keys += changed_keys(recorded[key], current[key], path)
        return keys
    return [] if recorded == current else [f"{where} {recorded!r} -> {current!r}"]


def run_reasons(
    config: PipelineConfig, name: str, run_dir: Path, forced: set[str], start: str | None, rebuilt: Collection[str]
) -> tuple[list[str], str]:
    """(why stage `name` must run, as against its manifest: [] if up to date; its fingerprint now). An upstream
    stage in `rebuilt` (planned to run before it) is left for the caller to name."""
    stage_fingerprint, facts = fingerprint(config, name, run_dir)
    manifest = complete_manifest(run_dir / name)
    reasons = [f"forced ({'--from ' + start if start else '--force'})"] if name in forced else []
    if not manifest:
        started = (run_dir / name).exists() or building_dir(run_dir, name).exists()
        return reasons + ["never completed (an interrupted or failed build)" if started else "never ran"], stage_fingerprint
    if manifest.get("fingerprint") == stage_fingerprint:
        return reasons, stage_fingerprint
    changes = changed_keys(manifest.get("config"), plain(facts["config"]))
    if changes:
        reasons.append("config changed: " + ", ".join(changes))
    if manifest.get("seed") != facts["seed"]:
        reasons.append(f"seed changed: {manifest.get('seed')!r} -> {facts['seed']!r}")
    recorded_inputs = manifest.get("inputs") or {}
    files = [
        f"{name} ({'new' if name not in recorded_inputs else 'no longer read' if name not in facts['inputs'] else 'contents differ'})"
        for name in {**recorded_inputs, **facts["inputs"]} if recorded_inputs.get(name) != facts["inputs"].get(name)
    ]  # fmt: skip
    if files:
        reasons.append("inputs changed: " + ", ".join(files))
    recorded_upstream = manifest.get("upstream") or {}
    changed = [parent for parent, outputs in facts["upstream"].items() if recorded_upstream.get(parent) != outputs]
    reasons += [f"upstream {parent} changed" for parent in changed if parent not in rebuilt]  # else: it runs first, said by the caller
    if not reasons and not changed:
        reasons.append("fingerprint differs from the manifest's (recorded by another version?)")
    return reasons, stage_fingerprint


def resume_note(run_dir: Path, name: str, stage_fingerprint: str) -> str:
    """Where a build of stage `name` would start: from the last complete checkpoint of an interrupted build
    with the same fingerprint (as `rlhf.checkpoints.resume_checkpoint` chooses, without deleting anything)."""
    from rlhf.checkpoints import complete_checkpoints, same_fingerprint

    building, final = building_dir(run_dir, name), run_dir / name
    staging = building if building.exists() else final if final.is_dir() and not is_complete(final) else None  # as `begin_build`
    root = staging / CHECKPOINTS if staging else None
    if root is None or not root.is_dir():
        return ""
    if not same_fingerprint(root, stage_fingerprint):
        return f"from scratch (the checkpoints in {root} are of another config or inputs and are deleted)"
    done = complete_checkpoints(root)
    return f"resume from checkpoint step {done[-1].name.split('-')[1]} in {staging.name}/" if done else "from scratch (no complete checkpoint)"
