"""Conversion both ways between our decoder and transformers' `GPT2LMHeadModel`.

The layouts match name for name; GPT-2's `Conv1D` stores `(in, out)` weights where our
`nn.Linear` stores `(out, in)`, so those four matrices per block are transposed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.model import SUPPORTED_ACTIVATIONS, RlhfConfig, RlhfForCausalLM

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
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
    config = GPT2Config(
        embd_pdrop=c.dropout, resid_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_word_embeddings,
        **{k: getattr(c, k) for k in SHARED_CONFIG_KEYS},
    )
    gpt2 = GPT2LMHeadModel(config)
    missing, unexpected = gpt2.load_state_dict(_transpose_conv1d(model.state_dict()), strict=False)
    if unexpected or any(not k.endswith(".attn.bias") for k in missing):
        raise RuntimeError(f"weight layout mismatch: missing {missing}, unexpected {unexpected}")
    return gpt2.to(model.dtype)


def convert_directory(src: str | Path, out: str | Path, to_gpt2: bool) -> None:
    """Convert a `save_pretrained` directory; tokenizer files, if present, are copied along."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; expected a save_pretrained directory")
    if to_gpt2:
        converted = rlhf_to_gpt2(RlhfForCausalLM.from_pretrained(src))
    else:
        converted = gpt2_to_rlhf(GPT2LMHeadModel.from_pretrained(src))
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
