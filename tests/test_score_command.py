"""`rlhf score` (rlhf.commands.cmd_score) through the console script and `main`: JSONL / CSV output
equal to the Python scorer, the summary table, pairwise accuracy, and one-line errors for bad input.
The reward model: tests/scoring_helpers.py."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_config
from scoring_helpers import reward_dir, scorer  # noqa: F401 (fixtures)
from scoring_helpers import ATOL, MEAN, PAIR_ROWS, ROOT, STD, eval_rows, write_jsonl

RLHF = shutil.which("rlhf")
needs_script = pytest.mark.skipif(RLHF is None, reason="the rlhf console script is not installed")


def rlhf(*args) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, "score", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=180)


def check_table(stdout: str, names: list[str], count: int) -> None:
    header = next(line for line in stdout.splitlines() if "count" in line)
    assert header.split() == ["count", "mean", "std", "min", "p25", "median", "p75", "max"], header
    for name in names:
        line = next((line for line in stdout.splitlines() if line.split()[:1] == [name]), None)
        assert line is not None, f"no summary row {name!r} in {stdout!r}"
        cells = line.split()
        assert int(cells[1]) == count and len(cells) == 9
        [float(c) for c in cells[2:]]


def check_written(out: Path, rows: list[dict], scorer) -> None:
    raw = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows], normalised=False)
    if out.suffix == ".jsonl":
        written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [{k: r[k] for k in ("id", "prompt", "response")} for r in written] == rows
    else:
        with open(out, newline="", encoding="utf-8") as handle:
            written = list(csv.DictReader(handle))
        assert list(written[0]) == ["id", "prompt", "response", "score", "score_raw"]
        assert [json.loads(r["prompt"]) for r in written] == [r["prompt"] for r in rows], "non-string cells as JSON"
        assert [r["response"] for r in written] == [r["response"] for r in rows]
    assert len(written) == len(rows)
    assert [float(r["score_raw"]) for r in written] == pytest.approx(raw, abs=ATOL)
    assert [float(r["score"]) for r in written] == pytest.approx([(x - MEAN) / STD for x in raw], abs=ATOL)


# Each console-script call costs seconds of imports on a shared 2-core machine: one call goes
# through the installed script; the other output format and the pairs run `main` in-process.


@needs_script
def test_console_script_writes_jsonl_equal_to_python_scorer(reward_dir, scorer, tmp_path) -> None:
    rows = eval_rows(40)
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    result = rlhf("--reward", reward_dir, "--data", data, "--out", out, "--batch-size", scorer.batch_size)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 40 rows to {out}" in result.stdout
    check_table(result.stdout, ["score"], 40)
    assert "pairwise accuracy" not in result.stdout
    check_written(out, rows, scorer)


def test_cli_writes_csv_equal_to_python_scorer(reward_dir, scorer, tmp_path, capsys) -> None:
    from rlhf.cli import main

    rows = eval_rows(40)
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    out = tmp_path / "scored.csv"
    code = main(["score", "--reward", str(reward_dir), "--data", str(data), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert f"wrote 40 rows to {out}" in captured.out
    check_table(captured.out, ["score"], 40)
    check_written(out, rows, scorer)


def test_cli_pairs_print_accuracy(reward_dir, scorer, tmp_path, capsys) -> None:
    from rlhf.cli import main
    from rlhf.scoring import score_file

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)
    code = main(["score", "--reward", str(reward_dir), "--data", str(data)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    check_table(captured.out, ["chosen", "rejected"], len(PAIR_ROWS))
    _, summary = score_file(scorer, data, progress=False)
    assert f"pairwise accuracy: {summary['accuracy']:.4f}" in captured.out


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line in {stderr[-2000:]!r}"
    assert "Traceback" not in stderr
    return lines[0]


@needs_script
def test_cli_bad_output_name_and_missing_reward_dir(reward_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "responses.jsonl", eval_rows(3))
    result = rlhf("--reward", reward_dir, "--data", data, "--out", tmp_path / "scores.txt")
    assert result.returncode == 2
    assert "scores.txt" in one_line_error(result.stderr) and ".jsonl or .csv" in result.stderr
    assert not (tmp_path / "scores.txt").exists()
    missing = tmp_path / "no_such_reward"
    result = rlhf("--reward", missing, "--data", data)
    assert result.returncode == 2 and str(missing) in one_line_error(result.stderr)


def test_cli_missing_columns_exit_2(reward_dir, tmp_path, capsys) -> None:
    from rlhf.cli import main

    out = tmp_path / "out.jsonl"
    for rows, words in (
        ([{"text": "hello"}], "row 1"),
        ([{"prompt": "a", "response": "b"}, {"response": "c"}], "row 2"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], "'rejected'"),
    ):
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
        code = main(["score", "--reward", str(reward_dir), "--data", str(data), "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2
        line = one_line_error(captured.err)
        assert str(data) in line and words in line, line
        assert not out.exists()
    code = main(["score", "--reward", str(reward_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert code == 2 and "nope.jsonl" in one_line_error(capsys.readouterr().err)


def test_cli_batch_size_zero_is_a_user_error(reward_dir, tmp_path, capsys) -> None:
    from rlhf.cli import main

    data = write_jsonl(tmp_path / "responses.jsonl", eval_rows(3))
    try:
        code = main(["score", "--reward", str(reward_dir), "--data", str(data), "--batch-size", "0"])
    except SystemExit as exit:  # argparse rejecting the value (usage error, exit 2) would do as well
        assert exit.code == 2
        return
    assert code == 2
    assert "batch" in one_line_error(capsys.readouterr().err)


def test_cli_refuses_a_directory_without_a_reward_head(reward_dir, tmp_path, capsys) -> None:
    import torch
    from transformers import AutoTokenizer

    from rlhf.cli import main
    from rlhf.model import RlhfForCausalLM

    policy_dir = tmp_path / "sft"
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    torch.manual_seed(0)
    RlhfForCausalLM(make_config(vocab_size=len(tokenizer), n_positions=64)).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    data = write_jsonl(tmp_path / "responses.jsonl", [{"prompt": "a", "response": "b"}])
    code = main(["score", "--reward", str(policy_dir), "--data", str(data)])
    captured = capsys.readouterr()
    assert code == 2, f"scored with a random head instead of refusing:\n{captured.out[-500:]}"
    assert "reward" in one_line_error(captured.err)


def test_cli_refuses_an_empty_response_naming_the_row_before_loading_the_model(reward_dir, tmp_path, capsys, monkeypatch) -> None:
    from rlhf import scoring
    from rlhf.cli import main

    monkeypatch.setattr(scoring, "RewardScorer", None)  # loading the model would fail the test
    rows = [{"prompt": "What is 1 + 2?", "response": "Sure! 3."}, {"prompt": "What is 2 + 2?", "response": " "}]
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    code = main(["score", "--reward", str(reward_dir), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {data}: row 2: response: empty text", err
