"""Critic-free RL maths (GRPO, Dr. GRPO, RLOO, REINFORCE++) on tiny tensors, numbers worked by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rlhf.group_math import (
    GROUP_ADVANTAGES, LOSS_AGGREGATIONS, clipped_policy_terms, discounted_returns, dr_grpo_advantages,
    grpo_advantages, kl_loss, kl_penalised_scores, policy_loss, reinforce_pp_advantages, rloo_advantages,
    sequence_mean, token_advantages, token_mean, token_sum,
)
from rlhf.ppo_math import kl_penalised_rewards, masked_mean, masked_var, masked_whiten, policy_loss_clipped

D = torch.float64
NAN, INF = float("nan"), float("inf")
EPS = 1e-4


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               atol=atol, rtol=0)


# ----------------------------------------------------------------------------- group advantages
# Two prompts, G = 3: group 0 scores 1, 2, 3 (mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1);
# group 1 scores 5, 5, 5 (mean 5, std 0: no signal).
SCORES = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])


def test_grpo_advantages_by_hand():
    # (r - mean) / (std + eps): -1/(1+eps), 0, 1/(1+eps); the constant group gives exactly 0.
    adv = grpo_advantages(SCORES, group_size=3)
    close(adv, [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0], atol=1e-12)
    assert torch.equal(adv[3:], torch.zeros(3, dtype=D))
    # G = 2 on 1, 3: mean 2, std sqrt((1 + 1) / 1) = sqrt 2 -> -+1/(sqrt2 + eps) = -+0.70706
    close(grpo_advantages(t([1.0, 3.0]), 2, eps=0.0), [-1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-12)


def test_dr_grpo_advantages_by_hand():
    # r - mean, no std division: -1, 0, 1 and 0, 0, 0.
    close(dr_grpo_advantages(SCORES, group_size=3), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], atol=0)


def test_rloo_advantages_by_hand():
    # (G * r - sum) / (G - 1): (3 - 6) / 2 = -1.5, (6 - 6) / 2 = 0, (9 - 6) / 2 = 1.5; constant group 0.
    # Leave-one-out directly: 1 - mean(2, 3) = -1.5; 2 - mean(1, 3) = 0; 3 - mean(1, 2) = 1.5.
    close(rloo_advantages(SCORES, group_size=3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0], atol=1e-12)


def test_group_advantages_match_reference_formulas_on_random_scores():
    torch.manual_seed(0)
    scores, g = torch.randn(4 * 5, dtype=D), 5
    grouped = scores.view(-1, g)
    # TRL's GRPOTrainer: (r - mean) / (std + 1e-4), torch's default (unbiased) std.
    trl = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    close(grpo_advantages(scores, g), trl.reshape(-1), atol=1e-12)
    loo = [[r[i] - (r.sum() - r[i]) / (g - 1) for i in range(g)] for r in grouped]
    close(rloo_advantages(scores, g), t(loo).reshape(-1), atol=1e-12)
    close(dr_grpo_advantages(scores, g), (grouped - grouped.mean(1, keepdim=True)).reshape(-1), atol=1e-12)
    assert GROUP_ADVANTAGES == {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages,
                                "rloo": rloo_advantages}


def test_identical_and_singleton_groups_give_exactly_zero():
    # 0.1 is not exact in binary, so "r - mean" could round to ~1e-17, and / (0 + eps) to ~1e-13:
    # constant groups are set to exactly 0 instead.
    same = torch.full((6,), 0.1, dtype=torch.float32)
    for name, fn in GROUP_ADVANTAGES.items():
        assert torch.equal(fn(same, 3), torch.zeros(6)), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom <= 0" warning from std of one sample
        assert torch.equal(grpo_advantages(SCORES, 1), torch.zeros(6, dtype=D))
        assert torch.equal(dr_grpo_advantages(SCORES, 1), torch.zeros(6, dtype=D))


def test_group_advantages_are_detached_and_accept_integer_scores():
    scores = SCORES.clone().requires_grad_()
    for fn in GROUP_ADVANTAGES.values():
        assert not fn(scores, 3).requires_grad
    close(rloo_advantages(torch.tensor([1, 2, 3]), 3), [-1.5, 0.0, 1.5])  # int scores become float


def test_bad_group_layouts_raise():
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        grpo_advantages(SCORES, 4)  # 6 rows, G = 4
    for fn in GROUP_ADVANTAGES.values():
        with pytest.raises(ValueError, match="multiple"):
            fn(SCORES[:5], 3)
        with pytest.raises(ValueError, match="group_size"):
            fn(SCORES, 0)
        with pytest.raises(ValueError, match="1-D"):
            fn(SCORES.view(2, 3), 3)
    with pytest.raises(ValueError, match="RLOO needs group_size >= 2"):
        rloo_advantages(SCORES, 1)


def test_kl_penalised_scores_by_hand():
    # beta = 0.1; row 0 has 2 tokens (KL 0.5 + 1 = 1.5), row 1 one token (2), row 2 none.
    # 1 - 0.15 = 0.85; 2 - 0.2 = 1.8; 3 - 0 = 3. NaN/inf in padding do not leak.
    kl = t([[0.5, 1.0, NAN], [2.0, INF, 1.0], [9.0, 9.0, -INF]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    close(kl_penalised_scores(t([1.0, 2.0, 3.0]), kl, mask, beta=0.1), [0.85, 1.8, 3.0], atol=1e-12)


def test_token_advantages_by_hand():
    # Each row's advantage on its real tokens, 0 on padding and on the empty row (even a NaN one).
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    out = token_advantages(t([2.0, -1.0, NAN]), mask)
    assert torch.equal(out, t([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- REINFORCE++
RET_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
RET_REWARDS = t([[1.0, 2.0, 4.0, NAN], [8.0, INF, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])


def test_discounted_returns_gamma_half_by_hand():
    # gamma 0.5, backwards: G2 = 4; G1 = 2 + 0.5*4 = 4; G0 = 1 + 0.5*4 = 3; padding NaN ignored.
    # Row 1: one token, G0 = 8 (the inf after it is padding). Row 2 is empty: all 0.
    close(discounted_returns(RET_REWARDS, RET_MASK, gamma=0.5),
          [[3.0, 4.0, 4.0, 0.0], [8.0, 0.0, 0.0, 0.0], [0.0] * 4], atol=0)
    # gamma 1: reward-to-go 7, 6, 4.
    close(discounted_returns(RET_REWARDS, RET_MASK)[0], [7.0, 6.0, 4.0, 0.0], atol=0)


def test_reinforce_pp_from_kl_penalised_rewards_by_hand():
    # score 1, kl 0.2, 0.4, beta 0.5: rewards -0.1, -0.2 + 1 = 0.8; returns (gamma 1) 0.7, 0.8.
    rewards, _ = kl_penalised_rewards(t([1.0]), t([[0.2, 0.4]]), torch.ones(1, 2, dtype=torch.bool), 0.5)
    close(discounted_returns(rewards, torch.ones(1, 2, dtype=torch.bool)), [[0.7, 0.8]], atol=1e-12)


def test_reinforce_pp_advantages_whiten_over_the_batch():
    # Returns 3, 4, 4, 8 (gamma 0.5 above): mean 4.75, population variance
    # (1.75^2 + 0.75^2 + 0.75^2 + 3.25^2) / 4 = 14.75 / 4 = 3.6875, std 1.92029
    # -> -0.91133, -0.39057, -0.39057, 1.69245; padding and the empty row 0.
    adv = reinforce_pp_advantages(RET_REWARDS, RET_MASK, gamma=0.5)
    s = math.sqrt(3.6875)
    close(adv, [[-1.75 / s, -0.75 / s, -0.75 / s, 0.0], [3.25 / s, 0.0, 0.0, 0.0], [0.0] * 4])
    close(masked_mean(adv, RET_MASK), 0.0)
    close(masked_var(adv, RET_MASK, unbiased=False), 1.0)
    close(adv, masked_whiten(discounted_returns(RET_REWARDS, RET_MASK, 0.5), RET_MASK), atol=0)


# ----------------------------------------------------------------------------- aggregation
# Real losses 1, 2, 3 (row 0) and 4 (row 1); padding holds NaN/inf garbage; max_tokens 4.
LOSSES = t([[1.0, 2.0, 3.0], [4.0, NAN, INF]])
LMASK = torch.tensor([[True, True, True], [True, False, False]])


def test_aggregations_by_hand():
    close(token_mean(LOSSES, LMASK, 4), 2.5, atol=1e-12)     # (1 + 2 + 3 + 4) / 4 tokens
    close(sequence_mean(LOSSES, LMASK, 4), 3.0, atol=1e-12)  # row means 2 and 4 -> (2 + 4) / 2
    close(token_sum(LOSSES, LMASK, 4), 1.25, atol=1e-12)     # 10 / (B * max_tokens = 2 * 4)
    assert LOSS_AGGREGATIONS == {"token_mean": token_mean, "sequence_mean": sequence_mean,
                                 "token_sum": token_sum}


def test_aggregations_with_empty_rows():
    # A third, empty row: token_mean unchanged (2.5); sequence_mean leaves it out (still 3);
    # token_sum counts it in the constant normaliser: 10 / (3 * 4) = 0.8333.
    losses = torch.cat([LOSSES, t([[NAN, 7.0, 7.0]])])
    mask = torch.cat([LMASK, torch.zeros(1, 3, dtype=torch.bool)])
    close(token_mean(losses, mask, 4), 2.5, atol=1e-12)
    close(sequence_mean(losses, mask, 4), 3.0, atol=1e-12)
    close(token_sum(losses, mask, 4), 10 / 12, atol=1e-12)
    # Nothing masked at all: 0, not NaN, for every aggregation.
    for name, aggregate in LOSS_AGGREGATIONS.items():
        assert aggregate(losses, torch.zeros_like(mask), 4).item() == 0.0, name


def test_token_sum_rejects_a_budget_below_the_width():
    with pytest.raises(ValueError, match="max_tokens"):
        token_sum(LOSSES, LMASK, 2)  # T = 3 > 2


# ----------------------------------------------------------------------------- policy loss
def test_clipped_policy_terms_by_hand():
    # eps = 0.2, as ppo_math's test: (ratio, A) = (1.5, +1) -> -1.2; (0.5, -1) -> 0.8;
    # (1.1, +2) -> -2.2; (0.5, +1) -> -0.5.
    old = t([[-1.0, -2.0, -0.5, -1.5]])
    logprobs = old + t([[1.5, 0.5, 1.1, 0.5]]).log()
    terms = clipped_policy_terms(logprobs, old, t([[1.0, -1.0, 2.0, 1.0]]), clip_range=0.2)
    close(terms, [[-1.2, 0.8, -2.2, -0.5]], atol=1e-12)


@pytest.mark.parametrize("aggregation, loss_value, grad", [
    # Ratio 1 everywhere, so each term is -A: -1, -2, -3 | -4 and d term / d logp = -A.
    ("token_mean", -2.5, [[-0.25, -0.5, -0.75], [-1.0, 0.0, 0.0]]),          # weight 1/4 per token
    ("sequence_mean", -3.0, [[-1 / 6, -2 / 6, -3 / 6], [-2.0, 0.0, 0.0]]),  # 1/(2*3) row 0, 1/(2*1) row 1
    ("token_sum", -1.25, [[-0.125, -0.25, -0.375], [-0.5, 0.0, 0.0]]),      # 1/(2*4) per token
])
def test_policy_loss_aggregations_and_gradient_by_hand(aggregation, loss_value, grad):
    # Padding holds NaN/inf in logprobs, old logprobs and advantages: no leak into loss or gradient.
    logprobs = t([[-1.0, -2.0, -0.5], [-1.5, NAN, INF]]).requires_grad_()
    old = t([[-1.0, -2.0, -0.5], [-1.5, -INF, NAN]])
    adv = t([[1.0, 2.0, 3.0], [4.0, NAN, INF]])
    loss, stats = policy_loss(logprobs, old, adv, LMASK, 0.2, aggregation, max_tokens=4)
    close(loss.detach(), loss_value, atol=1e-12)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    loss.backward()
    close(logprobs.grad, grad, atol=1e-12)
    assert torch.equal(logprobs.grad[~LMASK], torch.zeros(2, dtype=D))  # exactly 0, not NaN


def test_token_mean_policy_loss_equals_ppo_math_exactly():
    torch.manual_seed(0)
    old, adv = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    base = old + 0.3 * torch.randn(4, 6, dtype=D)
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 0])[:, None]  # prefix masks, one empty row
    lp_ours, lp_ppo = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours, ours_stats = policy_loss(lp_ours, old, adv, mask, 0.2, "token_mean", max_tokens=6)
    ppo, ppo_stats = policy_loss_clipped(lp_ppo, old, adv, mask, 0.2)
    assert torch.equal(ours, ppo)
    assert ours_stats.keys() == ppo_stats.keys()
    for key in ppo_stats:
        assert torch.equal(ours_stats[key], ppo_stats[key]), key
    assert ppo_stats["clipfrac"] > 0, "some tokens clipped, so the comparison covers both branches"
    ours.backward(), ppo.backward()
    assert torch.equal(lp_ours.grad, lp_ppo.grad)


def test_unknown_aggregation_raises():
    x = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        policy_loss(x, x, x, LMASK, 0.2, "mean", 4)
    with pytest.raises(ValueError, match="token_sum"):
        kl_loss(x, x, LMASK, "sum", 4)


# ----------------------------------------------------------------------------- KL loss
def test_kl_loss_zero_when_equal_to_reference():
    torch.manual_seed(0)
    logprobs = torch.randn(2, 3, dtype=D).requires_grad_()
    for aggregation in LOSS_AGGREGATIONS:
        loss = kl_loss(logprobs, logprobs.detach().clone(), LMASK, aggregation, 4)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.equal(grad, torch.zeros(2, 3, dtype=D))  # d k3 / d logp = 1 - r = 0 at r = 1


def test_kl_loss_value_and_gradient_by_hand():
    # Token 0: p = 0.5, ref 0.25 -> r = ref/p = 0.5, k3 = (0.5 - 1) - log 0.5 = 0.193147,
    #   d k3 / d logp = 1 - r = 0.5. Token 1: p = ref -> 0, gradient 0. Token 2: padding garbage.
    logprobs = t([[math.log(0.5), math.log(0.5), NAN]]).requires_grad_()
    ref = t([[math.log(0.25), math.log(0.5), INF]])
    mask = torch.tensor([[True, True, False]])
    k3 = 0.5 - 1 + math.log(2)
    for aggregation, divisor in (("token_mean", 2), ("sequence_mean", 2), ("token_sum", 1 * 4)):
        loss = kl_loss(logprobs, ref, mask, aggregation, max_tokens=4)
        close(loss.detach(), k3 / divisor, atol=1e-12)             # 0.096574 or 0.048287
        (grad,) = torch.autograd.grad(loss, logprobs)
        close(grad, [[0.5 / divisor, 0.0, 0.0]], atol=1e-12)       # 0.25 or 0.125; padding 0
        assert grad[0, 2].item() == 0.0
