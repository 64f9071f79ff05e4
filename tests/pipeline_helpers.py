"""Helpers shared by the tests that run tiny pipelines through the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

from rlhf.cli import main


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
