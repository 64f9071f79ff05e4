"""The decoder's layers, for both layouts of `RlhfConfig.layout`; `rlhf.model` assembles them.

gpt2: LayerNorm, fused q/k/v attention (`c_attn`), GELU MLP (`c_fc`, `c_proj`), learned positions.
llama: RMSNorm, grouped-query attention with rotary positions (`q_proj`, `k_proj`, `v_proj`,
`o_proj`), SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj`). Weights follow transformers'
Llama/Qwen2/Mistral one to one (rotate-half RoPE), so conversion only renames them.

Both layouts share `Block`, so sharding configs that wrap "Block" hold for either.
Shapes: B batch, T query length, S key length (cache + new tokens), C = n_embd, nh = n_head,
nkv = n_kv_head, hs = head_dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from rlhf.config.base import TANH_GELUS

if TYPE_CHECKING:
    from rlhf.model import RlhfConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, 1, T, hs)


class CausalSelfAttention(nn.Module):
    """gpt2 layout: q, k, v from one matmul; positions were added to the embeddings."""

    def __init__(self, config: RlhfConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.layer_idx = config.n_head, layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache=None, rope: Rope | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        # No mask and T > 1: no cache, the fused causal kernel. No mask and T == 1: a decoding step, all keys seen.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The settings of Llama 3.1's RoPE scaling (`RlhfConfig.llama3_rope`; transformers' rope_type 'llama3')."""


def rope_inv_freq(head_dim: int, theta: float, llama3: dict | None = None, device=None) -> torch.Tensor:
    """The rotary frequencies (hs / 2,): theta^(-2i / hs); with `llama3` (Llama 3.1's scaling), those whose
    wavelength exceeds original_max_position_embeddings / low_freq_factor are divided by `factor`, those
    shorter than original_max_position_embeddings / high_freq_factor are kept, and those between are
    interpolated, in the same operations as transformers' `_compute_llama3_parameters`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if llama3 is None:
        return inv_freq
    factor, low, high, context = (llama3[key] for key in LLAMA3_ROPE_KEYS)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, llama3: dict | None = None) -> Rope:
    """cos and sin (B, 1, T, hs) of positions (B, T), computed in fp32 as transformers' Llama does;
    `llama3`: Llama 3.1's frequency scaling (`rope_inv_freq`)."""
    inv_freq = rope_inv_freq(head_dim, theta, llama3, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs / 2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate x (B, h, T, hs) by its positions: the rotate-half convention (first half, second half)."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)  # under autocast q and k are already half precision
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GroupedQueryAttention(nn.Module):
    """llama layout: nkv key/value heads, each shared by nh / nkv query heads; rotary positions."""

    def __init__(self, config: RlhfConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.layer_idx = config.n_head, config.n_kv_head, config.head_dim, layer_idx
        C, hs, bias = config.n_embd, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * hs, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * hs, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * hs, bias=bias)
        self.o_proj = nn.Linear(self.n_head * hs, C, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache=None, rope: Rope | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hs): the cache holds nkv heads
        grouped, group = self.n_kv_head != self.n_head, self.n_head // self.n_kv_head
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if grouped and mask is not None and T == 1:
            # A decoding step with a mask: the query heads sharing a key/value head become that head's
            # query rows (repeat_interleave order), so nothing is copied; the mask (B, 1, 1, S) fits each row.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, group, self.head_dim), k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            if grouped and mask is not None:
                # SDPA's GQA path runs only in its kernels that take no mask; with one, repeat the shared heads.
                k = k.repeat_interleave(group, dim=1)  # (B, nh, S, hs)
                v = v.repeat_interleave(group, dim=1)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1, enable_gqa=grouped and mask is None
            )  # (B, nh, T, hs)
        y = y.reshape(B, self.n_head, T, self.head_dim).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """gpt2 layout: GELU between two Linear layers."""

    def __init__(self, config: RlhfConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation_function in TANH_GELUS else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """llama layout: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: RlhfConfig):
        super().__init__()
        inner, bias = config.n_inner or 4 * config.n_embd, config.mlp_bias
        self.gate_proj = nn.Linear(config.n_embd, inner, bias=bias)
        self.up_proj = nn.Linear(config.n_embd, inner, bias=bias)
        self.down_proj = nn.Linear(inner, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and scaled in the input dtype, as transformers' Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def norm(config: RlhfConfig) -> nn.Module:
    """The layout's normalisation layer over the residual stream."""
    if config.layout == "llama":
        return RMSNorm(config.n_embd, eps=config.rms_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class Block(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: RlhfConfig, layer_idx: int):
        super().__init__()
        llama = config.layout == "llama"
        self.ln_1 = norm(config)
        self.attn = GroupedQueryAttention(config, layer_idx) if llama else CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config)
        self.mlp = SwiGLU(config) if llama else MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, rope)
        return x + self.mlp(self.ln_2(x))


def attention_mask_4d(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, S) from a 2-D padding mask (B, S) over cache + new tokens.

    Query i (absolute position S - T + i) sees the non-pad keys at or before it. Each query also
    sees itself, so that pad queries (whose outputs are ignored) get no all-masked row, whose
    softmax would be NaN.
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - query_length, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    return (attention_mask.bool()[:, None, None, :] & causal) | (k_pos == q_pos)  # (B, 1, T, S)


def position_ids_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Positions (B, T) that count only real tokens, so left or right padding changes nothing."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return positions[:, -query_length:]
