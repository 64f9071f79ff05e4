"""TRL's RewardTrainer drives RlhfForSequenceClassification with our tokenizer: a few steps on
in-memory preference pairs, the first logged loss checked against a hand-computed one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config
from rlhf.model import RlhfForSequenceClassification

CORPUS = ["the cat sat on the mat. the dog ate the bone. a good answer is kind and short. where is it?"] * 5
PAIRS = [
    ("the cat sat on the mat.", "the dog ate the mat bone"),
    ("a good answer is kind.", "a bad answer"),
    ("the dog ate the bone.", "the bone ate the dog"),
    ("it is on the mat.", "mat"),
]


@pytest.fixture(scope="module")
def tok():
    from rlhf.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300, kind="bpe")


def _dataset(fmt: str):
    from datasets import Dataset

    chosen, rejected = zip(*(PAIRS * 2))  # 8 pairs
    if fmt == "implicit":
        return Dataset.from_dict({"chosen": list(chosen), "rejected": list(rejected)})
    if fmt == "explicit":
        prompts = ["Q: where? A: "] * len(chosen)
        return Dataset.from_dict({"prompt": prompts, "chosen": list(chosen), "rejected": list(rejected)})
    user = [{"role": "user", "content": "say something"}]
    return Dataset.from_dict(
        {
            "chosen": [user + [{"role": "assistant", "content": c}] for c in chosen],
            "rejected": [user + [{"role": "assistant", "content": r}] for r in rejected],
        }
    )


@pytest.mark.parametrize(
    "fmt,center",
    [("implicit", None), ("explicit", None), ("conversational", None), ("implicit", 0.1)],
)
def test_reward_trainer_runs_and_first_loss_is_bradley_terry(tok, tmp_path, fmt, center) -> None:
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = RlhfForSequenceClassification(make_config(vocab_size=len(tok), n_positions=64, dropout=0.1))
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,  # the whole dataset: the first step's loss is order-free
        learning_rate=1e-3,
        max_length=64,
        center_rewards_coefficient=center,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    assert args.disable_dropout and args.gradient_checkpointing  # TRL's defaults, exercised here
    trainer = RewardTrainer(model=model, args=args, train_dataset=_dataset(fmt), processing_class=tok)
    data = trainer.train_dataset
    assert len(data) == 8

    # What TRL tokenised: EOS appended (text) or the chat template (conversational).
    if fmt == "implicit":
        assert data[0]["chosen_ids"] == tok(PAIRS[0][0] + tok.eos_token).input_ids
    elif fmt == "explicit":
        assert data[0]["chosen_ids"] == tok("Q: where? A: " + PAIRS[0][0] + tok.eos_token).input_ids
    else:
        rendered = "<|user|>say something<|endoftext|><|assistant|>" + PAIRS[0][0] + "<|endoftext|>"
        assert data[0]["chosen_ids"] == tok(rendered).input_ids
    assert all(row["chosen_ids"][-1] == tok.eos_token_id for row in data)

    # Expected first-step loss, each sequence scored unpadded (its last token's score).
    with torch.no_grad():
        model.eval()

        def reward(ids: list[int]) -> torch.Tensor:
            return model(torch.tensor([ids])).logits[0, 0]

        rc = torch.stack([reward(row["chosen_ids"]) for row in data])
        rr = torch.stack([reward(row["rejected_ids"]) for row in data])
    expected = -F.logsigmoid(rc - rr).mean()
    if center is not None:
        expected = expected + center * ((rc + rr) ** 2).mean()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert losses[-1] < losses[0]  # the same batch thrice: the loss goes down
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "score.weight" in changed and "transformer.h.0.attn.c_attn.weight" in changed
    # Bradley-Terry sees only score differences, so what shifts every score alike (the score head's
    # bias, and the final LayerNorm's bias, which reaches the score only through w . bias) gets no
    # gradient, bar rounding, unless the rewards are centred; every other parameter must move.
    assert set(before) - set(changed) <= {"score.bias", "transformer.ln_f.bias"}
    assert center is None or {"score.bias", "transformer.ln_f.bias"} <= set(changed)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # disable_dropout
    assert model.config.pad_token_id == tok.pad_token_id
