"""Resumable checkpoints inside a stage's staging folder: one implementation for every stage.

A build writes its checkpoints under `<staging folder>/checkpoints/`, stamped with the stage's
fingerprint. TRL's trainers write `checkpoint-<step>/` (complete once `trainer_state.json`, written
last, exists); the RL driver writes `step-<iteration>/` (built as `step-<n>.tmp/` and renamed, so
complete once it exists with its `state.json`). A build resumes from the newest complete one written
under the same fingerprint; checkpoints of another config or other inputs are deleted, not resumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf.artifacts import CHECKPOINTS, METRICS, TENSORBOARD_DIR, atomic_write_text, truncate_metrics

COMPLETE_MARKERS = {"checkpoint": "trainer_state.json", "step": "state.json"}
"""Checkpoint folder prefix -> the file whose presence makes it complete."""
FINGERPRINT = "fingerprint"


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under `root`, oldest first (reads only)."""
    found = [
        folder for prefix, marker in COMPLETE_MARKERS.items() for folder in root.glob(f"{prefix}-*")
        if not folder.name.endswith(".tmp") and (folder / marker).is_file()
    ]  # fmt: skip
    return sorted(found, key=checkpoint_step)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, None if there is none (reads only)."""
    done = complete_checkpoints(root) if root.is_dir() else []
    return done[-1] if done else None


def same_fingerprint(root: Path, fingerprint: str) -> bool:
    stamp = root / FINGERPRINT
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == fingerprint


def resume_checkpoint(stage_dir: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint of an interrupted build of the staging folder `stage_dir` with
    the same fingerprint, else None. Checkpoints of another fingerprint and incomplete ones (a kill
    during a save) are deleted; the metrics log keeps the rows up to the checkpoint's step (a resumed
    build logs the later ones again), or is deleted with the TensorBoard logs when there is nothing to
    resume. Main process only."""
    root = stage_dir / CHECKPOINTS
    if root.is_dir() and not same_fingerprint(root, fingerprint):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / FINGERPRINT, fingerprint)
    complete = complete_checkpoints(root)
    for folder in root.iterdir():
        if folder.is_dir() and folder not in complete:
            shutil.rmtree(folder)
    if not complete:
        (stage_dir / METRICS).unlink(missing_ok=True)
        shutil.rmtree(stage_dir / TENSORBOARD_DIR, ignore_errors=True)
        return None
    truncate_metrics(stage_dir, checkpoint_step(complete[-1]))
    return complete[-1]
