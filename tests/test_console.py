"""rlhf.console: the step lines, the levels, warnings on one line, the libraries quiet."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from rlhf import console


@pytest.fixture
def level():
    """Set the console level for one test, and put the previous one back."""
    previous = console.level

    def set_level(value: int) -> None:
        console.level = value

    yield set_level
    console.level = previous


def logged_rows(total: int, every: int, evaluations: tuple[int, ...] = ()) -> list[dict]:
    rows = [{"step": step, "loss": 1.0 / step, "learning_rate": 1e-3} for step in range(every, total + 1, every)]
    return rows + [{"step": step, "eval_loss": 0.5} for step in evaluations]


def printed(capsys, rows: list[dict], total: int) -> list[str]:
    lines = console.StepLines("sft", total)
    for row in sorted(rows, key=lambda row: row["step"]):
        lines.log(row)
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("total, every", [(1248, 20), (358, 10), (60, 1), (7, 1), (100, 100)])
def test_the_normal_level_prints_about_one_line_per_fifth_of_the_steps(capsys, level, total, every) -> None:
    level(console.NORMAL)
    lines = printed(capsys, logged_rows(total, every), total)
    logged = len(range(every, total + 1, every))
    assert 1 <= len(lines) <= min(console.LINES_PER_STAGE, logged)
    assert all(line.startswith("[sft] step ") for line in lines)
    assert lines[-1].startswith(f"[sft] step {total}/{total}") or total % every  # the last step is shown


def test_the_normal_level_prints_every_evaluation(capsys, level) -> None:
    level(console.NORMAL)
    lines = printed(capsys, logged_rows(1000, 10, evaluations=(250, 500, 750)), 1000)
    assert sum("eval_loss 0.5" in line for line in lines) == 3


def test_the_verbose_level_prints_every_logged_step_and_the_quiet_level_none(capsys, level) -> None:
    level(console.VERBOSE)
    assert len(printed(capsys, logged_rows(200, 10), 200)) == 20
    level(console.QUIET)
    assert printed(capsys, logged_rows(200, 10), 200) == []


def test_a_step_line_names_the_shown_metrics_in_order() -> None:
    row = {"step": 20, "grad_norm": 2.886, "learning_rate": 0.00038, "loss": 5.889, "mean_token_accuracy": 0.1837,
           "num_tokens": 6735.0, "epoch": 0.048}  # fmt: skip
    assert console.step_line(row, 1248) == "step   20/1248  loss 5.889  acc 0.1837  grad_norm 2.886  lr 3.80e-04"
    assert console.step_line({"step": 3, "score": 0.25, "kl": 0.0, "beta": 0.15}, 60, "iteration") == (
        "iteration  3/60  score 0.25  kl 0  beta 0.15"
    )


def test_a_row_without_shown_metrics_prints_nothing(capsys, level) -> None:
    level(console.VERBOSE)
    assert printed(capsys, [{"step": 5, "num_tokens": 10.0}], 10) == []


def test_say_prints_a_stage_prefixed_line_and_only_results_when_quiet(capsys, level) -> None:
    level(console.NORMAL)
    console.say("ppo", "scores normalised")
    level(console.QUIET)
    console.say("ppo", "set-up detail")
    console.say("ppo", "judge 0.7 -> 0.8", quiet_too=True)
    assert capsys.readouterr().out.splitlines() == ["[ppo] scores normalised", "[ppo] judge 0.7 -> 0.8"]


def test_a_warning_is_one_line_without_its_source_line(capsys) -> None:
    console.show_warning(UserWarning("importance ratio reached 12.0"), UserWarning, __file__, 10)
    assert capsys.readouterr().err == "warning: importance ratio reached 12.0 (UserWarning)\n"


def test_a_warning_from_the_command_is_one_line() -> None:
    # a fresh process: `configure` installs the one-line format for everything the command then warns
    script = (
        "import warnings; from rlhf import console; console.configure(console.NORMAL); "
        "warnings.warn('first\\nsecond line of the message stays', UserWarning)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stderr.startswith("warning: first") and "warnings.warn(" not in result.stderr


def test_below_verbose_transformers_and_datasets_log_only_errors(monkeypatch) -> None:
    import datasets
    import transformers

    for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")  # put back as it was after the test
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    before = transformers.logging.get_verbosity(), datasets.logging.get_verbosity()
    try:
        console.configure(console.NORMAL)
        assert transformers.logging.get_verbosity() == logging.ERROR
        assert datasets.logging.get_verbosity() == logging.ERROR
        assert not datasets.is_progress_bar_enabled()
    finally:
        transformers.logging.set_verbosity(before[0])
        datasets.logging.set_verbosity(before[1])
        datasets.enable_progress_bars()


@pytest.mark.parametrize("value, expected", [(0.5, "0.5"), (1e-4, "1.00e-04"), (12345.0, "1.23e+04"), (7, "7"), (0.0, "0")])
def test_numbers_are_short(value, expected) -> None:
    assert console.number(value) == expected


def test_configured_before_the_libraries_load_they_start_quiet() -> None:
    # the CLI's order: configure first, transformers and datasets imported later by the stages
    script = (
        "import logging, sys; sys.argv[0] = 'rlhf'; from rlhf import console; "  # as the console script: no model import yet
        "assert 'transformers' not in sys.modules; console.configure(console.NORMAL); "
        "import transformers, datasets; "
        "assert transformers.logging.get_verbosity() == logging.ERROR, 'transformers'; "
        "assert datasets.logging.get_verbosity() == logging.ERROR, 'datasets'; "
        "assert not datasets.is_progress_bar_enabled(), 'datasets bars'; "
        "console.configure(console.VERBOSE); print('ok')"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
