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


def test_next_token_statistics_by_hand() -> None:
    from rlhf.sft_trainer import next_token_statistics

    # Position 0 predicts label 1 from logits (0, 1); position 1 predicts label 0 from (ln 3, 0);
    # position 2 predicts nothing (the last position), and -100 marks an ignored label.
    logits = torch.tensor([[[0.0, 1.0], [math.log(3.0), 0.0], [5.0, -5.0]]], requires_grad=True)  # (1, 3, 2)
    p = math.e / (1 + math.e)  # probability of label 1 at position 0
    sums = next_token_statistics(logits, torch.tensor([[0, 1, 0]]))
    assert sums["nll"].item() == pytest.approx(-math.log(p) - math.log(0.75))
    assert sums["entropy"].item() == pytest.approx(-p * math.log(p) - (1 - p) * math.log(1 - p) - 0.75 * math.log(0.75) - 0.25 * math.log(0.25))
    assert sums["correct"].item() == 2 and sums["count"].item() == 2
    sums["nll"].backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([1 - p, p - 1])  # softmax - one-hot
    assert logits.grad[0, 2].tolist() == [0.0, 0.0]  # predicts no label

    ignored = next_token_statistics(logits.detach(), torch.tensor([[0, -100, 0]]))  # position 0's label is ignored
    assert ignored["count"].item() == 1 and ignored["correct"].item() == 1
    assert ignored["nll"].item() == pytest.approx(-math.log(0.75))

    # A vocabulary entry masked to -inf (probability 0) adds nothing, even where the label is ignored.
    masked = torch.tensor([[[0.0, 1.0, -math.inf], [math.log(3.0), 0.0, -math.inf], [-math.inf, 0.0, 0.0]]])
    sums = next_token_statistics(masked, torch.tensor([[0, 1, 0]]))
    assert sums["nll"].item() == pytest.approx(-math.log(p) - math.log(0.75))
    assert sums["entropy"].item() == pytest.approx(-p * math.log(p) - (1 - p) * math.log(1 - p) - 0.75 * math.log(0.75) - 0.25 * math.log(0.25))


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_full_logits_give_trls_loss_gradients_and_metrics(tok, tmp_path, fmt, monkeypatch) -> None:
    """Below FULL_LOGITS_MAX the loss comes from the full logits; it, its gradients and TRL's metrics
    match TRL's chunked head, which the same trainer takes above it."""
    from trl import SFTConfig

    from rlhf import sft_trainer

    torch.manual_seed(0)
    model = RlhfForCausalLM(make_config(vocab_size=len(tok), n_positions=64, dropout=0.0))
    model.config.pad_token_id = tok.pad_token_id
    args = SFTConfig(
        output_dir=str(tmp_path), max_length=64, assistant_only_loss=fmt == "messages", report_to=[], use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = sft_trainer.SFTTrainer(model=model, args=args, train_dataset=_dataset(fmt), processing_class=tok)
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    targets = int((batch["labels"][:, 1:] != -100).sum())
    model.train()

    def step() -> tuple[float, dict, dict]:
        model.zero_grad()
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(targets))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return loss.item(), grads, {key: value[-1] for key, value in trainer._metrics["train"].items()}

    assert trainer.full_logits(batch)
    loss, grads, metrics = step()
    monkeypatch.setattr(sft_trainer, "FULL_LOGITS_MAX", 0)
    assert not trainer.full_logits(batch)
    trl_loss, trl_grads, trl_metrics = step()

    assert loss == pytest.approx(trl_loss, rel=1e-6) and loss > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics.keys() == trl_metrics.keys() >= {"entropy", "mean_token_accuracy", "num_tokens"}
    for key, value in metrics.items():
        assert value == pytest.approx(trl_metrics[key], rel=1e-5), key
