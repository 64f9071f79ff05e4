"""rlhf.ppo on tiny models on the CPU, in float32: the rollout's log-probabilities and KL, the
update's statistics, and what is computed with or without gradient."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import response_logprobs

P, N = 5, 6  # prompt width, new tokens


def batch(vocab: int, rows: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sequences (rows, P + N), the first row's prompt left-padded by two tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, P + N), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def test_entropy_is_computed_without_gradient(tiny_lm) -> None:
    ids, mask = batch(tiny_lm.config.vocab_size)
    logprobs, entropy = response_logprobs(tiny_lm, ids, mask, P, temperature=0.7)
    assert logprobs.shape == entropy.shape == (3, N)
    assert logprobs.requires_grad, "the policy loss differentiates the log-probabilities"
    assert not entropy.requires_grad, "the entropy is only logged"
