"""Stage recipes. Each module defines:

    def upstream(config) -> tuple[str, ...]   stages whose outputs it reads
    def inputs(config) -> list[str]    data files it reads (hashed into the fingerprint)
    def read_inputs(config)            reads and checks those files (and plug-ins) without any model:
                                       the pipeline calls it for every stage before any stage runs
    def run(ctx: StageContext) -> dict final metrics (kept in the manifest)

and reads its upstream stages' outputs only through the artifact directory (`ctx.upstream`).
A module with `DATA_PARALLEL = True` runs on every process of a torchrun / `accelerate launch` run
(each writing nothing but what the main process writes); the others run on the main process alone.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.artifacts import invalidate, read_manifest
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
    fresh: bool = False
    """Re-running a stage that had completed (--force, --from): its checkpoints are discarded, not resumed."""
    source: str = ""
    """The pipeline YAML, named by errors about the stage's settings."""

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.name

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
        """Called once the inputs are checked: from here the stage's old outputs are replaced."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            invalidate(self.out_dir)
        return self.out_dir


def stage_module(name: str):
    return importlib.import_module(f"rlhf.stages.{name}")
