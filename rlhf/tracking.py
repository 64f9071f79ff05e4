"""Experiment trackers (a stage's `report_to`): TensorBoard, Trackio, Weights & Biases and MLflow, through
accelerate's tracker classes, so that the Trainer stages (through the `Trackers` callback) and the RL
driver (through its `Accelerator`) report the same way.

Naming: TensorBoard writes into the stage's own folder, `<stage>/tensorboard/` (kept with its metrics
through a resume, discarded with them when a build starts over; `tensorboard --logdir <run_dir>` shows
every stage). The other trackers log to project `<run_dir's name>`, run `<stage>`. Each run gets the
stage's resolved config (`hyperparameters`), flattened to dotted keys. A resumed build's TensorBoard log
drops the steps after its checkpoint before logging them again (`purge_step`).

Each tracker is an optional extra (`pip install -e ".[tensorboard]"`); a stage that names one that is
not installed is refused before anything runs (`check_installed`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

from rlhf.artifacts import TENSORBOARD_DIR
from rlhf.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name (`rlhf.config.TRACKERS`) -> the module it needs (installed by the extra of the same name)."""


def check_installed(names: list[str], where: str) -> None:
    """Refuse a tracker whose package is missing, naming the extra that installs it."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"{where}: report_to: {name} is not installed; install it with: pip install \"rlhf[{name}]\"")


def project_name(run_dir: Path) -> str:
    """The trackers' project: the run directory's name (runs/demo -> demo)."""
    return Path(run_dir).resolve().name


def hyperparameters(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat `{dotted.key: value}` of the types every tracker takes (bool, int, float, str):
    lists and None become text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (step and time left out: the step is the axis)."""
    return {key: value for key, value in row.items() if key not in ("step", "time") and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}  # fmt: skip


def make_trackers(names: list[str], run_dir: Path, stage: str, stage_dir: Path, resume_step: int = 0) -> list:
    """accelerate trackers for `names`, not yet started."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker, on_main_process

    class Trackio(TrackioTracker):
        @on_main_process
        def finish(self):  # trackio.finish() also forgets the run, which trackio would otherwise finish again at exit
            import trackio

            trackio.finish()

    project = project_name(run_dir)
    build = {
        "tensorboard": lambda: TensorBoardTracker(TENSORBOARD_DIR, stage_dir),
        "trackio": lambda: Trackio(project, name=stage),
        "wandb": lambda: WandBTracker(project, name=stage),
        "mlflow": lambda: MLflowTracker(experiment_name=project, run_name=stage),
    }
    trackers = [build[name]() for name in names]
    resume_at(trackers, resume_step)
    return trackers


def resume_at(trackers: list, step: int) -> None:
    """Before the trackers start: a build resumed from the checkpoint of `step` logs the steps after it again,
    so TensorBoard discards the ones an interrupted build had logged past it."""
    for tracker in trackers:
        if tracker.name == "tensorboard" and step:
            tracker.init_kwargs["purge_step"] = step + 1


@contextlib.contextmanager
def quietly():
    """Trackers print banners (how to open a dashboard, upload notices) on stdout: keep them off the console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def start(trackers: list, config: dict) -> None:
    """Start each tracker's run and record the resolved config as its hyperparameters."""
    with quietly():
        for tracker in trackers:
            tracker.start()
            tracker.store_init_configuration(hyperparameters(config))


def log(trackers: list, row: dict, step: int) -> None:
    values = scalars(row)
    if values:
        for tracker in trackers:
            tracker.log(values, step=step)


def finish(trackers: list) -> None:
    with quietly():
        for tracker in trackers:
            tracker.finish()


def announce(ctx) -> None:
    """One line saying where stage `ctx`'s curves go, if it reports anywhere."""
    from rlhf.console import say

    names, run_dir = ctx.config.report_to, ctx.run_dir
    if not names:
        return
    places = {"tensorboard": f"tensorboard --logdir {run_dir}", "trackio": f"trackio show --project {project_name(run_dir)}"}
    say(ctx.name, "curves to " + "; ".join(f"{name} ({places.get(name, f'project {project_name(run_dir)}, run {ctx.name}')})"
                                           for name in names))  # fmt: skip


def stage_config(ctx) -> dict:
    """What a stage's run records as hyperparameters: its resolved config, the seed and the fingerprint."""
    from rlhf.config import stage_config_dict

    return {"stage": ctx.name, "seed": ctx.seed, "fingerprint": ctx.fingerprint, **stage_config_dict(ctx.config)}

