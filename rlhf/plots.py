"""PNG curves of every stage's metrics.jsonl: one figure per stage, one panel per metric."""

from __future__ import annotations

import math
from pathlib import Path

from rlhf.artifacts import read_metrics

NOT_CURVES = {"step", "epoch", "time", "episodes", "num_tokens", "total_flos"}


def x_label_of(stage: str) -> str:
    """What a stage's metrics rows count: RL iterations (rollout and update) or optimizer steps."""
    from rlhf.config import RLConfig
    from rlhf.stages import STAGES

    registered = STAGES.get(stage)
    return f"{stage} iteration" if registered and issubclass(registered.config, RLConfig) else "optimizer step"


LANGUAGE_MODEL_STAGES = ("pretrain", "sft")
"""Stages whose eval_loss is a next-token cross-entropy, so exp(eval_loss) is a perplexity."""


def metric_series(rows: list[dict], perplexity: bool = False) -> dict[str, tuple[list[float], list[float]]]:
    """Numeric metric -> (steps, values), in first-logged order; eval rows and train rows alike.
    With `perplexity`, eval_loss also gives an eval_perplexity curve (its exponential)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        if perplexity and isinstance(row.get("eval_loss"), (int, float)):
            row = {**row, "eval_perplexity": math.exp(min(row["eval_loss"], 50.0))}
        for key, value in row.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(row.get("step", len(steps)))
            values.append(value)
    return series


def plot_stage(stage_dir: Path, out: Path) -> Path | None:
    """Draw one stage's metrics into `out` (PNG); None when the stage logged nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(stage_dir)
    series = {k: v for k, v in metric_series(rows, stage_dir.name in LANGUAGE_MODEL_STAGES).items() if len(v[0]) > 1}
    if not series:
        return None
    columns = min(4, len(series))
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    x_label = x_label_of(stage_dir.name)
    for axis, (name, (steps, values)) in zip(axes.flat, sorted(series.items())):
        axis.plot(steps, values, marker="." if len(steps) < 30 else None)
        axis.set_title(name)
        axis.set_xlabel(x_label)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(series) :]:
        axis.set_visible(False)
    figure.suptitle(f"{stage_dir.parent.name}: stage '{stage_dir.name}'")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def logged_stages(run_dir: Path) -> list[str]:
    """Every registered stage with a metrics.jsonl in `run_dir`, in registry order."""
    from rlhf.stages import STAGES

    return [stage for stage in STAGES if (run_dir / stage / "metrics.jsonl").is_file()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """`<run_dir>/plots/<stage>.png` for every stage that logged metrics."""
    run_dir = Path(run_dir)
    stages = logged_stages(run_dir)
    for stage in stages:  # every metrics file reads before the first plot is drawn: a bad one changes nothing
        read_metrics(run_dir / stage)
    written = []
    for stage in stages:
        path = plot_stage(run_dir / stage, run_dir / "plots" / f"{stage}.png")
        if path:
            written.append(path)
    return written
