"""Shared by tests/test_scoring.py and tests/test_score_command.py: one tiny reward-model directory (a
BPE tokenizer and a seeded, noise-perturbed `RlhfForSequenceClassification` with reward_mean 0.5,
reward_std 2.0), built once per test module, and the rows they score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_config, randomize_

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.5, 2.0
ATOL = 1e-6  # the same batches: float32 results agree to rounding
BATCH_ATOL = 1e-5  # other batch compositions: float32 reductions may differ in the last bits


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
