"""Tests for the demo task: the gold judge and the committed data samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.demo_task import (
    DATA_FILES,
    all_requests,
    gold_judge,
    judge_one,
    judge_parts,
    parse_request,
    user_text,
    write_data_samples,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text(encoding="utf-8").splitlines()]


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    paths = write_data_samples(tmp_path, seed=0)
    assert sorted(paths) == sorted(DATA_FILES)
    for name in DATA_FILES:
        assert paths[name].read_bytes() == (SAMPLES / name).read_bytes(), name
    assert sum(p.stat().st_size for p in paths.values()) < 5_000_000


def test_parse_request() -> None:
    assert parse_request("What is 3 + 4?").result == 7
    assert parse_request("Compute 9 - 5.").result == 4
    req = parse_request("Name 1 fruit.")
    assert (req.kind, req.count, req.category) == ("listing", 1, "fruits")
    assert parse_request("Tell me a joke.") is None


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("What is 3 + 4?", "Sure! 3 + 4 = 7. Have a nice day.", 1.0),
        ("Compute 9 - 5.", "Sure! 9 - 5 = 4. Have a nice day.", 1.0),
        ("Name 3 fruits.", "Sure! Here are 3 fruits: apple, pear, plum. Have a nice day.", 1.0),
        ("Name 1 color.", "Sure! Here is 1 color: red. Have a nice day.", 1.0),
        ("What is 3 + 4?", "Sure! 3 + 4 = 8. Have a nice day.", 0.5),  # wrong sum
        ("Name 3 fruits.", "Sure! Here are 3 fruits: apple, pear. Have a nice day.", 0.5),  # wrong count
        ("Name 3 fruits.", "Sure! Here are 3 fruits: apple, red, plum. Have a nice day.", 0.5),  # wrong category
        ("Name 3 fruits.", "Sure! Here are 3 fruits: apple, pear, apple. Have a nice day.", 0.4),  # repeat
        ("What is 3 + 4?", "Sure! 3 + 4 = 7. 3 + 4 = 7. Have a nice day.", 0.9),  # repeated sentence
        ("What is 3 + 4?", "Sure! 3 + 4 = 7.", 0.8),  # missing closing
        ("What is 3 + 4?", "Sure! 3 + 4 = 7. Have a ni", 0.7),  # truncated
        ("What is 3 + 4?", "3 + 4 = 7. Have a nice day.", 0.8),  # missing opening
        ("What is 3 + 4?", "Ugh. 7.", 0.5),  # rude
        ("What is 3 + 4?", "Sure! 3 + 4 = 7. Have a nice day. Sure!", 0.7),  # junk after closing
        ("What is 3 + 4?", "xq## zzz ~~ 12 12 12", 0.0),  # garbage
        ("What is 3 + 4?", "", 0.0),  # empty
        ("Tell me a joke.", "Sure! 3 + 4 = 7. Have a nice day.", 0.0),  # unknown prompt
    ],
)
def test_judge_rubric(prompt: str, response: str, expected: float) -> None:
    assert judge_one(prompt, response) == pytest.approx(expected)


def test_judge_parts_name_the_rubric_items() -> None:
    assert judge_parts("What is 3 + 4?", "Sure! 3 + 4 = 8. Have a nice day.") == {
        "correct": False, "opening": True, "closing": True, "clean": True}
    assert judge_parts("Name 2 fruits.", "Ugh. Here are 2 fruits: apple, pear.") == {
        "correct": True, "opening": False, "closing": False, "clean": False}
    assert not any(judge_parts("Tell me a joke.", "Sure! Have a nice day.").values())


def test_judge_batch_and_robustness() -> None:
    prompts = ["What is 3 + 4?", "Name 2 tools.", "What is 99999999999999999 + 1?"]
    responses = ["Sure! 3 + 4 = 7. Have a nice day.", "\x00\n\t" * 50, "9" * 5000]
    scores = gold_judge(prompts, responses)
    assert scores[0] == 1.0 and scores[1] == 0.0
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert judge_one("What is 3 + 4?", None) == 0.0  # type: ignore[arg-type]


def test_user_text() -> None:
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Name 2 fruits."}]
    assert user_text(messages) == "Name 2 fruits."
    assert user_text("What is 1 + 1?") == "What is 1 + 1?"
    assert user_text([]) == ""


def test_preferences_strictly_ordered() -> None:
    rows = _rows("preferences.jsonl")
    assert len(rows) >= 2000
    for row in rows:
        prompt = user_text(row["prompt"])
        assert judge_one(prompt, row["chosen"][0]["content"]) > judge_one(prompt, row["rejected"][0]["content"])


def test_eval_prompts_held_out() -> None:
    evals = _rows("eval.jsonl")
    assert len(evals) == 128
    eval_prompts = {user_text(r["prompt"]) for r in evals}
    assert len(eval_prompts) == 128
    assert all(judge_one(user_text(r["prompt"]), r["reference"]) == 1.0 for r in evals)
    train = {r["messages"][0]["content"] for r in _rows("sft.jsonl")}
    train |= {user_text(r["prompt"]) for name in DATA_FILES[2:5] for r in _rows(name)}
    assert not eval_prompts & train


def test_sft_mixes_ideal_and_flawed() -> None:
    rows = _rows("sft.jsonl")
    scores = [judge_one(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    ideal = sum(s == 1.0 for s in scores) / len(scores)
    assert 0.6 < ideal < 0.8
    assert all(r["messages"][1]["role"] == "assistant" for r in rows)
    pc = _rows("sft_prompt_completion.jsonl")
    assert pc and set(pc[0]) == {"prompt", "completion"}


def test_corpus_has_no_chat_markers() -> None:
    text = (SAMPLES / "corpus.txt").read_text(encoding="utf-8")
    assert 300_000 < len(text) < 600_000
    assert "Have a nice day." in text and "3 + 4 = 7." in text
    for marker in ("user", "assistant", "<|", "role"):
        assert marker not in text.lower()


def test_corpus_states_every_arithmetic_fact_correctly() -> None:
    """The pretraining corpus teaches each sum the reward model must later judge, and never a wrong one."""
    import re

    text = (SAMPLES / "corpus.txt").read_text(encoding="utf-8")
    stated = re.findall(r"(?<![\d-])(\d) ([+-]) (\d) = (-?\d+)\.", text)
    assert all(int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) for a, op, b, c in stated)
    facts = {(r.a, r.op, r.b) for r in all_requests() if r.kind == "arithmetic"}
    assert {(int(a), op, int(b)) for a, op, b, _ in stated} == facts
    assert len(stated) >= 20 * len(facts)
