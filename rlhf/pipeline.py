"""Run a pipeline's stages in order through one artifact directory, skipping what is up to date.

A stage's fingerprint hashes its resolved config, the sha256 of its input files, the seed and its
upstream stages' output hashes. A stage whose complete manifest records the same fingerprint,
and whose outputs still match their hashes, is skipped; when an upstream stage's outputs change,
every stage downstream of it runs again.

A stage that runs is built beside its complete folder, in `<run_dir>/.<stage>.building/`; once it
returns and its weights are finite, its manifest is written there and the folder is swapped in for
the old one (`finish_stage`). A stage that fails leaves the old one complete and loadable, and the
next unchanged run skips it; an interrupted build resumes from its staging folder's checkpoints.

Under torchrun or `accelerate launch` every process runs the pipeline; the main process alone
writes to the run directory (see `run_pipeline`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rlhf.artifacts import (
    RunLock, aside_dir, building_dir, is_complete, nonfinite_weights, now, read_manifest, recover_swap, sha256_file,
    sha256_json, swap_in, verify_outputs, write_manifest,
)  # fmt: skip
from rlhf.config import STAGE_ORDER, PipelineConfig, stage_config_dict
from rlhf.distributed import is_main_process, on_main
from rlhf.errors import ArtifactError, ConfigError, DataError, TrainingDiverged
from rlhf.stages import StageContext, stage_module


def plan(config: PipelineConfig, only: str | None = None, start: str | None = None) -> list[str]:
    """The stages to consider, in order."""
    stages = [name for name in STAGE_ORDER if name in config.stages]
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
        manifest = read_manifest(run_dir / parent)
        upstream[parent] = sha256_json(manifest.get("outputs")) if manifest and manifest.get("status") == "complete" else None
    facts = {
        "config": stage_config_dict(config.stages[name]),
        "seed": config.seed,
        "inputs": input_hashes(module.inputs(config.stages[name])),
        "upstream": upstream,
    }
    return sha256_json(facts), facts


def missing_upstream(run_dir: Path, parent: str) -> ArtifactError:
    return ArtifactError(f"{run_dir / parent}: upstream stage '{parent}' has not completed; run it first")


def check_inputs(config: PipelineConfig, stages: list[str], run_dir: Path) -> None:
    """Bad input fails here, before anything is written (not even the run directory): every planned
    stage's data files and plug-ins, and the upstream stages that the plan does not run."""
    for name in stages:
        module = stage_module(name)
        try:
            module.read_inputs(config.stages[name])
        except ConfigError as error:
            raise ConfigError(f"{config.source}: stages.{name}: {error}") from None
        for parent in module.upstream(config.stages[name]):
            # (a stage that a crash left in .<stage>.old is put back by `recover_swap`, under the lock)
            if parent not in stages and not (is_complete(run_dir / parent) or is_complete(aside_dir(run_dir, parent))):
                # another run may be rebuilding it right now: then the directory is busy, not incomplete
                raise RunLock(run_dir).in_use() or missing_upstream(run_dir, parent)


def check_artifacts(run_dir: Path, stages: list[str], forced: set[str]) -> None:
    """Stop before any training if a completed stage's outputs no longer match its manifest."""
    for name in STAGE_ORDER:
        manifest = read_manifest(run_dir / name)
        if name in forced or manifest is None or manifest.get("status") != "complete":
            continue
        problem = verify_outputs(run_dir / name, manifest)
        if problem:
            raise ArtifactError(f"stage '{name}': {problem}; re-run it with: rlhf run ... --from {name}")


def next_run(config: PipelineConfig, name: str, run_dir: Path, forced: set[str]) -> tuple[str, dict] | None:
    """(fingerprint, the facts it hashes) if stage `name` must run; None, saying so, if it is up to date."""
    stage_fingerprint, facts = fingerprint(config, name, run_dir)
    manifest = read_manifest(run_dir / name)
    if name not in forced and manifest and manifest.get("status") == "complete" and manifest.get("fingerprint") == stage_fingerprint:
        print(f"[{name}] up to date, skipped (finished {manifest.get('finished')})")
        return None
    missing = [parent for parent, outputs in facts["upstream"].items() if outputs is None]
    if missing:
        raise missing_upstream(run_dir, missing[0])
    return stage_fingerprint, facts


def finish_stage(run_dir: Path, name: str, manifest: dict) -> None:
    """Mark the staging folder of stage `name` complete and swap it in, unless its weights hold a NaN or inf."""
    building = building_dir(run_dir, name)
    problem = nonfinite_weights(building)
    if problem:
        raise TrainingDiverged(f"{name}: {problem}; not marked complete (the previous {name} output, if any, is kept)")
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
    forced = set(stages) if force else ({*stages} if start else set())
    on_main(lambda: check_inputs(config, stages, run_dir))
    with run_lock(run_dir):
        on_main(lambda: [recover_swap(run_dir, name) for name in STAGE_ORDER])
        on_main(lambda: check_artifacts(run_dir, stages, forced))
        for name in stages:
            decision = on_main(lambda: next_run(config, name, run_dir, forced))
            if decision is None:
                continue
            stage_fingerprint, facts = decision
            print(f"[{name}] running")
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
            print(f"[{name}] done in {seconds:.1f} s")
