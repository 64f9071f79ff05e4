"""Conversion both ways between our decoder and transformers' causal LMs.

gpt2 layout <-> `GPT2LMHeadModel`: the layouts match name for name; GPT-2's `Conv1D` stores
`(in, out)` weights where our `nn.Linear` stores `(out, in)`, so those four matrices per block are
transposed.

llama layout <-> `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`: the same tensors
under other names (`model.layers.N.self_attn.q_proj` is our `transformer.h.N.attn.q_proj`); both
use the rotate-half RoPE, so no permutation. The source class is recorded in
`RlhfConfig.hf_architecture` and written back on the way out.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel
from transformers.initialization import no_init_weights

from rlhf.config.base import SUPPORTED_ACTIVATIONS
from rlhf.model import LLAMA3_ROPE_KEYS, RlhfConfig, RlhfForCausalLM

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip
SHARED_CONFIG_KEYS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


def _transpose_conv1d(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v) for k, v in state_dict.items()}


def gpt2_to_rlhf(gpt2: GPT2LMHeadModel) -> RlhfForCausalLM:
    """Our model with the same weights and the same function as `gpt2`."""
    g = gpt2.config
    if g.scale_attn_by_inverse_layer_idx or g.reorder_and_upcast_attn or not g.scale_attn_weights:
        raise ValueError("GPT-2 attention-scaling variants are not supported by the rlhf decoder")
    if g.activation_function not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"GPT-2 activation {g.activation_function!r} is not supported")
    config = RlhfConfig(
        dropout=g.resid_pdrop, tie_word_embeddings=g.tie_word_embeddings, **{k: getattr(g, k) for k in SHARED_CONFIG_KEYS}
    )
    model = RlhfForCausalLM(config)
    state = {k: v for k, v in gpt2.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model.load_state_dict(_transpose_conv1d(state), strict=True)
    return model.to(gpt2.dtype)


def rlhf_to_gpt2(model: RlhfForCausalLM) -> GPT2LMHeadModel:
    """transformers' `GPT2LMHeadModel` with the same weights and function as `model`."""
    c = model.config
    if c.layout != "gpt2":
        raise ValueError(f"a {c.layout}-layout model has no GPT-2 equivalent (convert it with --to-hf)")
    config = GPT2Config(
        embd_pdrop=c.dropout, resid_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_word_embeddings,
        **{k: getattr(c, k) for k in SHARED_CONFIG_KEYS},
    )
    gpt2 = GPT2LMHeadModel(config)
    missing, unexpected = gpt2.load_state_dict(_transpose_conv1d(model.state_dict()), strict=False)
    if unexpected or any(not k.endswith(".attn.bias") for k in missing):
        raise RuntimeError(f"weight layout mismatch: missing {missing}, unexpected {unexpected}")
    return gpt2.to(model.dtype)


LLAMA_FAMILY = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_HF_ARCHITECTURES = ("GPT2LMHeadModel",) + LLAMA_FAMILY
"""The transformers classes `hf_to_rlhf` reads and `rlhf_to_hf` writes."""
LLAMA_RENAMES = (  # (ours, transformers') name fragments; each of our names holds at most one of each
    ("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."),
    (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."), (".attn.", ".self_attn."),
)  # fmt: skip


def _rename(state_dict: dict[str, torch.Tensor], to_hf: bool) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state_dict.items():
        for ours, theirs in LLAMA_RENAMES:
            name = name.replace(ours, theirs) if to_hf else name.replace(theirs, ours)
        renamed[name] = tensor
    return renamed


def _llama_config(hf, architecture: str) -> RlhfConfig:
    """Our llama-layout config for a Llama, Qwen2 or Mistral config; ValueError names what is unsupported."""
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ValueError(f"{architecture}: rope scaling type {rope['rope_type']!r} is not supported (only default RoPE and llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{architecture}: partial_rotary_factor {rope['partial_rotary_factor']} is not supported")
    if hf.hidden_act != "silu":
        raise ValueError(f"{architecture}: hidden_act {hf.hidden_act!r} is not supported (only silu)")
    window = getattr(hf, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(hf, "layer_types", None) or [])
    if sliding or (architecture == "MistralForCausalLM" and window is not None and window < hf.max_position_embeddings):
        raise ValueError(f"{architecture}: sliding-window attention (window {window} of a {hf.max_position_embeddings}-token context) is not supported")
    if architecture == "LlamaForCausalLM" and hf.attention_bias:
        raise ValueError(f"{architecture}: attention_bias (a bias on o_proj too) is not supported")
    return RlhfConfig(
        layout="llama", hf_architecture=architecture,
        vocab_size=hf.vocab_size, n_positions=hf.max_position_embeddings, n_embd=hf.hidden_size,
        n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None), n_inner=hf.intermediate_size, rope_theta=rope.get("rope_theta", 10000.0),
        llama3_rope={key: rope[key] for key in LLAMA3_ROPE_KEYS} if rope.get("rope_type") == "llama3" else None,
        rms_norm_eps=hf.rms_norm_eps, attention_bias=architecture == "Qwen2ForCausalLM",
        mlp_bias=bool(getattr(hf, "mlp_bias", False)), dropout=0.0, initializer_range=hf.initializer_range,
        tie_word_embeddings=hf.tie_word_embeddings,
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
    )  # fmt: skip


def hf_to_rlhf(model: PreTrainedModel) -> RlhfForCausalLM:
    """Our model with the same weights and function as `model`, one of `SUPPORTED_HF_ARCHITECTURES`."""
    architecture = type(model).__name__
    if architecture == "GPT2LMHeadModel":
        return gpt2_to_rlhf(model)
    if architecture not in LLAMA_FAMILY:
        raise ValueError(f"architecture {architecture} is not supported (supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)})")
    with no_init_weights():  # every weight is loaded next: skip the random init (minutes at 7B)
        ours = RlhfForCausalLM(_llama_config(model.config, architecture))
    ours.tie_weights()  # tying is part of the init skipped above
    ours.load_state_dict(_rename(model.state_dict(), to_hf=False), strict=True)
    return ours.to(model.dtype)


def rlhf_to_hf(model: RlhfForCausalLM) -> PreTrainedModel:
    """The transformers model with the same weights and function as `model`: `GPT2LMHeadModel` for the
    gpt2 layout; for the llama layout the class recorded in `hf_architecture`, else Qwen2 (q/k/v biases)
    or Llama."""
    import transformers

    c = model.config
    if c.layout == "gpt2":
        return rlhf_to_gpt2(model)
    architecture = c.hf_architecture or ("Qwen2ForCausalLM" if c.attention_bias else "LlamaForCausalLM")
    if c.attention_bias and architecture != "Qwen2ForCausalLM":
        architecture = "Qwen2ForCausalLM"  # the one family with q/k/v biases and none on o_proj
    if c.mlp_bias and architecture != "LlamaForCausalLM":
        raise ValueError(f"mlp_bias has no {architecture} equivalent")
    extra = {"Qwen2ForCausalLM": dict(use_sliding_window=False), "MistralForCausalLM": dict(sliding_window=None),
             "LlamaForCausalLM": dict(attention_bias=False, mlp_bias=c.mlp_bias)}[architecture]  # fmt: skip
    model_class = getattr(transformers, architecture)
    config = model_class.config_class(
        vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, intermediate_size=c.n_inner or 4 * c.n_embd, hidden_act="silu",
        rope_parameters={"rope_type": "llama3", "rope_theta": c.rope_theta, **c.llama3_rope} if c.llama3_rope
        else {"rope_type": "default", "rope_theta": c.rope_theta}, rms_norm_eps=c.rms_norm_eps,
        initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, **extra,
    )  # fmt: skip
    with no_init_weights():
        hf = model_class(config)
    hf.tie_weights()
    hf.load_state_dict(_rename(model.state_dict(), to_hf=True), strict=True)
    return hf.to(model.dtype)


def convert_directory(src: str | Path, out: str | Path, to_gpt2: bool | None = None, *, to_hf: bool | None = None) -> None:
    """Convert a `save_pretrained` directory; tokenizer files, if present, are copied along.

    Give one direction: `to_gpt2` converts to or from `GPT2LMHeadModel` only (`--to-gpt2`/`--from-gpt2`);
    `to_hf` to or from any of `SUPPORTED_HF_ARCHITECTURES` (`--to-hf`/`--from-hf`). Weights are read in
    fp32 (sharded or bf16 checkpoints alike) and written in the source's dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(src), Path(out)
    if (to_gpt2 is None) == (to_hf is None):
        raise TypeError("convert_directory: give exactly one of to_gpt2 and to_hf")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; expected a save_pretrained directory")
    if to_gpt2 is not None:
        if to_gpt2:
            converted = rlhf_to_gpt2(RlhfForCausalLM.from_pretrained(src))
        else:
            converted = gpt2_to_rlhf(GPT2LMHeadModel.from_pretrained(src))
    else:
        config = AutoConfig.from_pretrained(src)
        found = getattr(config, "architectures", None) or []
        wanted = ("RlhfForCausalLM",) if to_hf else SUPPORTED_HF_ARCHITECTURES
        if not any(name in wanted for name in found):
            raise ValueError(f"architecture {', '.join(found) or 'unknown'} is not supported (expected {', '.join(wanted)})")
        architecture = next(name for name in found if name in wanted)
        if architecture in LLAMA_FAMILY:
            _llama_config(config, architecture)  # an unsupported variant is refused before its weights load
        source_dtype = getattr(config, "dtype", None) or torch.float32
        source_dtype = getattr(torch, source_dtype) if isinstance(source_dtype, str) else source_dtype
        source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        converted = (rlhf_to_hf(source) if to_hf else hf_to_rlhf(source)).to(source_dtype)
    # Written into a hidden sibling folder, then moved in file by file: a failure leaves `out` as it was.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        converted.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        files = sorted(staging.iterdir())
        for file in files:  # a folder in the way would stop the moves half-way
            if (out / file.name).is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out / file.name))
        out.mkdir(exist_ok=True)
        for file in files:
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
