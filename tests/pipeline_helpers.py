"""Helpers shared by the tests that run tiny pipelines through the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from rlhf.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_once(pipeline: Path, folder: Path) -> SimpleNamespace:
    """Run `pipeline` (whose run_dir is folder/run) and return its paths and stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", str(pipeline)])
    assert code == 0, err.getvalue()[-3000:]
    return SimpleNamespace(pipeline=str(pipeline), run_dir=folder / "run", folder=folder, out=out.getvalue())


def run(capsys, *args) -> tuple[int, str, str]:
    """`rlhf run ARGS` in-process: (exit code, stdout, stderr)."""
    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def clone(base, tmp_path: Path) -> Path:
    """A copy of a finished run directory to change without touching the shared one."""
    target = tmp_path / "run"
    shutil.copytree(base.run_dir, target)
    return target


def write_subsets(folder: Path, lines: dict[str, int]) -> None:
    """The first `lines[name]` lines of each data_samples/ file `name`, written into `folder`."""
    for name, count in lines.items():
        text = (ROOT / "data_samples" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:count]
        (folder / name).write_text("".join(text), encoding="utf-8")


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def add_trainer_callback(monkeypatch, callback) -> None:
    """Give every Trainer that a stage of this process trains `callback`, ahead of the stage's own."""
    import rlhf.training as training

    real = training.train

    def train(trainer, *args, **kwargs):
        trainer.add_callback(callback)
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "train", train)


# `rlhf ARGS` in a process that SIGKILLs itself at a Trainer callback event of a given step.
KILL_AT_STEP = """
import os, signal, sys
from transformers import TrainerCallback
import rlhf.training as training

step, event = int(os.environ["KILL_STEP"]), os.environ["KILL_EVENT"]

class Kill(TrainerCallback):
    pass

def kill(self, args, state, control, **kwargs):
    if state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)

setattr(Kill, event, kill)
real = training.train
def train(trainer, *args, **kwargs):
    trainer.add_callback(Kill())
    return real(trainer, *args, **kwargs)
training.train = train

from rlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(*args, step: int, event: str = "on_step_end") -> subprocess.CompletedProcess:
    """`rlhf run ARGS` in a subprocess killed with SIGKILL at `event` (a TrainerCallback method) of `step`."""
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP, "run", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KILL_STEP": str(step), "KILL_EVENT": event},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, f"not killed at {event} of step {step}: {killed.stderr[-3000:]}"
    return killed
