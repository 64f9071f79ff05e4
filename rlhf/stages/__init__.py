"""Stage recipes. Each module defines:

    def upstream(config) -> tuple[str, ...]   stages whose outputs it reads
    def inputs(config) -> list[str]    data files it reads (hashed into the fingerprint)
    def read_inputs(config)            reads and checks those files (and plug-ins) without any model:
                                       the pipeline calls it for every stage before any stage runs
    def run(ctx: StageContext) -> dict final metrics (kept in the manifest)

and reads its upstream stages' outputs only through the artifact directory (`ctx.upstream`).

A stage writes into `ctx.out_dir`, its staging folder `<run_dir>/.<stage>.building/`, never into
its complete folder `<run_dir>/<stage>/`: once `run` returns, the pipeline writes the manifest there
and swaps it in (`rlhf.artifacts.swap_in`). Until then the complete stage stays as it was, so a build
that fails (an error, a NaN, Ctrl-C) loses nothing, and an interrupted build resumes from the
checkpoints it saved in its staging folder.

A module with `DATA_PARALLEL = True` runs on every process of a torchrun / `accelerate launch` run
(each writing nothing but what the main process writes); the others run on the main process alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.artifacts import begin_build, building_dir, read_manifest
from rlhf.distributed import is_main_process
from rlhf.errors import ArtifactError, ConfigError


@dataclass
class StageContext:
    name: str
    config: Any
    """The stage's typed config (e.g. `rlhf.config.SFTConfig`)."""
    run_dir: Path
    seed: int
    fingerprint: str
    """Hash of config, inputs and upstream outputs: checkpoints from another fingerprint are not resumed."""
    source: str = ""
    """The pipeline YAML, named by errors about the stage's settings."""

    @property
    def out_dir(self) -> Path:
        """The staging folder this build writes into (swapped in for `<run_dir>/<stage>` once complete)."""
        return building_dir(self.run_dir, self.name)

    def upstream(self, stage: str) -> Path:
        """The output folder of a completed upstream stage."""
        folder = self.run_dir / stage
        manifest = read_manifest(folder)
        if manifest is None or manifest.get("status") != "complete":
            raise ArtifactError(f"{folder}: stage '{stage}' has not completed; run it first (rlhf run --only {stage})")
        return folder

    def setting_error(self, key: str, problem: str) -> ConfigError:
        """A setting that does not fit the upstream models, named as in the YAML."""
        return ConfigError(f"{self.source}: stages.{self.name}.{key}: {problem}")

    def begin(self) -> Path:
        """Called once the inputs are checked: the staging folder, emptied of all but an interrupted
        build's checkpoints and metrics (by the main process; the complete stage is not touched)."""
        if is_main_process():
            begin_build(self.run_dir, self.name)
        return self.out_dir


def stage_module(name: str):
    return importlib.import_module(f"rlhf.stages.{name}")
