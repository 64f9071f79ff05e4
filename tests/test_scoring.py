"""Scoring with a reward-model directory: `RewardScorer` (batch-size independence, normalisation),
`score_file` on prompt + response rows, preference pairs and hh-rlhf dialogues, and `write_rows`.
The `rlhf score` command: tests/test_score_command.py. The reward model: tests/scoring_helpers.py.
"""

from __future__ import annotations

import csv
import shutil

import pytest

from scoring_helpers import reward_dir, scorer  # noqa: F401 (fixtures)
from scoring_helpers import ATOL, BATCH_ATOL, MEAN, PAIR_ROWS, STD, assistant, eval_rows, user, write_jsonl


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
    config 0 and 1) give the same normalised scores, through RewardScorer and the RL stages' `normalised_scores`
    alike, and neither is normalised twice."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    from rlhf.model import normalise_score_head
    from rlhf.rl_models import normalised_scores
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
