"""Tests for rlhf.model's llama layout: padding invariance of both heads with grouped-query attention,
save/load through the Auto classes, old configs loading as gpt2, config checks, gradient
checkpointing, and LoRA's default targets per layout."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import make_config, randomize_
from rlhf.config.base import LORA_TARGETS, LORA_TARGETS_BY_LAYOUT, LoraSettings
from rlhf.model import LAYOUTS, RlhfConfig, RlhfForCausalLM, RlhfForSequenceClassification

LENGTHS = [7, 4, 1, 6]
LLAMA = dict(layout="llama", n_embd=48, n_head=6, n_kv_head=2, n_inner=40, rope_theta=1000.0, vocab_size=101)


def llama_config(**overrides) -> RlhfConfig:
    return make_config(**{**LLAMA, **overrides})


def _padded(vocab: int, side: str, junk: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab, (n,), generator=gen) for n in LENGTHS]
    width = max(LENGTHS)
    ids = torch.full((len(rows), width), junk, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return rows, ids, mask


def _span(side: str, width: int, n: int) -> slice:
    return slice(width - n, width) if side == "left" else slice(0, n)


@pytest.mark.parametrize("n_kv_head", [1, 2, 6])
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_padding_invariance(side, n_kv_head) -> None:
    """A padded row (masked SDPA, repeated kv heads) equals the row alone (fused causal GQA kernel)."""
    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(llama_config(n_kv_head=n_kv_head))).eval()
    rows, ids, mask = _padded(101, side, junk=5)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        other = model(ids.masked_fill(mask == 0, 17), attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(batch[i, _span(side, ids.shape[1], len(r))], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(other[i, _span(side, ids.shape[1], len(r))], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(batch).all()


def test_scalar_head_on_the_llama_layout() -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForSequenceClassification(llama_config(attention_bias=True))).eval()
    rows, ids, mask = _padded(101, "left", junk=9, seed=2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(out.logits[i], model(r[None]).token_scores[0, -1], atol=1e-5, rtol=0)


def test_parameter_names_and_shapes() -> None:
    model = RlhfForCausalLM(llama_config(attention_bias=True, tie_word_embeddings=False))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["transformer.h.0.attn.q_proj.weight"] == (48, 48)
    assert shapes["transformer.h.0.attn.k_proj.weight"] == shapes["transformer.h.0.attn.v_proj.weight"] == (16, 48)
    assert shapes["transformer.h.0.attn.k_proj.bias"] == (16,) and "transformer.h.0.attn.o_proj.bias" not in shapes
    assert shapes["transformer.h.0.mlp.gate_proj.weight"] == (40, 48) and "transformer.h.0.mlp.down_proj.bias" not in shapes
    assert shapes["transformer.h.0.ln_1.weight"] == (48,) and "transformer.h.0.ln_1.bias" not in shapes
    assert "transformer.wpe.weight" not in shapes and model.lm_head.weight is not model.transformer.wte.weight
    tied = RlhfForCausalLM(llama_config())
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_save_and_load_through_auto_classes(tmp_path) -> None:
    import rlhf  # noqa: F401
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(llama_config(tie_word_embeddings=False, hf_architecture="MistralForCausalLM"))).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    c = loaded.config
    assert (c.layout, c.n_kv_head, c.rope_theta, c.hf_architecture) == ("llama", 2, 1000.0, "MistralForCausalLM")
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_configs_saved_before_layouts_load_as_gpt2(tmp_path) -> None:
    model = RlhfForCausalLM(make_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("layout", "n_kv_head", "head_dim", "rope_theta", "rms_norm_eps", "attention_bias", "mlp_bias", "hf_architecture"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RlhfForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.layout == "gpt2" and loaded.config.n_kv_head == loaded.config.n_head
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(layout="mamba"), "layout must be one of gpt2, llama"),
        (dict(layout="llama", n_head=6, n_kv_head=4), "multiple of n_kv_head"),
        (dict(layout="gpt2", n_kv_head=2), "llama-layout settings"),
        (dict(layout="gpt2", attention_bias=True), "llama-layout settings"),
        (dict(layout="llama", n_embd=30, n_head=2, head_dim=15), "must be even"),
        (dict(layout="gpt2", llama3_rope=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=32)), "llama3_rope: a llama-layout setting"),
        (dict(layout="llama", llama3_rope=dict(factor=8.0)), "with exactly the keys factor, low_freq_factor"),
    ],
)
def test_config_checks(overrides, words) -> None:
    with pytest.raises(ValueError, match=words):
        make_config(**{"n_embd": 48, **overrides})


def test_gradient_checkpointing_matches() -> None:
    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(llama_config())).train()
    ids = torch.randint(0, 101, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def loss_and_grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = loss_and_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    for name, grad in loss_and_grads().items():
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=0, msg=name)


def test_lora_targets_per_layout() -> None:
    """One list of layouts; the default targets wrap exactly each layout's Linear layers."""
    from peft import get_peft_model

    from rlhf.training import peft_config

    assert tuple(LORA_TARGETS_BY_LAYOUT) == LAYOUTS
    for layout in LAYOUTS:
        config = llama_config() if layout == "llama" else make_config()
        model = RlhfForCausalLM(config)
        linear = {name.rsplit(".", 1)[-1] for name, m in model.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linear == set(LORA_TARGETS_BY_LAYOUT[layout]), layout
        peft = get_peft_model(model, peft_config(LoraSettings()))
        wrapped = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft.named_parameters() if ".lora_A." in name}
        assert wrapped == set(LORA_TARGETS_BY_LAYOUT[layout]), layout
    with pytest.raises(ValueError, match="'attn' matches no layer .* a llama-layout model has q_proj"):
        LoraSettings(target_modules=["attn"])
    assert LoraSettings(target_modules=["q_proj"]).target_modules == ["q_proj"] and "c_fc" in LORA_TARGETS


def test_llama3_rope_frequencies_by_hand() -> None:
    """head_dim 4, theta 100: frequencies 1 and 0.1, wavelengths 2 pi and 20 pi."""
    import math

    from rlhf.layers import rope_inv_freq

    assert rope_inv_freq(4, 100.0).tolist() == pytest.approx([1.0, 0.1])
    # original context 32: long wavelengths past 32 / low = 32 are divided by the factor, short ones under 32 / 4 = 8 kept.
    low_and_high = dict(factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    assert rope_inv_freq(4, 100.0, low_and_high).tolist() == pytest.approx([1.0, 0.05])
    # original context 100: 20 pi lies between 100 / 4 = 25 and 100, so it is interpolated with weight
    # s = (100 / (20 pi) - 1) / (4 - 1): (1 - s) * 0.1 / 2 + s * 0.1.
    medium = dict(low_and_high, original_max_position_embeddings=100)
    s = (100 / (20 * math.pi) - 1) / 3
    assert rope_inv_freq(4, 100.0, medium).tolist() == pytest.approx([1.0, (1 - s) * 0.05 + s * 0.1])
