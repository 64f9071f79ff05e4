"""Critic-free RL maths for RLHF: GRPO, Dr. GRPO, RLOO and REINFORCE++ advantages and losses.

Pure functions on tensors (no model, no optimiser), after TRL's ``GRPOTrainer`` / ``RLOOTrainer``,
"Understanding R1-Zero-Like Training" (Dr. GRPO, Liu et al., 2025), "Back to Basics" (RLOO,
Ahmadian et al., 2024) and OpenRLHF's REINFORCE++. Built on ``rlhf.ppo_math`` and following its
conventions; a variant is a new function chosen by name (see ``GROUP_ADVANTAGES`` and
``LOSS_AGGREGATIONS``), never a flag inside an existing one.

Conventions
-----------
* Shapes: ``B`` sequences in the batch, ``T`` response tokens, ``G`` the group size. Per-token
  tensors are ``(B, T)`` and cover the *response* only; sequence scores are ``(B,)``.
* Groups: a batch of ``B = n_prompts * G`` responses is laid out group by group, rows
  ``[g*G, (g+1)*G)`` answer prompt ``g``. Functions taking ``group_size`` raise ``ValueError`` when
  ``B`` is not a multiple of it.
* ``mask`` is ``(B, T)``, bool or 0/1 float, a prefix mask: True on real response tokens
  *including* the EOS, False on padding after the stop; a row may be all False.
* Masked entries never leak: reductions read only masked positions (NaN/inf garbage in padding
  is harmless, in the value and in the gradient of the losses), per-token outputs are 0 outside
  the mask, and a reduction over no masked entry gives 0, not NaN.
* A group whose scores are all equal (a group of one included) has advantage exactly 0: it
  carries no signal about which response is better.
* Advantages, returns and scores are computed without gradient; losses keep it (through
  ``logprobs`` only). Losses are minimised: the policy term is ``-A * ratio``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf.ppo_math import _where, clip_statistics, clipped_policy_terms, gae_advantages, kl_k3, masked_mean, masked_sum, masked_whiten


# ----------------------------------------------------------------------------- group advantages
def _grouped(scores: Tensor, group_size: int) -> Tensor:
    """scores (B,) -> (B / G, G) float view, one row per prompt; ValueError on a bad layout."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a multiple of group_size "
                         f"{group_size} (rows [g*G, (g+1)*G) must answer prompt g)")
    if not scores.is_floating_point():
        scores = scores.to(torch.get_default_dtype())
    return scores.reshape(-1, group_size)


def _centred(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """(N, G) -> ``r - group mean`` (N, G), exactly 0 in constant groups, and (N, 1) "constant"."""
    constant = (grouped == grouped[:, :1]).all(-1, keepdim=True)
    centred = grouped - grouped.mean(-1, keepdim=True)
    return torch.where(constant, 0.0, centred), constant


@torch.no_grad()
def grpo_advantages(scores: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO: ``(r - group mean) / (group std + eps)``. scores (B,) -> (B,).

    The std is the unbiased (Bessel) one, as TRL's ``GRPOTrainer``; a constant group (a group of
    size 1 included) gives exactly 0, not NaN.
    """
    grouped = _grouped(scores, group_size)
    centred, constant = _centred(grouped)
    if group_size == 1:  # std of one sample is undefined; the advantage is 0 anyway
        return centred.reshape(-1)
    std = grouped.std(-1, keepdim=True)
    return torch.where(constant, 0.0, centred / (std + eps)).reshape(-1)


@torch.no_grad()
def dr_grpo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al., 2025): ``r - group mean``, no std division. scores (B,) -> (B,)."""
    return _centred(_grouped(scores, group_size))[0].reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: leave-one-out baseline ``r_i - mean_{j != i} r_j``. scores (B,) -> (B,).

    Equal to ``(G * r_i - sum_g) / (G - 1) = G / (G - 1) * (r_i - group mean)``; needs G >= 2.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    centred, _ = _centred(_grouped(scores, group_size))
    return (centred * (group_size / (group_size - 1))).reshape(-1)


GROUP_ADVANTAGES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
"""Sequence advantages from grouped scores, by name: each ``(scores (B,), group_size) -> (B,)``."""


@torch.no_grad()
def kl_penalised_scores(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """RLOO's "KL in the reward" at sequence level: ``scores - beta * sum_masked(kl)``.

    scores: (B,); kl: (B, T) per-token KL (e.g. ``ppo_math.kl_k1``); mask: (B, T) -> (B,).
    An all-False row keeps its score.
    """
    total_kl = masked_sum(kl, mask, dim=-1)
    if not scores.is_floating_point():
        scores = scores.to(total_kl.dtype)
    return scores - beta * total_kl


# ----------------------------------------------------------------------------- REINFORCE++
@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over each row's masked tokens. rewards, mask: (B, T) -> (B, T).

    The return after the last real token is 0; padding rewards are ignored and outputs are 0
    outside the mask. For REINFORCE++ the rewards come from ``ppo_math.kl_penalised_rewards``
    (``-beta * kl`` per token plus the score at the last one). This is GAE with zero values and
    ``lam = 1`` (``delta_t = r_t``), so it reuses ``ppo_math.gae_advantages``.
    """
    returns, _ = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return returns


@torch.no_grad()
def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (single process): discounted returns whitened over the whole batch's masked
    tokens (``ppo_math.masked_whiten``: population std, mean shifted to 0). (B, T) -> (B, T).

    Across processes, whiten ``discounted_returns`` with ``ppo_math.whiten`` and the global
    mean and variance instead.
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


@torch.no_grad()
def token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast a sequence advantage to its masked tokens, 0 elsewhere. (B,), (B, T) -> (B, T)."""
    return _where(advantages[:, None].expand(mask.shape), mask)


# ----------------------------------------------------------------------------- loss aggregation
def token_mean(losses: Tensor, mask: Tensor, max_tokens: int) -> Tensor:
    """Masked mean over every token of the batch (as ``ppo_math.policy_loss_clipped``; DAPO).

    losses, mask: (B, T) -> scalar; ``max_tokens`` unused (same signature as the others).
    Longer responses weigh more, in proportion to their length.
    """
    return masked_mean(losses, mask)


def sequence_mean(losses: Tensor, mask: Tensor, max_tokens: int) -> Tensor:
    """Mean over sequences of each sequence's masked token mean (original GRPO).

    losses, mask: (B, T) -> scalar; ``max_tokens`` unused. Rows with no masked token are left
    out of the mean (they have no loss to average); 0 if every row is empty. Each token weighs
    ``1 / (n_rows * its row's length)``: short responses' tokens weigh more (Dr. GRPO's length bias).
    """
    row_means = masked_mean(losses, mask, dim=-1)
    return masked_mean(row_means, mask.bool().any(-1))


def token_sum(losses: Tensor, mask: Tensor, max_tokens: int) -> Tensor:
    """Sum of masked token losses over the constant ``B * max_tokens`` (Dr. GRPO, no length bias).

    losses, mask: (B, T) -> scalar; ``max_tokens`` is the generation budget, at least ``T``
    (ValueError otherwise), so the normaliser does not depend on the batch's lengths.
    """
    if max_tokens < max(mask.shape[-1], 1):
        raise ValueError(f"max_tokens ({max_tokens}) must be >= 1 and >= the response width "
                         f"T = {mask.shape[-1]}")
    return masked_sum(losses, mask) / (mask.shape[0] * max_tokens)


Aggregation = Callable[[Tensor, Tensor, int], Tensor]
LOSS_AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": token_mean, "sequence_mean": sequence_mean, "token_sum": token_sum}
"""Per-token losses (B, T) to a scalar, by name: each ``(losses, mask, max_tokens) -> scalar``."""


def _aggregation(name: str) -> Aggregation:
    """``LOSS_AGGREGATIONS[name]``, or a ValueError naming the choices."""
    if name not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {name!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[name]


# ----------------------------------------------------------------------------- losses
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float, aggregation: str, max_tokens: int
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy loss aggregated by name (``LOSS_AGGREGATIONS``). All inputs (B, T).

    advantages are per token (``token_advantages`` for sequence ones). Returns the scalar loss
    and the stats of ``ppo_math.policy_loss_clipped`` (``clipfrac``, ``approx_kl``, ``ratio_mean``,
    ``ratio_max``), which it equals with ``"token_mean"``. Padding is zeroed before any maths, so
    garbage there reaches neither the loss nor the gradient (exactly 0 on padded ``logprobs``).
    """
    aggregate = _aggregation(aggregation)
    logprobs, old_logprobs = _where(logprobs, mask), _where(old_logprobs, mask)
    advantages = _where(advantages, mask)
    loss = aggregate(clipped_policy_terms(logprobs, old_logprobs, advantages, clip_range),
                     mask, max_tokens)
    return loss, clip_statistics(logprobs, old_logprobs, advantages, mask, clip_range)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, aggregation: str,
            max_tokens: int) -> Tensor:
    """GRPO's KL-to-reference loss term: ``ppo_math.kl_k3`` aggregated by name. (B, T) -> scalar.

    Gradient through ``logprobs`` (per token ``1 - exp(ref - logp)`` before aggregation); the
    caller weighs it by beta. Padding is zeroed first, as in ``policy_loss``.
    """
    aggregate = _aggregation(aggregation)
    logprobs, ref_logprobs = _where(logprobs, mask), _where(ref_logprobs, mask)
    return aggregate(kl_k3(logprobs, ref_logprobs), mask, max_tokens)
