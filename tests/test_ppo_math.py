"""PPO maths on tiny tensors, with the expected numbers worked by hand in the comments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.ppo_math import (
    KL_ESTIMATORS, AdaptiveKLController, FixedKLController, Rollout, entropy_from_logits,
    explained_variance, gae_advantages, kl_k1, kl_k3, kl_penalised_rewards, logprobs_from_logits,
    masked_mean, masked_sum, masked_var, masked_whiten, policy_loss_clipped, value_loss_clipped, whiten,
)

D = torch.float64
NAN, INF = float("nan"), float("inf")


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               atol=atol, rtol=0)


# ----------------------------------------------------------------------------- masked statistics
# Masked entries: 1, 2, 4 (padding holds NaN/inf garbage that must not leak).
VALUES = t([[1.0, 2.0, NAN], [4.0, INF, -INF]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_by_hand():
    close(masked_sum(VALUES, MASK), 7.0)                 # 1 + 2 + 4
    close(masked_mean(VALUES, MASK), 7 / 3)              # 7 / 3 = 2.3333
    close(masked_mean(VALUES, MASK, dim=-1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1
    close(masked_sum(VALUES, MASK.float(), dim=1), [3.0, 4.0])  # a float mask works too
    # A row with nothing masked has mean 0, not NaN.
    one_row = torch.tensor([[True, False, False], [False] * 3])
    close(masked_mean(VALUES, one_row, dim=-1), [1.0, 0.0])


def test_masked_var_by_hand():
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(VALUES, MASK, unbiased=False), 42 / 9 / 3)  # 14/9 = 1.5556
    close(masked_var(VALUES, MASK), 42 / 9 / 2)                  # 7/3 = 2.3333 (n - 1 = 2)
    close(masked_var(VALUES, MASK, unbiased=True), 7 / 3)
    # One entry: no spread, 0 (not NaN) even with Bessel's correction.
    close(masked_var(VALUES, torch.tensor([[True, False, False], [False] * 3])), 0.0)


def test_masked_whiten_by_hand():
    # std = sqrt(14/9) = sqrt(14)/3, so (x - 7/3) / std = (3x - 7) / sqrt(14):
    # 1 -> -4/sqrt14 = -1.0690, 2 -> -1/sqrt14 = -0.2673, 4 -> 5/sqrt14 = 1.3363; padding -> 0.
    s14 = math.sqrt(14)
    w = masked_whiten(VALUES, MASK)
    close(w, [[-4 / s14, -1 / s14, 0.0], [5 / s14, 0.0, 0.0]])
    close(masked_mean(w, MASK), 0.0)
    close(masked_var(w, MASK, unbiased=False), 1.0)
    # shift_mean=False adds 7/3 back: 1.2643, 2.0661, 3.6697; mean stays 7/3, std still 1.
    k = masked_whiten(VALUES, MASK, shift_mean=False)
    close(k, [[7 / 3 - 4 / s14, 7 / 3 - 1 / s14, 0.0], [7 / 3 + 5 / s14, 0.0, 0.0]])
    close(masked_mean(k, MASK), 7 / 3)
    close(masked_var(k, MASK, unbiased=False), 1.0)


def test_whiten_with_given_statistics_by_hand():
    # Mean 2 and variance 4 from elsewhere (e.g. every process's batch): (x - 2) / 2 on 1, 2, 4 ->
    # -0.5, 0, 1; padding -> 0. With shift_mean=False the mean comes back: 1.5, 2, 3.
    close(whiten(VALUES, MASK, t(2.0), t(4.0), eps=0.0), [[-0.5, 0.0, 0.0], [1.0, 0.0, 0.0]])
    close(whiten(VALUES, MASK, t(2.0), t(4.0), shift_mean=False, eps=0.0), [[1.5, 2.0, 0.0], [3.0, 0.0, 0.0]])
    # masked_whiten is whiten with the batch's own mean 7/3 and population variance 14/9.
    close(masked_whiten(VALUES, MASK), whiten(VALUES, MASK, t(7 / 3), t(14 / 9)))


def test_masked_whiten_random_is_standardised():
    torch.manual_seed(0)
    x, mask = torch.randn(4, 7, dtype=D) * 3 + 5, torch.rand(4, 7) > 0.3
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-6)
    close(masked_var(w, mask, unbiased=False), 1.0, atol=1e-6)
    assert torch.all(w[~mask] == 0)


# ----------------------------------------------------------------------------- KL
def test_kl_estimators_by_hand():
    logp, logq = t([math.log(0.5)]), t([math.log(0.25)])
    close(kl_k1(logp, logq), [math.log(2)])               # log 0.5 - log 0.25 = log 2 = 0.6931
    # r = 0.25/0.5 = 0.5: (0.5 - 1) - log 0.5 = -0.5 + 0.6931 = 0.1931
    close(kl_k3(logp, logq), [0.1931])
    close(kl_k3(logq, logp), [2 - 1 - math.log(2)])       # r = 2: (2-1) - log 2 = 0.3069
    close(kl_k1(logq, logp), [-math.log(2)])              # k1 may be negative
    assert KL_ESTIMATORS == {"k1": kl_k1}, "only k1 is a KL penalty whose gradient is the KL's (below)"


def test_kl_k3_non_negative_and_zero_when_equal():
    torch.manual_seed(0)
    logp, logq = torch.randn(5, 6) * 3, torch.randn(5, 6) * 3
    assert torch.all(kl_k3(logp, logq) >= 0)
    for estimator in (*KL_ESTIMATORS.values(), kl_k3):
        assert torch.all(estimator(logp, logp) == 0)


def exact_reward_gradient(logits: torch.Tensor, ref_logp: torch.Tensor, estimator) -> torch.Tensor:
    """``E_pi[k(a) * grad log pi(a)]`` exactly: every outcome a of the categorical pi = softmax(logits),
    weighted by its probability, k(a) detached (as the KL penalty enters PPO's reward)."""
    logp = torch.log_softmax(logits, -1)
    k = estimator(logp, ref_logp).detach()
    surrogate = (logp.exp().detach() * k * logp).sum()
    (gradient,) = torch.autograd.grad(surrogate, logits)
    return gradient


def test_k1_as_a_detached_reward_has_the_exact_kl_gradient():
    """PPO penalises a per-token KL estimate k as a detached reward, so what it follows is the
    score-function gradient E_pi[k * grad log pi]. For k1 = log pi - log ref that equals grad KL(pi || ref)
    exactly: grad KL = sum_a grad pi(a) (log pi(a) - log ref(a)) + sum_a grad pi(a), and the last sum is
    grad 1 = 0. For k3 = (r - 1) - log r it does not: E[k3 * grad log pi] = sum_a grad pi(a) (ref/pi - log ref/pi)
    is another vector (on this distribution near the reference, many times too small and pointing
    elsewhere), which is why k3 is not in KL_ESTIMATORS (and the config refuses it)."""
    ref_logp = torch.log_softmax(t([0.3, -1.2, 0.8, 0.0, -0.4, 1.1]), -1)  # 6 outcomes
    logits = (ref_logp + t([0.2, -0.1, 0.05, -0.3, 0.25, 0.0])).requires_grad_()  # pi near the reference
    logp = torch.log_softmax(logits, -1)
    exact_kl = (logp.exp() * (logp - ref_logp)).sum()
    (kl_gradient,) = torch.autograd.grad(exact_kl, logits)
    assert kl_gradient.abs().max() > 1e-3, "a gradient worth comparing"
    close(exact_reward_gradient(logits, ref_logp, KL_ESTIMATORS["k1"]), kl_gradient, atol=1e-12)

    k3_gradient = exact_reward_gradient(logits, ref_logp, kl_k3)
    cosine = torch.nn.functional.cosine_similarity(k3_gradient, kl_gradient, dim=0)
    assert not torch.allclose(k3_gradient, kl_gradient, atol=1e-3), "k3 as a reward would not follow grad KL"
    assert cosine < 0.9 and k3_gradient.norm() < kl_gradient.norm() / 2, f"cosine {cosine:.3f}"


def test_kl_penalised_rewards_by_hand():
    # beta = 0.1; row 0 has 3 real tokens, row 1 has 2, row 2 none (empty response).
    kl = t([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    rewards, non_score = kl_penalised_rewards(t([10.0, -2.0, 5.0]), kl, mask, beta=0.1)
    # -0.1 * kl on real tokens, 0 on padding.
    close(non_score, [[-0.1, -0.2, -0.3], [-0.05, 0.1, 0.0], [0.0, 0.0, 0.0]])
    # Score at the last real token: row 0 index 2 (-0.3 + 10 = 9.7), row 1 index 1 (0.1 - 2 = -1.9);
    # the empty row gets nothing.
    close(rewards, [[-0.1, -0.2, 9.7], [-0.05, -1.9, 0.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- GAE
R3, V3 = t([[1.0, 2.0, 3.0]]), t([[0.5, 1.0, 1.5]])
FULL = torch.ones(1, 3, dtype=torch.bool)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    # reward-to-go: 1+2+3 = 6, 2+3 = 5, 3 -> advantages 6-0.5, 5-1, 3-1.5 = 5.5, 4, 1.5
    adv, ret = gae_advantages(R3, V3, FULL, gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.0, 1.5]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_gae_gamma09_lam05_by_hand():
    # deltas: d2 = 3 + 0 - 1.5 = 1.5; d1 = 2 + 0.9*1.5 - 1 = 2.35; d0 = 1 + 0.9*1 - 0.5 = 1.4
    # gamma*lam = 0.45: A2 = 1.5; A1 = 2.35 + 0.45*1.5 = 3.025; A0 = 1.4 + 0.45*3.025 = 2.76125
    adv, ret = gae_advantages(R3, V3, FULL, gamma=0.9, lam=0.5)
    close(adv, [[2.76125, 3.025, 1.5]], atol=1e-9)
    close(ret, [[3.26125, 4.025, 3.0]], atol=1e-9)  # + values 0.5, 1, 1.5


def test_gae_padding_is_zero_and_does_not_leak():
    # Last position is padding with a huge value and a reward: both ignored, the value after
    # the last real token is 0. gamma = lam = 1: reward-to-go 3, 2 minus values 0.5, 1.
    adv, ret = gae_advantages(t([[1.0, 2.0, 7.0]]), t([[0.5, 1.0, 100.0]]),
                              torch.tensor([[True, True, False]]), gamma=1.0, lam=1.0)
    close(adv, [[2.5, 1.0, 0.0]])
    close(ret, [[3.0, 2.0, 0.0]])


def reference_gae(rewards, values, mask, gamma, lam):
    """Straightforward double loop: A_t = sum_k (gamma*lam)^(k-t) delta_k over the real tokens."""
    advantages = [[0.0] * rewards.shape[1] for _ in range(rewards.shape[0])]
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        r, v = rewards[b].tolist(), values[b].tolist()
        delta = [r[k] + gamma * (v[k + 1] if k + 1 < n else 0.0) - v[k] for k in range(n)]
        for i in range(n):
            advantages[b][i] = sum((gamma * lam) ** (k - i) * delta[k] for k in range(i, n))
    return torch.tensor(advantages, dtype=rewards.dtype)


def test_gae_matches_reference_loop_on_random_tensors():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6, dtype=D), torch.randn(4, 6, dtype=D)
    mask = torch.arange(6) < torch.tensor([6, 3, 1, 0])[:, None]  # prefix masks, one empty row
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    expected = reference_gae(rewards, values, mask, 0.95, 0.9)
    close(adv, expected, atol=1e-10)
    close(ret, torch.where(mask, expected + values, 0.0), atol=1e-10)
    # Changing anything in the padding changes nothing.
    noise = torch.where(mask, 0.0, torch.randn(4, 6, dtype=D) * 100)
    adv2, ret2 = gae_advantages(rewards + noise, values + noise, mask, gamma=0.95, lam=0.9)
    close(adv2, adv, atol=1e-10)
    close(ret2, ret, atol=1e-10)


# ----------------------------------------------------------------------------- losses
def test_policy_loss_clipped_by_hand():
    # eps = 0.2. Per token (ratio, A): -A*ratio vs -A*clip(ratio) -> max
    #   t0 (1.5, +1): -1.5 vs -1.2 -> -1.2 clipped (ratio above 1+eps with A > 0)
    #   t1 (0.5, -1):  0.5 vs  0.8 ->  0.8 clipped (ratio below 1-eps with A < 0)
    #   t2 (1.1, +2): -2.2 vs -2.2 -> -2.2 not clipped (inside the range)
    #   t3 (0.5, +1): -0.5 vs -0.8 -> -0.5 not clipped (pessimistic bound keeps unclipped)
    #   t4 padding (ratio e^5): ignored
    # loss = (-1.2 + 0.8 - 2.2 - 0.5) / 4 = -0.775; clipfrac = 2/4 = 0.5
    ratios = t([[1.5, 0.5, 1.1, 0.5, math.exp(5)]])
    old = t([[-1.0, -2.0, -0.5, -1.5, -3.0]])
    logprobs = (old + ratios.log()).requires_grad_()
    adv = t([[1.0, -1.0, 2.0, 1.0, 50.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, stats = policy_loss_clipped(logprobs, old, adv, mask, clip_range=0.2)
    close(loss.detach(), -0.775)
    close(stats["clipfrac"], 0.5)
    # 0.5 * log(r)^2: 0.5*(0.164402 + 0.480453 + 0.009084 + 0.480453) / 4 = 0.141799
    close(stats["approx_kl"], 0.141799)
    close(stats["ratio_mean"], (1.5 + 0.5 + 1.1 + 0.5) / 4)  # 0.9
    close(stats["ratio_max"], 1.5)                           # padding's e^5 excluded
    # d loss / d logp = -A * ratio / 4 where unclipped, 0 where clipped or padding:
    # t2: -2*1.1/4 = -0.55; t3: -1*0.5/4 = -0.125
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0, -0.55, -0.125, 0.0]])


def test_value_loss_clipped_by_hand():
    # eps = 0.2, old values all 1 -> clipped values in [0.8, 1.2].
    #   t0 V=1.5, R=2:   (V-R)^2 = 0.25, clip 1.2 -> 0.64 -> 0.64 (clipped term used)
    #   t1 V=0.9, R=0:   0.81, clip 0.9 -> 0.81 -> 0.81 (inside the range)
    #   t2 V=1.5, R=1.1: 0.16, clip 1.2 -> 0.01 -> 0.16 (unclipped is larger)
    #   t3 padding ignored
    # loss = 0.5 * (0.64 + 0.81 + 0.16) / 3 = 0.268333; value_clipfrac = 1/3
    values = t([[1.5, 0.9, 1.5, 9.0]]).requires_grad_()
    loss, stats = value_loss_clipped(values, t([[1.0, 1.0, 1.0, 0.0]]), t([[2.0, 0.0, 1.1, -9.0]]),
                                     torch.tensor([[1, 1, 1, 0]]), clip_range_value=0.2)
    close(loss.detach(), 0.5 * 1.61 / 3)
    close(stats["value_clipfrac"], 1 / 3)
    # Gradient 0.5 * 2 (V - R) / 3 where unclipped: t1 0.9/3 = 0.3, t2 0.4/3 = 0.1333; t0, t3 0.
    loss.backward()
    close(values.grad, [[0.0, 0.3, 0.4 / 3, 0.0]])


# ----------------------------------------------------------------------------- logits
def test_entropy_from_logits():
    # uniform over V = 5: log 5 = 1.6094
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)))
    # p = (0.5, 0.25, 0.25): 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2 = 1.0397
    close(entropy_from_logits(t([[[0.5, 0.25, 0.25]]]).log()), [[1.5 * math.log(2)]])
    # A certain token (others at -inf) has entropy 0, not NaN.
    close(entropy_from_logits(t([[[0.0, -INF, -INF]]])), [[0.0]])


def test_logprobs_from_logits_with_temperature():
    logits = t([[[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])  # (B=1, T=2, V=3)
    tokens = torch.tensor([[0, 1]])
    # T=1: logsumexp(2, 0, 0) = log(e^2 + 2) = log 9.3891 = 2.2395 -> 2 - 2.2395, 0 - 2.2395
    close(logprobs_from_logits(logits, tokens), [[-0.23954, -2.23954]])
    # T=2: scaled (1, 0, 0), logsumexp = log(e + 2) = 1.55144 -> -0.55144, -1.55144
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[-0.55144, -1.55144]])
    lp = logprobs_from_logits(logits.float(), tokens, temperature=2.0)
    close(lp, torch.log_softmax(logits / 2, -1)[0, [0, 1], [0, 1]][None], atol=1e-6)


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    close(explained_variance(returns, returns, mask), 1.0)                  # perfect
    close(explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask), 0.0)  # the mean, 2
    # values (1, 2, 2): residuals (0, 0, 1) have var 2/9; returns var 2/3 -> 1 - 1/3 = 2/3
    close(explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask), 2 / 3)


# ----------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)  # 12/6 - 1 = 1 -> clipped 0.2; mult 1 + 0.2*256/10000 = 1.00512
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    ctl.update(3.0, n_steps=256)   # 3/6 - 1 = -0.5 -> -0.2; mult 0.99488 -> 0.0999973786
    assert ctl.value == pytest.approx(0.100512 * 0.99488, abs=1e-12)
    # 6.6/6 - 1 = 0.1 (unclipped); mult 1 + 0.1*100/10000 = 1.001; a tensor KL is accepted
    ctl.update(torch.tensor(6.6, dtype=D), n_steps=100)
    assert ctl.value == pytest.approx(0.100512 * 0.99488 * 1.001, abs=1e-12)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain JSON numbers
    restored = AdaptiveKLController(value=1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored == ctl


def test_adaptive_kl_controller_steers_at_the_demo_settings():
    """Over the shipped demo's PPO run (pipelines/demo.yaml, one process), a KL held at 0.3 x target
    must lower beta by at least a factor 2, and one at 3 x target raise it by 2: a horizon far longer
    than the run's episodes (10000 for 60 x 64) left beta within 8% of kl_coef."""
    from pathlib import Path

    from rlhf.config import load_pipeline

    demo = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml").stages["ppo"]
    assert demo.kl_target > 0, "the demo's beta is adaptive"
    for ratio, bound in ((0.3, 0.5), (3.0, 2.0)):
        ctl = AdaptiveKLController(value=demo.kl_coef, target=demo.kl_target, horizon=demo.kl_horizon)
        for _ in range(demo.steps):
            ctl.update(ratio * demo.kl_target, n_steps=demo.rollout_batch_size)
        factor = ctl.value / demo.kl_coef
        assert (factor <= bound) if ratio < 1 else (factor >= bound), f"KL at {ratio} x target: beta x {factor:.3f}"


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(value=0.05)
    for kl in (0.0, 100.0, -3.0):
        ctl.update(kl, n_steps=512)
    assert ctl.value == 0.05
    restored = FixedKLController(value=1.0)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored == ctl


# ----------------------------------------------------------------------------- rollout
def test_rollout_select_picks_rows_consistently():
    b, p, n = 3, 2, 4
    row = torch.arange(b, dtype=torch.float32)  # every field of row i carries the number i
    per_token = row[:, None].expand(b, n).clone()
    rollout = Rollout(
        query_responses=row.long()[:, None].expand(b, p + n).clone(),
        attention_mask=torch.ones(b, p + n, dtype=torch.long),
        response_mask=torch.arange(n) < torch.tensor([4, 2, 1])[:, None],
        logprobs=per_token, ref_logprobs=per_token + 10, values=per_token + 20, scores=row,
        rewards=per_token + 30, advantages=per_token + 40, returns=per_token + 50, prompt_length=p)
    assert len(rollout) == 3
    mb = rollout.select(torch.tensor([2, 0]))
    assert len(mb) == 2 and mb.prompt_length == p
    assert mb.query_responses[:, 0].tolist() == [2, 0]
    assert mb.response_mask.sum(-1).tolist() == [1, 4]
    assert mb.scores.tolist() == [2.0, 0.0]
    for name, offset in [("logprobs", 0), ("ref_logprobs", 10), ("values", 20), ("rewards", 30),
                         ("advantages", 40), ("returns", 50)]:
        assert getattr(mb, name)[:, 0].tolist() == [2 + offset, 0 + offset], name
    assert rollout.select(torch.tensor([False, True, False])).scores.tolist() == [1.0]


def padded_rollout(prompt_lengths: list[int], response_lengths: list[int], P: int = 4, T: int = 5) -> Rollout:
    """Left-padded prompts and right-padded responses (token ids: 0 pad, column number + 1 otherwise)."""
    b = len(prompt_lengths)
    prompt_real = torch.arange(P) >= P - torch.tensor(prompt_lengths)[:, None]  # (B, P)
    response_mask = torch.arange(T) < torch.tensor(response_lengths)[:, None]  # (B, T)
    attention = torch.cat([prompt_real, response_mask], 1).long()
    per_token = torch.arange(T, dtype=torch.float32).expand(b, T).clone()
    return Rollout(query_responses=(torch.arange(P + T) + 1) * attention, attention_mask=attention,
                   response_mask=response_mask, logprobs=per_token, ref_logprobs=per_token + 10, values=per_token + 20,
                   scores=torch.arange(b, dtype=torch.float32), rewards=per_token + 30, advantages=per_token + 40,
                   returns=per_token + 50, prompt_length=P)  # fmt: skip


def test_trimming_drops_only_columns_that_are_padding_in_every_row():
    # prompts of 3 and 2 real tokens (1 and 2 pad columns: 1 common), responses of 2 and 3 (2 common pad columns)
    trimmed = padded_rollout([3, 2], [2, 3]).trimmed()
    assert trimmed.prompt_length == 3 and trimmed.query_responses.shape == (2, 6)
    assert trimmed.query_responses.tolist() == [[2, 3, 4, 5, 6, 0], [0, 3, 4, 5, 6, 7]]
    assert trimmed.attention_mask.sum().item() == 10, "every real token kept"
    for name, offset in [("logprobs", 0), ("ref_logprobs", 10), ("values", 20), ("rewards", 30), ("advantages", 40), ("returns", 50)]:
        assert getattr(trimmed, name)[0].tolist() == [0 + offset, 1 + offset, 2 + offset], name
    assert trimmed.scores.tolist() == [0.0, 1.0]


def test_trimming_keeps_a_full_rollout_and_at_least_one_response_column():
    full = padded_rollout([4, 4], [5, 5])
    assert full.trimmed() is full
    empty = padded_rollout([2, 3], [0, 0]).trimmed()  # (no real response token: not sampled, but safe)
    assert empty.response_mask.shape == (2, 1) and empty.prompt_length == 3


def test_masked_losses_are_unchanged_by_trimming():
    rollout = padded_rollout([3, 1, 2], [2, 5, 1])
    trimmed = rollout.select(torch.tensor([0, 2])).trimmed()
    untrimmed = rollout.select(torch.tensor([0, 2]))
    new_logprobs = untrimmed.logprobs * 0.9
    loss, _ = policy_loss_clipped(new_logprobs, untrimmed.logprobs, untrimmed.advantages, untrimmed.response_mask, 0.2)
    T = trimmed.response_mask.shape[1]
    trimmed_loss, _ = policy_loss_clipped(new_logprobs[:, :T], trimmed.logprobs, trimmed.advantages, trimmed.response_mask, 0.2)
    assert T == 2 and torch.equal(loss, trimmed_loss)


def test_the_config_accepts_exactly_the_kl_estimators_there_are() -> None:
    from rlhf.config.rl import KL_ESTIMATOR_NAMES

    assert set(KL_ESTIMATOR_NAMES) == set(KL_ESTIMATORS)
