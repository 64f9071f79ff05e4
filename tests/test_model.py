"""Tests for rlhf.model: padding invariance, save/load through the Auto classes, the loss,
dropout control, gradient checkpointing, config validation and LoRA through PEFT."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from rlhf.model import (
    RlhfConfig,
    RlhfForCausalLM,
    RlhfForSequenceClassification,
    causal_lm_loss,
    set_dropout,
)
from conftest import make_config, randomize_

LENGTHS = [7, 4, 1, 6]  # the batch's real lengths; the longest row has no padding


def _rows(vocab: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in LENGTHS]


def _pad(rows: list[torch.Tensor], side: str, junk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row with the (arbitrary, non-pad-looking) token `junk`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), junk, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def _real(side: str, width: int, n: int) -> slice:
    return slice(width - n, width) if side == "left" else slice(0, n)


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_padding_invariance(side: str, tiny_config) -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(tiny_config)).eval()
    rows = _rows(tiny_config.vocab_size)
    ids, mask = _pad(rows, side, junk=5)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            got = batch[i, _real(side, ids.shape[1], len(r))]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            # The pad content must not leak in either: other junk, same real-token logits.
            other = model(ids.masked_fill(mask == 0, 17), attention_mask=mask).logits
            torch.testing.assert_close(other[i, _real(side, ids.shape[1], len(r))], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(batch).all()  # pad queries too (each sees at least itself)


@pytest.mark.parametrize("side", ["left", "right"])
def test_scalar_head_padding_invariance(side: str, tiny_config) -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForSequenceClassification(tiny_config)).eval()
    rows = _rows(tiny_config.vocab_size, seed=2)
    ids, mask = _pad(rows, side, junk=9)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert out.logits.shape == (len(rows), 1)
        assert out.token_scores.shape == (*ids.shape, 1)
        for i, r in enumerate(rows):
            alone = model(r[None])
            # Unpadded: `logits` is the last token's score.
            torch.testing.assert_close(alone.logits[0], alone.token_scores[0, -1])
            torch.testing.assert_close(out.logits[i], alone.token_scores[0, -1], atol=1e-5, rtol=0)
            got = out.token_scores[i, _real(side, ids.shape[1], len(r))]
            torch.testing.assert_close(got, alone.token_scores[0], atol=1e-5, rtol=0)
    # The rows' rewards differ, so picking a wrong (e.g. pad) position could not pass by accident.
    assert len(set(round(v, 4) for v in out.logits.squeeze(-1).tolist())) == len(rows)


def test_score_head_loads_without_a_bias_as_saved_before_it_had_one(tmp_path, tiny_config) -> None:
    """Reward models saved before the score head had a bias load with bias 0: the same scores, silently."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    old = randomize_(RlhfForSequenceClassification(tiny_config)).eval()
    with torch.no_grad():
        old.score.bias.zero_()  # what the bias-free head computed
    old.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["score.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.score.bias.tolist() == [0.0]
    ids = torch.randint(0, tiny_config.vocab_size, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).token_scores, old(ids).token_scores, atol=1e-6, rtol=0)


def test_normalise_score_head_folds_the_affine_map_and_records_it(tiny_config) -> None:
    from rlhf.model import normalise_score_head

    torch.manual_seed(0)
    model = randomize_(RlhfForSequenceClassification(tiny_config)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (3, 7))
    with torch.no_grad():
        before = model(ids).token_scores
        normalise_score_head(model, 0.5, 2.0)
        torch.testing.assert_close(model(ids).token_scores, (before - 0.5) / 2.0, atol=1e-6, rtol=0)
        assert (model.config.folded_reward_mean, model.config.folded_reward_std) == (0.5, 2.0)
        # A second map composes: ((s - 0.5) / 2 - 1) / 4 = (s - (0.5 + 1 * 2)) / (2 * 4).
        normalise_score_head(model, 1.0, 4.0)
        torch.testing.assert_close(model(ids).token_scores, (before - 2.5) / 8.0, atol=1e-6, rtol=0)
        assert (model.config.folded_reward_mean, model.config.folded_reward_std) == (2.5, 8.0)
    assert (model.config.reward_mean, model.config.reward_std) == (0.0, 1.0), "nothing left to apply after the head"


def test_scalar_head_labels_give_mse(tiny_config) -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForSequenceClassification(tiny_config)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (3, 5))
    labels = torch.tensor([0.5, -1.0, 2.0])
    out = model(ids, labels=labels)
    assert out.loss.item() == pytest.approx(((out.logits.squeeze(-1) - labels) ** 2).mean().item(), rel=1e-6)


def test_save_and_auto_load(tmp_path, tiny_config) -> None:
    import rlhf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    lm = randomize_(RlhfForCausalLM(tiny_config)).eval()
    clf = randomize_(RlhfForSequenceClassification(tiny_config), seed=1).eval()
    lm.save_pretrained(tmp_path / "lm")
    clf.save_pretrained(tmp_path / "clf")
    for d in ("lm", "clf"):
        files = {p.name for p in (tmp_path / d).iterdir()}
        assert "model.safetensors" in files and "config.json" in files
        assert not any(f.endswith(".bin") for f in files), files

    config = AutoConfig.from_pretrained(tmp_path / "lm")
    assert type(config) is RlhfConfig
    assert (config.vocab_size, config.n_embd, config.n_layer, config.n_head) == (96, 32, 2, 4)

    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    lm2 = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(lm2) is RlhfForCausalLM
    assert lm2.lm_head.weight is lm2.transformer.wte.weight  # still tied after loading
    clf2 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert type(clf2) is RlhfForSequenceClassification
    # Weights load bit-exactly; outputs may differ in the last bit (the loaded tensors' memory
    # alignment picks other SIMD paths), hence 1e-6.
    for a, b in ((lm2, lm), (clf2, clf)):
        for name, tensor in b.state_dict().items():
            assert torch.equal(a.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(lm2(ids, attention_mask=mask).logits, lm(ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
        a, b = clf2(ids, attention_mask=mask), clf(ids, attention_mask=mask)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.token_scores, b.token_scores, atol=1e-6, rtol=0)

    # A reward model starts from the SFT checkpoint: the backbone loads, only `score` is new.
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm")
    assert type(rm) is RlhfForSequenceClassification
    for name, tensor in lm.transformer.state_dict().items():
        assert torch.equal(rm.transformer.state_dict()[name], tensor), name


def test_causal_lm_loss_matches_hand_computation() -> None:
    # All-zero logits over V=4: every predicted token costs log 4, wherever it is.
    labels = torch.tensor([[3, 1, 2, 0]])
    assert causal_lm_loss(torch.zeros(1, 4, 4), labels).item() == pytest.approx(math.log(4), rel=1e-6)
    # V=2: position 0 gives p(1)=3/4 and the target is 1; position 1 gives p(1)=1/4, target 1;
    # position 2's logits predict nothing (there is no label 3).
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [ln3, 0.0], [5.0, -5.0]]])
    want = (-math.log(0.75) - math.log(0.25)) / 2
    assert causal_lm_loss(logits, torch.tensor([[0, 1, 1]])).item() == pytest.approx(want, rel=1e-6)
    assert causal_lm_loss(logits, torch.tensor([[0, 1, -100]])).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert causal_lm_loss(logits, torch.tensor([[0, 1, 1]]), 4).item() == pytest.approx(2 * want / 4, rel=1e-6)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 2] = -100
    labels[1, 4] = -100
    labels[1, 0] = -100  # a first position is never a target anyway
    # Explicit shift: position t predicts label t + 1.
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)[keep]
    assert keep.sum() == 6  # 8 targets, 2 ignored
    torch.testing.assert_close(causal_lm_loss(logits, labels), nll.mean())
    torch.testing.assert_close(causal_lm_loss(logits, labels, num_items_in_batch=11), nll.sum() / 11)
    torch.testing.assert_close(causal_lm_loss(logits, labels, torch.tensor(11)), nll.sum() / 11)

    # -100 really excludes: making an ignored label real changes the loss; label 0 is never a target.
    other = labels.clone()
    other[0, 2] = 3
    assert not torch.isclose(causal_lm_loss(logits, other), causal_lm_loss(logits, labels))
    other = labels.clone()
    other[1, 4] = 3
    assert not torch.isclose(causal_lm_loss(logits, other), causal_lm_loss(logits, labels))  # [1,4] now counts
    other = labels.clone()
    other[1, 0] = 3
    torch.testing.assert_close(causal_lm_loss(logits, other), causal_lm_loss(logits, labels))  # first: never a target


def test_model_forward_loss_uses_causal_lm_loss(tiny_lm) -> None:
    ids = torch.randint(0, 96, (2, 6))
    labels = ids.clone()
    labels[0, :2] = -100
    out = tiny_lm(ids, labels=labels)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels))
    out = tiny_lm(ids, labels=labels, num_items_in_batch=4)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels, 4))


def test_set_dropout() -> None:
    torch.manual_seed(0)
    model = RlhfForCausalLM(make_config(dropout=0.1)).train()
    ids = torch.randint(0, 96, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # the explicit-mask attention path too
    set_dropout(model, 0.0)
    assert model.config.dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=0, rtol=0)
    set_dropout(model, 0.5)
    assert model.config.dropout == 0.5
    assert not torch.allclose(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    # Attention-probability dropout alone (the p read inside attention) also acts.
    set_dropout(model, 0.0)
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.5
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()  # eval ignores dropout
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_set_dropout_leaves_lora_dropout_alone() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(RlhfForCausalLM(make_config(dropout=0.1)),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.3, target_modules=["c_attn", "c_fc"]))  # fmt: skip
    set_dropout(model, 0.0)
    lora = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in name}
    own = [m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and ".lora_dropout." not in name]
    assert len(lora) == 2 * model.config.n_layer and set(lora.values()) == {0.3}, "the adapters' dropout is as configured"
    assert own and set(own) == {0.0}


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}], ids=["default", "reentrant"])
def test_gradient_checkpointing_matches(kwargs, tiny_config) -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(tiny_config)).train()
    ids = torch.randint(0, 96, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads()
    calls = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    loss, grads = loss_and_grads()
    assert len(calls) == 2  # forward, then the recompute in backward (a pre-hook: the
    # non-reentrant recompute stops early, inside the MLP, so a post-hook would not see it)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=0, msg=name)


def test_gradient_checkpointing_with_use_cache(tiny_config) -> None:
    """GPT-2 (and GradientCheckpointingLayer for a `cache=` keyword) drop the cache when training
    with checkpointing; a caller passing use_cache=True must still get correct gradients."""
    torch.manual_seed(0)
    model = RlhfForCausalLM(tiny_config).train()
    ids = torch.randint(0, 96, (2, 8))
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    model(ids, labels=ids, use_cache=True).loss.backward()  # CheckpointError: recomputed k/v are (.., 16, ..)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=0, msg=name)


def test_config_validation(tiny_config) -> None:
    with pytest.raises(ValueError, match="divisible"):
        RlhfConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        RlhfConfig(activation_function="relu")
    model = RlhfForCausalLM(tiny_config)
    model(torch.zeros(1, 48, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds"):
        RlhfForSequenceClassification(tiny_config)(torch.zeros(2, 49, dtype=torch.long))
    assert (tiny_config.hidden_size, tiny_config.num_hidden_layers, tiny_config.num_attention_heads) == (32, 2, 4)
    assert tiny_config.max_position_embeddings == 48


def _lora_train(model, task_type: str, steps: int = 3, **extra):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], **extra),
    )
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        if task_type == "CAUSAL_LM":
            loss = peft_model(input_ids=ids, labels=ids).loss
        else:
            loss = peft_model(input_ids=ids, labels=torch.tensor([1.0, -1.0, 0.5, 2.0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    return peft_model, trainable, changed


def test_lora_causal_lm_trains_only_adapters(tiny_config) -> None:
    torch.manual_seed(0)
    peft_model, trainable, changed = _lora_train(RlhfForCausalLM(tiny_config), "CAUSAL_LM")
    lora = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    assert len(lora) == 2 * 4 * 2
    assert trainable == lora
    # B starts at zero, so A has no gradient at step 1; by step 3 every adapter matrix moved
    # (weight decay is 0, so only gradients can move them).
    assert changed == lora


def test_lora_scalar_head_trains_adapters_and_score(tiny_config) -> None:
    torch.manual_seed(0)
    peft_model, trainable, changed = _lora_train(
        RlhfForSequenceClassification(tiny_config), "SEQ_CLS", modules_to_save=["score"]
    )
    lora = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 4 * 2
    saved = {n for n in trainable if "modules_to_save" in n and "score" in n}
    assert len(saved) == 2, "the score head's weight and bias"
    assert trainable == lora | saved
    assert changed == lora | saved  # the original score copy and the backbone are untouched
