"""Scoring with a reward-model directory: `RewardScorer` (batch-size independence, normalisation),
`score_file` on prompt + response rows, preference pairs and hh-rlhf dialogues, and `rlhf score`
through the console script (JSONL / CSV output, summary table, one-line errors).

One tiny reward-model directory (a BPE tokenizer and a seeded, noise-perturbed
`RlhfForSequenceClassification` with reward_mean 0.5, reward_std 2.0) is built per module.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_config, randomize_

ROOT = Path(__file__).resolve().parents[1]
RLHF = shutil.which("rlhf")
MEAN, STD = 0.5, 2.0
ATOL = 1e-6  # the same batches: float32 results agree to rounding
BATCH_ATOL = 1e-5  # other batch compositions: float32 reductions may differ in the last bits

needs_script = pytest.mark.skipif(RLHF is None, reason="the rlhf console script is not installed")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    import torch

    from rlhf.model import RlhfForSequenceClassification
    from rlhf.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("reward")
    text = (ROOT / "data_samples" / "corpus.txt").read_text(encoding="utf-8")[:6000]
    tokenizer = train_tokenizer([text], vocab_size=300, kind="bpe")
    torch.manual_seed(0)
    config = make_config(vocab_size=len(tokenizer), n_positions=64, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         reward_mean=MEAN, reward_std=STD)  # fmt: skip
    model = randomize_(RlhfForSequenceClassification(config), seed=1).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(reward_dir):
    from rlhf.scoring import RewardScorer

    return RewardScorer(reward_dir, device="cpu")


def eval_rows(n: int = 40) -> list[dict]:
    """prompt (messages) + response (string) rows from the demo's held-out prompts."""
    rows = [json.loads(line) for line in (ROOT / "data_samples" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    return [{"id": i, "prompt": row["prompt"], "response": row["reference"]} for i, row in enumerate(rows)]


PAIR_ROWS = [
    {"prompt": user("What is 2 + 2?"), "chosen": assistant("Sure! 2 + 2 = 4. Have a nice day."),
     "rejected": assistant("2 + 2 = 5.")},
    {"prompt": "List 3 fruits.", "chosen": "Sure! Here are 3 fruits: apple, pear, plum. Have a nice day.",
     "rejected": "No."},
    {"chosen": "the cat sat on the mat", "rejected": "the mat sat on the cat"},  # implicit text
    {"prompt": user("Compute 7 - 5."), "chosen": assistant("Sure! 7 - 5 = 2. Have a nice day."),
     "rejected": assistant("Sure! 7 - 5 = 3. Have a nice day.")},
    {"prompt": "Name a colour.", "chosen": "Sure! Blue. Have a nice day.", "rejected": "Blue blue blue blue"},
    {"prompt": user("What is 9 + 9?"), "chosen": assistant("Sure! 9 + 9 = 18. Have a nice day."),
     "rejected": assistant("Sure! 9 + 9 = 18. Have a nice day. Sure!")},
]  # fmt: skip


# ----------------------------------------------------------------------------- RewardScorer


def test_scores_do_not_depend_on_batch_size(reward_dir, scorer) -> None:
    from rlhf.scoring import RewardScorer

    rows = eval_rows(20)
    prompts = [r["prompt"] for r in rows] + [user("word " * 80)]  # one prompt beyond the context: left-truncated
    responses = [r["response"] for r in rows] + ["ok"]
    by_size = {}
    for size in (1, 3, 16):
        by_size[size] = RewardScorer(reward_dir, device="cpu", batch_size=size).score(prompts, responses, normalised=False)
    assert len(set(by_size[1])) > len(prompts) // 2, "the perturbed model gives varied scores"
    for size in (3, 16):
        diff = max(abs(a - b) for a, b in zip(by_size[1], by_size[size]))
        assert diff < BATCH_ATOL, f"batch size {size} vs 1: max |diff| {diff:.3g} >= {BATCH_ATOL}"


def test_normalised_is_raw_minus_mean_over_std(scorer) -> None:
    assert (scorer.mean, scorer.std) == (MEAN, STD)
    rows = eval_rows(6)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    raw = scorer.score(prompts, responses, normalised=False)
    normalised = scorer.score(prompts, responses)
    assert normalised == pytest.approx([(r - MEAN) / STD for r in raw], abs=1e-9)


def test_older_and_folded_reward_models_score_alike(reward_dir, tmp_path) -> None:
    """A reward model saved before normalisation was folded into the head (no score bias, its statistics
    in the config) and the same model as the reward stage now saves it (statistics folded into the head,
    config 0 and 1) give the same normalised scores, through RewardScorer and PPO's `normalised_scores`
    alike, and neither is normalised twice."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from rlhf.model import normalise_score_head
    from rlhf.ppo import normalised_scores
    from rlhf.scoring import RewardScorer, render_conversation

    older, folded = tmp_path / "older", tmp_path / "folded"
    shutil.copytree(reward_dir, older)
    weights = load_file(older / "model.safetensors")
    del weights["score.bias"]
    save_file(weights, older / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForSequenceClassification.from_pretrained(older)
    model.config.reward_mean, model.config.reward_std = 0.0, 1.0
    normalise_score_head(model, MEAN, STD)
    shutil.copytree(older, folded)  # the tokenizer
    model.save_pretrained(folded)

    rows = eval_rows(10)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    old_scorer, new_scorer = RewardScorer(older, device="cpu"), RewardScorer(folded, device="cpu")
    normalised = old_scorer.score(prompts, responses)
    assert new_scorer.score(prompts, responses) == pytest.approx(normalised, abs=BATCH_ATOL)
    assert new_scorer.score(prompts, responses, normalised=False) == new_scorer.score(prompts, responses), "folded: raw is normalised"
    assert old_scorer.score(prompts, responses, normalised=False) != pytest.approx(normalised, abs=0.1)

    tokenizer = old_scorer.tokenizer
    for prompt, response, expected in zip(prompts, responses, normalised):
        text = render_conversation(tokenizer, prompt, response)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][-old_scorer.model.config.n_positions :]])
        for scorer in (old_scorer, new_scorer):
            score = normalised_scores(scorer.model, ids, torch.ones_like(ids)).item()
            assert score == pytest.approx(expected, abs=BATCH_ATOL)


def test_string_prompt_equals_single_user_message(scorer) -> None:
    a = scorer.score(["What is 2 + 2?"], ["Sure! 4."])
    b = scorer.score([user("What is 2 + 2?")], [assistant("Sure! 4.")])
    assert a == pytest.approx(b, abs=1e-9)


# ----------------------------------------------------------------------------- score_file


def test_score_file_prompt_response(scorer, tmp_path) -> None:
    from rlhf.scoring import score_file

    rows = eval_rows(10)
    data = write_jsonl(tmp_path / "responses.jsonl", rows)
    out, summary = score_file(scorer, data, progress=False)
    raw = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows], normalised=False)
    assert [{k: v for k, v in row.items() if k not in ("score", "score_raw")} for row in out] == rows, "input columns kept"
    assert [row["score_raw"] for row in out] == pytest.approx(raw, abs=ATOL)
    assert [row["score"] for row in out] == pytest.approx([(r - MEAN) / STD for r in raw], abs=ATOL)
    stats = summary["score"]
    assert stats["count"] == 10
    scores = sorted(row["score"] for row in out)
    assert stats["min"] == pytest.approx(scores[0]) and stats["max"] == pytest.approx(scores[-1])
    assert stats["mean"] == pytest.approx(sum(scores) / 10)
    assert stats["median"] == pytest.approx((scores[4] + scores[5]) / 2)
    assert stats["min"] <= stats["p25"] <= stats["median"] <= stats["p75"] <= stats["max"]


def test_score_file_pairs_accuracy_matches_rows(scorer, tmp_path) -> None:
    from rlhf.scoring import score_file

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)
    out, summary = score_file(scorer, data, progress=False)
    assert len(out) == len(PAIR_ROWS)
    for row, source in zip(out, PAIR_ROWS):
        assert {k: row[k] for k in source} == source
        assert row["chosen_score"] == pytest.approx((row["chosen_score_raw"] - MEAN) / STD, abs=ATOL)
        assert row["rejected_score"] == pytest.approx((row["rejected_score_raw"] - MEAN) / STD, abs=ATOL)
        expected = scorer.score([source.get("prompt")] * 2, [source["chosen"], source["rejected"]], normalised=False)
        assert [row["chosen_score_raw"], row["rejected_score_raw"]] == pytest.approx(expected, abs=BATCH_ATOL)
    by_hand = sum(row["chosen_score"] > row["rejected_score"] for row in out) / len(out)
    assert summary["accuracy"] == pytest.approx(by_hand)
    assert 0 < by_hand < 1, "the fixture's pairs are not all ordered one way (the check would be trivial)"
    assert summary["chosen"]["count"] == summary["rejected"]["count"] == len(PAIR_ROWS)
    assert summary["skipped_empty_pairs"] == 0


def test_score_file_hh_dialogues(scorer, tmp_path) -> None:
    from rlhf.scoring import score_file

    rows = [
        {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: It is 4.", "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: It is 5."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:"},  # empty answer: skipped
        {"chosen": "\n\nHuman: Help me.\n\nAssistant: Sure, with what?", "rejected": "\n\nHuman: Help me.\n\nAssistant: No."},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    out, summary = score_file(scorer, data, progress=False)
    assert summary["skipped_empty_pairs"] == 1
    assert [row["chosen"] for row in out] == [rows[0]["chosen"], rows[2]["chosen"]], "the skipped row is left out"
    expected = scorer.score([user("What is 2 + 2?")] * 2, [assistant("It is 4."), assistant("It is 5.")], normalised=False)
    assert [out[0]["chosen_score_raw"], out[0]["rejected_score_raw"]] == pytest.approx(expected, abs=BATCH_ATOL)
    assert summary["accuracy"] == pytest.approx(sum(r["chosen_score"] > r["rejected_score"] for r in out) / 2)


def test_score_file_without_known_columns(scorer, tmp_path) -> None:
    from rlhf.errors import DataError
    from rlhf.scoring import score_file

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="prompt.*response.*chosen.*rejected"):
        score_file(scorer, data, progress=False)
    data = write_jsonl(tmp_path / "partial.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match="row 2"):
        score_file(scorer, data, progress=False)


# ----------------------------------------------------------------------------- rlhf score


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


# ----------------------------------------------------------------------------- found bugs


def test_csv_output_with_rows_of_different_columns(reward_dir, scorer, tmp_path) -> None:
    from rlhf.scoring import score_file, write_rows

    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": "the cat sat", "rejected": "the mat sat"},
        {"chosen": "a dog", "rejected": "a cat", "margin": 1.0},
    ])  # fmt: skip
    rows, _ = score_file(scorer, data, progress=False)
    out = tmp_path / "scored.csv"
    write_rows(rows, out)
    with open(out, newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert len(written) == 2 and "margin" in written[0]


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
