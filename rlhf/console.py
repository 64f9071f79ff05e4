"""What `rlhf` prints, in one place: stage-prefixed lines of ours, one line per logged step, warnings on
one line each, and the libraries quiet.

Three levels (`rlhf run -q` / default / `-v`):

    quiet    each stage's start and end, the results it ends with, warnings and errors
    normal   also what each stage reads and sets up, a line for every fifth of its steps, and a progress
             bar while a terminal is attached (redrawn in place; none in a log file)
    verbose  a line for every logged step, and the libraries' own logs, warnings and progress bars

Every logged row still goes to the stage's metrics.jsonl (and its trackers) whatever the level.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

QUIET, NORMAL, VERBOSE = 0, 1, 2
LINES_PER_STAGE = 5
"""Step lines a stage prints at the normal level: one as each fifth of its steps is logged."""

level = NORMAL
"""The level `configure` set."""

SHOWN = {
    "loss": "loss", "mean_token_accuracy": "acc", "accuracy": "acc", "margin": "margin",
    "rewards/accuracies": "acc", "rewards/margins": "margin",
    "eval_loss": "eval_loss", "eval_mean_token_accuracy": "eval_acc", "eval_accuracy": "eval_acc", "eval_margin": "eval_margin",
    "score": "score", "judge": "judge", "kl": "kl", "beta": "beta",
    "grad_norm": "grad_norm", "learning_rate": "lr", "lr": "lr",
}  # fmt: skip
"""Metric -> its name in a step line, in the order shown (metrics.jsonl keeps every metric)."""


def configure(verbosity: int) -> None:
    """Set the level, and quiet the libraries below `VERBOSE`: transformers' and datasets' logs (their load
    reports, the tied-head notice on resume), datasets' progress bars. Call it before they are imported;
    if they already are, their own switches are used too."""
    global level
    level = verbosity
    warnings.showwarning = show_warning
    if verbosity >= VERBOSE:
        return
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["DATASETS_VERBOSITY"] = "error"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # (`python -m rlhf.cli` imports it first, through `import rlhf`)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, without the source line Python prints under it."""
    print(f"warning: {message} ({category.__name__})", file=file or sys.stderr, flush=True)


def say(stage: str, text: str, quiet_too: bool = False) -> None:
    """Print `[stage] text` (not at the quiet level unless `quiet_too`): above a progress bar if one is drawn."""
    if level > QUIET or quiet_too:
        from tqdm import tqdm

        tqdm.write(f"[{stage}] {text}")
        sys.stdout.flush()


def progress_bar(desc: str, total: int | None = None, iterable=None, initial: int = 0, unit: str = "step", disable: bool = False):
    """A progress bar on a terminal at the normal and verbose levels, erased when done (the lines printed stay);
    none in a log file or a pipe."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=disable or level == QUIET or not sys.stderr.isatty())  # fmt: skip


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.2e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4g}"


def step_line(row: dict, total: int, unit: str = "step") -> str:
    """`step 250/1248  loss 1.098  acc 0.638  lr 9.80e-04  grad_norm 1.56`: the metrics of `SHOWN` a row has."""
    width = len(str(total))
    shown = [f"{SHOWN[key]} {number(row[key])}" for key in SHOWN if key in row]
    return f"{unit} {row.get('step', 0):>{width}}/{total}  " + "  ".join(shown)


class StepLines:
    """Decides which logged rows of a stage become console lines: at the verbose level every one, at the
    normal level the first row at or past each fifth of the steps (and every evaluation), at the quiet level none."""

    def __init__(self, stage: str, total: int, unit: str = "step"):
        self.stage, self.total, self.unit = stage, max(total, 1), unit
        self.next_mark = self.total / LINES_PER_STAGE

    def log(self, row: dict) -> None:
        step = row.get("step", 0)
        evaluation = any(key.startswith("eval_") for key in row)
        if level == QUIET or not any(key in row for key in SHOWN):
            return
        if level == NORMAL and not evaluation:
            if step < self.next_mark:
                return
            self.next_mark = (step * LINES_PER_STAGE // self.total + 1) * self.total / LINES_PER_STAGE
        say(self.stage, step_line(row, self.total, self.unit))
