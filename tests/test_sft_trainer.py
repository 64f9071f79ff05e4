"""TRL's SFTTrainer drives RlhfForCausalLM with our tokenizer and chat template: a few steps on
a conversational dataset (assistant-only loss) and on plain text, first logged loss checked."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_config
from rlhf.model import RlhfForCausalLM, causal_lm_loss

CORPUS = ["where is the cat? on the mat. what did the dog eat? the bone. say hi. hi there."] * 5
QA = [("where is the cat?", "on the mat."), ("what did the dog eat?", "the bone."), ("say hi.", "hi there.")]


@pytest.fixture(scope="module")
def tok():
    from rlhf.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300, kind="bpe")


def _dataset(fmt: str):
    from datasets import Dataset

    rows = QA * 2 + QA[:2]  # 8 examples
    if fmt == "messages":
        return Dataset.from_dict(
            {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]}
        )
    return Dataset.from_dict({"text": [f"{q} {a}" for q, a in rows]})


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_sft_trainer_runs_and_first_loss_matches(tok, tmp_path, fmt) -> None:
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = RlhfForCausalLM(make_config(vocab_size=len(tok), n_positions=64))  # SFTConfig keeps dropout
    model.config.pad_token_id = tok.pad_token_id
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,  # the whole dataset: the first step's loss is order-free
        learning_rate=1e-3,
        max_length=64,
        assistant_only_loss=fmt == "messages",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(fmt), processing_class=tok)
    data = trainer.train_dataset
    assert len(data) == 8

    batch = trainer.data_collator([data[i] for i in range(len(data))])
    labels = batch["labels"]
    if fmt == "messages":
        # Only the assistant's content and its closing EOS are trained on; the prompt and the
        # '<|assistant|>' marker are not.
        q, a = QA[0]
        assert data[0]["input_ids"] == tok(f"<|user|>{q}<|endoftext|><|assistant|>{a}<|endoftext|>").input_ids
        trained = [t for t, lab in zip(batch["input_ids"][0].tolist(), labels[0].tolist()) if lab != -100]
        assert trained == tok(a + tok.eos_token).input_ids
    else:
        assert data[0]["input_ids"][-1] == tok.eos_token_id  # EOS appended
        assert torch.equal(labels[batch["attention_mask"].bool()], batch["input_ids"][batch["attention_mask"].bool()])
    assert (labels[batch["attention_mask"] == 0] == -100).all()

    with torch.no_grad():
        model.eval()
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = causal_lm_loss(logits, labels)  # mean over the shifted targets

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The Trainer passes num_items_in_batch; the count must exclude each row's position 0
    # (transformers does so for models whose loss_type is ForCausalLM), or the text run's
    # loss would come out 8 / (targets + 8) too small.
    assert losses[0] == pytest.approx(expected.item(), rel=1e-4)
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "transformer.wte.weight" in changed and "transformer.h.1.mlp.c_fc.weight" in changed
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after training
