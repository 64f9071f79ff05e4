"""rlhf.plots: one PNG per stage that logged metrics, panels for numeric metrics only."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.plots import metric_series, plot_run


def write_metrics(stage_dir, rows):
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metric_series_keeps_numeric_finite_values_with_their_steps():
    rows = [
        {"step": 1, "loss": 2.0, "note": "x", "flag": True, "epoch": 0.1},
        {"step": 2, "loss": float("nan"), "kl": 0.5},
        {"step": 3, "loss": 1.0, "kl": 0.7},
    ]
    series = metric_series(rows)
    assert set(series) == {"loss", "kl"}  # strings, booleans and bookkeeping columns are not curves
    assert series["loss"] == ([1, 3], [2.0, 1.0])  # the NaN row is dropped, steps stay aligned
    assert series["kl"] == ([2, 3], [0.5, 0.7])


def test_language_model_eval_loss_also_gives_perplexity():
    rows = [{"step": 10, "eval_loss": 0.0}, {"step": 20, "eval_loss": 1.0}]
    assert metric_series(rows, perplexity=True)["eval_perplexity"] == ([10, 20], [1.0, pytest.approx(2.718281828)])
    assert "eval_perplexity" not in metric_series(rows)  # a reward model's eval_loss is no perplexity


def test_plot_run_writes_a_png_per_stage_with_curves(tmp_path):
    write_metrics(tmp_path / "pretrain", [{"step": s, "loss": 3.0 / s} for s in range(1, 6)])
    write_metrics(tmp_path / "ppo", [{"step": s, "kl": 0.1 * s, "score": s} for s in range(1, 4)])
    write_metrics(tmp_path / "sft", [{"step": 1, "loss": 1.0}])  # a single point is no curve
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["pretrain.png", "ppo.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_plot_cli_errors_name_the_directory(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "missing: no such run directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no stage has logged metrics" in capsys.readouterr().err


def test_plot_cli_writes_files(tmp_path, capsys):
    write_metrics(tmp_path / "pretrain", [{"step": s, "loss": 1.0 / s} for s in range(1, 4)])
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "pretrain.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_rl_stages_are_plotted_against_iterations_the_others_against_optimizer_steps() -> None:
    from rlhf.plots import x_label_of

    assert [x_label_of(stage) for stage in ("ppo", "grpo", "rloo", "reinforce_pp")] == [
        "ppo iteration", "grpo iteration", "rloo iteration", "reinforce_pp iteration"]
    assert {x_label_of(stage) for stage in ("pretrain", "sft", "reward", "dpo")} == {"optimizer step"}
