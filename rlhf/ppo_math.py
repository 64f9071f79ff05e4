"""PPO maths for RLHF: masked statistics, KL estimators, KL-penalised rewards, GAE, losses.

Pure functions on tensors (no model, no optimiser), after OpenAI's lm-human-preferences,
"The N+ Implementation Details of RLHF with PPO" (Huang et al., 2024) and torchtune's
``rlhf/rewards.py`` / ``rlhf/loss/ppo.py``. A new variant is a new function, chosen by name
(see ``KL_ESTIMATORS``), never a flag inside an existing one.

Conventions
-----------
* Shapes: ``B`` sequences in the batch, ``T`` response tokens, ``P`` prompt tokens, ``V`` vocab.
  Every per-token tensor is ``(B, T)`` and covers the *response* only.
* ``mask`` is ``(B, T)``, bool or 0/1 float: True on real response tokens *including* the EOS
  token, False on padding after the stop. Response masks are a prefix of each row (padding
  only at the end); a row may be all False (an empty response).
* Masked entries never leak: reductions read only masked positions (via ``torch.where``, so
  NaN/inf garbage in padding is harmless), and per-token outputs are 0 outside the mask.
  A reduction over no masked entry gives 0, not NaN.
* Log-probs are natural-log probabilities of the sampled tokens; ``logits[:, t]`` must already
  be aligned with ``tokens[:, t]`` (the caller does the shift by one).
* Signs: KL is ``log pi(a) - log pi_ref(a)`` (k1); the KL penalty is ``-beta * kl`` added to the
  reward; losses are minimised, so the policy loss is ``-A * ratio`` (pessimistic max of the
  clipped and unclipped terms) and the value loss ``0.5 * (V - R)^2``.
* Advantages, returns and statistics are computed without gradient; losses keep it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Union

import torch
from torch import Tensor

Dim = Optional[Union[int, tuple[int, ...]]]


# ----------------------------------------------------------------------------- masked statistics
def _where(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` where ``mask`` (broadcast), else 0; NaN/inf outside the mask are dropped."""
    return torch.where(mask.bool(), values, 0.0)


def masked_sum(values: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Sum of ``values`` over entries where ``mask`` is True; shapes as in ``masked_mean``."""
    return _where(values, mask).sum() if dim is None else _where(values, mask).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: Dim = None) -> Tensor:
    """Mean over masked entries. values, mask: (B, T) -> scalar, or e.g. (B,) with ``dim=-1``.

    Where nothing is masked the mean is 0 (the count is clamped to at least 1).
    """
    count = masked_sum(torch.ones_like(values), mask, dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked entries. values, mask: (B, T) -> scalar.

    ``unbiased`` applies Bessel's n/(n-1); with fewer than two masked entries the result is 0.
    """
    var = masked_mean((values - masked_mean(values, mask)).square(), mask)
    if unbiased:
        n = masked_sum(torch.ones_like(values), mask)
        var = var * n / (n - 1).clamp_min(1)
    return var


def whiten(values: Tensor, mask: Tensor, mean: Tensor, var: Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> Tensor:
    """``(values - mean) / sqrt(var + eps)`` on masked entries, 0 elsewhere. values, mask: (B, T);
    mean, var: scalars (from this batch, or from the batches of every process) -> (B, T).

    ``shift_mean=False`` adds the mean back (only the scale changes).
    """
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _where(whitened, mask)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = False,
                  eps: float = 1e-8) -> Tensor:
    """Normalise to mean 0, std 1 over masked entries. values, mask: (B, T) -> (B, T).

    ``shift_mean=False`` adds the mean back (only the scale changes), as for reward whitening in
    the N+ details. The std is the population one (``unbiased=False``, as lm-human-preferences'
    ``tf.nn.moments``). Entries outside the mask are set to 0.
    """
    mean = masked_mean(values, mask)
    return whiten(values, mask, mean, masked_var(values, mask, unbiased=unbiased), shift_mean, eps)


# ----------------------------------------------------------------------------- KL and rewards
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimate ``log p - log q`` (unbiased, may be negative). (B, T) -> (B, T)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate ``(r - 1) - log r``, ``r = q/p = exp(ref - logp)``. (B, T) -> (B, T).

    Schulman's low-variance unbiased estimator of the *value* of KL(p || q) under samples of p;
    always >= 0. For logging or a differentiated loss term only: as a detached per-token reward
    (the KL penalty's path) its score-function gradient ``E_p[k3 * grad log p]`` is not
    ``grad KL``, so it is not in ``KL_ESTIMATORS``.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1}
"""Per-token KL estimates usable as the detached reward penalty ``-beta * kl``: only k1, whose
score-function gradient ``E_p[k1 * grad log p]`` is exactly ``grad KL(p || q)``."""


def _last_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last True in each row of ``mask`` (B, T) -> (B,) long, and (B,) "any True"."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(-1)
    return last.clamp_min(0), last >= 0


@torch.no_grad()
def kl_penalised_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float
                         ) -> tuple[Tensor, Tensor]:
    """Per-token rewards: ``-beta * kl`` on masked tokens plus the score on each row's last one.

    scores: (B,) sequence scores; kl: (B, T) per-token KL; mask: (B, T).
    Returns ``(rewards, non_score_reward)``, both (B, T) and 0 outside the mask. The score lands
    at the last masked token (``mask.sum(-1) - 1`` for a prefix mask, the EOS if there is one);
    a row whose mask is all False gets no score.
    """
    non_score = _where(-beta * kl, mask)
    last, has_tokens = _last_index(mask)
    score = torch.where(has_tokens, scores.to(non_score.dtype), 0.0)
    return non_score.scatter_add(1, last[:, None], score[:, None]), non_score


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation, backwards over T. All inputs (B, T).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    the value after the last real token is 0 (the episode ends at EOS or truncation) and
    padding rewards/values are ignored. Returns ``(advantages, returns = advantages + values)``,
    both (B, T), 0 outside the mask. Whitening the advantages is the caller's choice.
    """
    m = mask.to(values.dtype)
    rewards, values = _where(rewards, mask), _where(values, mask)
    advantages = torch.zeros_like(values)
    next_adv = next_value = torch.zeros_like(values[:, 0])  # rebound below, never mutated
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, _where(advantages + values, mask)


# ----------------------------------------------------------------------------- losses
def clipped_policy_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                         clip_range: float) -> Tensor:
    """Per-token PPO clipped surrogate, no reduction. All inputs (B, T) -> (B, T).

    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``, ``ratio = exp(logprobs - old)``;
    gradient through ``logprobs``. No mask: padding holds whatever the inputs give there.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


@torch.no_grad()
def clip_statistics(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float) -> dict[str, Tensor]:
    """Detached scalars of a clipped update, all inputs (B, T): ``clipfrac`` share of tokens where
    the clipped term is strictly larger (so used, with zero gradient); ``approx_kl`` = masked mean
    of ``0.5 * (logprobs - old)^2`` (the k2 estimate, as in the N+ details); ``ratio_mean``;
    ``ratio_max`` (-inf if nothing is masked)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return {
        "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
        "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": torch.where(mask.bool(), ratio, float("-inf")).max(),
    }


def policy_loss_clipped(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate. All inputs (B, T); gradient flows through ``logprobs`` only.

    Loss = masked mean over every token of the batch of ``clipped_policy_terms`` (scalar), with
    ``clip_statistics``.
    """
    loss = masked_mean(clipped_policy_terms(logprobs, old_logprobs, advantages, clip_range), mask)
    return loss, clip_statistics(logprobs, old_logprobs, advantages, mask, clip_range)


def value_loss_clipped(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss. All inputs (B, T); gradient flows through ``values`` only.

    ``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))`` (scalar).
    Stats: ``value_clipfrac``, the share of tokens where the clipped term is strictly larger.
    """
    eps = clip_range_value
    clipped_values = old_values + torch.clamp(values - old_values, -eps, eps)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask)
    return loss, {"value_clipfrac": clipfrac}


# ----------------------------------------------------------------------------- logits
def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits as float32 (log-softmax over a large vocab needs it)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits), in nats. logits (B, T, V) -> (B, T); -inf logits allowed."""
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``tokens``: (B, T, V), (B, T) long -> (B, T).

    Use the sampling temperature so the log-probs match the distribution that was sampled.
    """
    scaled = _upcast(logits) if temperature == 1.0 else _upcast(logits) / temperature  # no (B, T, V) copy at 1
    picked = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked entries. (B, T) -> scalar.

    1 is a perfect value head, 0 no better than predicting the mean, < 0 worse; NaN/inf when
    the returns are constant.
    """
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask)


# ----------------------------------------------------------------------------- KL controllers
@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): steers the observed KL towards ``target``.

    ``value`` is the current beta; ``horizon`` is in samples (episodes), as is ``n_steps``. The
    proportional error is clipped to +-0.2, so one update multiplies beta by at most
    ``1 +- 0.2 * n_steps / horizon`` and k updates by at most ``(1 +- 0.2 * n_steps / horizon)^k``:
    a horizon much longer than the run's episodes leaves beta where it started.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        """``value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": float(self.value), "target": float(self.target),
                "horizon": int(self.horizon)}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target = float(state["value"]), float(state["target"])
        self.horizon = int(state["horizon"])


@dataclass
class FixedKLController:
    """A constant KL coefficient ``value`` (beta); ``update`` does nothing."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# ----------------------------------------------------------------------------- rollout container
@dataclass
class Rollout:
    """One batch of sampled episodes, as every RL algorithm trains on it. Every tensor field has the
    batch B as first dim; the fields after ``prompt_length`` are only PPO's (None without a critic)."""

    query_responses: Tensor
    """(B, P+T) long: left-padded prompts followed by the sampled responses (padded after stop)."""
    attention_mask: Tensor
    """(B, P+T): 1 on real prompt and response tokens, 0 on padding."""
    response_mask: Tensor
    """(B, T) bool: True on real response tokens including the EOS, False after the stop."""
    logprobs: Tensor
    """(B, T): policy log-probs of the response tokens at sampling time, temperature-scaled, from the
    same forward the update computes them with (so the first ratio is 1)."""
    ref_logprobs: Tensor
    """(B, T): reference (SFT) model log-probs of the same tokens, same temperature."""
    scores: Tensor
    """(B,): reward-model scores, normalised, after the no-EOS penalty."""
    advantages: Tensor
    """(B, T): per-token advantages (GAE for PPO; group or batch baselines for the critic-free algorithms)."""
    prompt_length: int
    """P: the response starts at column P of ``query_responses``."""
    values: Optional[Tensor] = None
    """(B, T): value-head estimates at sampling."""
    rewards: Optional[Tensor] = None
    """(B, T): KL-penalised per-token rewards (``kl_penalised_rewards``)."""
    returns: Optional[Tensor] = None
    """(B, T): value targets, advantages + values."""

    def __len__(self) -> int:
        return self.query_responses.shape[0]

    def select(self, index: Tensor) -> Rollout:
        """The rows ``index`` ((M,) long, or (B,) bool) of every tensor, as a new ``Rollout``."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{k: v[index] if isinstance(v, Tensor) else v for k, v in current.items()})

    def trimmed(self) -> Rollout:
        """The same episodes without the columns that are padding in every row: the prompts' common left
        padding and the responses' common tail after the last stop. Every masked quantity the losses read
        is unchanged (positions come from the attention mask), and a minibatch costs its longest real
        sequence instead of the batch's full width. Keeps at least one response column."""
        P, T = self.prompt_length, self.response_mask.shape[1]
        padding = ~self.attention_mask[:, :P].bool().any(0)  # (P,): prompt columns that are padding in every row
        lead = int(padding.long().cumprod(0).sum())
        used = self.response_mask.any(0).nonzero()
        keep = int(used.max()) + 1 if len(used) else 1
        if lead == 0 and keep == T:
            return self
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        trimmed = {k: v[:, :keep] if isinstance(v, Tensor) and v.dim() == 2 and k not in ("query_responses", "attention_mask")
                   else v for k, v in current.items()}  # fmt: skip
        trimmed["query_responses"] = self.query_responses[:, lead : P + keep]
        trimmed["attention_mask"] = self.attention_mask[:, lead : P + keep]
        trimmed["prompt_length"] = P - lead
        return Rollout(**trimmed)
