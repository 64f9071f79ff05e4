"""Evaluating a policy on held-out prompts: its samples, their reward-model scores, judge scores
and KL to a reference policy. Every policy answers the same prompts with the same sampling seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.generation import generate, left_pad
from rlhf.ppo_math import kl_k1
from rlhf.responses import decode_responses, encode_prompts, prompt_text


@dataclass
class PolicySamples:
    """One sampled response per prompt with per-response measurements (lists aligned with prompts)."""

    prompts: list[Any]
    responses: list[str]
    rm_scores: list[float] = field(default_factory=list)
    """Normalised reward-model scores (mean 0, std 1 under the SFT policy)."""
    judge_scores: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    """Sum over the response of log pi(a) - log pi_ref(a) (k1; its expectation is the KL)."""
    lengths: list[int] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)

    def mean(self, name: str) -> float:
        values = getattr(self, name)
        return float(sum(values) / len(values)) if values else float("nan")


@torch.no_grad()
def sample_policy(
    policy,
    tokenizer,
    prompts: list[Any],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    reward_model=None,
    reference=None,
    judge: Callable | None = None,
    batch_size: int = 64,
) -> PolicySamples:
    """Sample responses (seeded per batch) and measure them."""
    from rlhf.ppo import normalised_scores, response_logprobs

    device = next(policy.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    limit = policy.config.n_positions - max_new_tokens
    result = PolicySamples(prompts=list(prompts), responses=[])
    for number, start in enumerate(range(0, len(encoded), batch_size)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + number)
        ids, mask = left_pad([e[-limit:] for e in encoded[start : start + batch_size]], tokenizer.pad_token_id, device)
        sample = generate(policy, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          temperature=temperature, generator=generator)  # fmt: skip
        result.responses += decode_responses(tokenizer, sample.responses, sample.response_mask)
        result.lengths += sample.response_mask.sum(-1).tolist()
        result.stopped += sample.stopped.tolist()
        if reward_model is not None:
            result.rm_scores += normalised_scores(reward_model, sample.sequences, sample.attention_mask).tolist()
        if reference is not None:
            ref_logprobs, _ = response_logprobs(reference, sample.sequences, sample.attention_mask, sample.prompt_length, temperature)
            result.kl += ((kl_k1(sample.logprobs, ref_logprobs)) * sample.response_mask).sum(-1).tolist()
    if judge is not None:
        result.judge_scores = [float(s) for s in judge([prompt_text(p) for p in prompts], result.responses)]
    return result
