"""rlhf.ppo (and the shared rlhf.rl_models / rlhf.rl_training it runs on) on tiny models on the CPU, in float32: the rollout's log-probabilities and KL, the
update's statistics, and what is computed with or without gradient."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_ppo_models
from rlhf.rl_models import response_logprobs

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


# ----------------------------------------------------------------------------- rollouts


def ppo_config(**changes):
    from rlhf.config import PPOConfig

    settings = dict(prompts="prompts.jsonl", rollout_batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=N,
                    temperature=0.7, lr=1e-3)  # fmt: skip
    return PPOConfig(**{**settings, **changes})


def prompts(count: int = 8, seed: int = 0) -> list[list[int]]:
    """Prompts of 2 to 5 tokens (ids 2 and above: no pad, no EOS)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, P + 1, (count,), generator=generator).tolist()
    return [torch.randint(2, 96, (n,), generator=generator).tolist() for n in lengths]


def rollout_of(models, config, seed: int = 0):
    from rlhf.ppo import PPO

    tokens = prompts(config.rollout_batch_size, seed)
    generator = torch.Generator().manual_seed(seed)
    return PPO(models, config).rollout_step(tokens, [""] * len(tokens), 0.1, generator)


def ppo_update(models, rollout, config, accelerator, optimizer, scheduler, generator) -> dict:
    """The driver's update of PPO's steps over one rollout."""
    from rlhf.ppo import PPO
    from rlhf.rl_training import update

    return update(models, PPO(models, config), rollout, config, 0.1, accelerator, optimizer, scheduler, generator)


def accelerator_on_cpu():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return Accelerator(cpu=True)


def test_old_logprobs_are_the_training_forwards(monkeypatch) -> None:
    """The rollout's log-probabilities are recomputed by the forward the update uses (not taken
    from the KV-cache sampling engine): with the policy equal to the reference the per-token KL is
    0, and the first minibatch's importance ratio is 1, on every response token."""
    import rlhf.ppo

    models, config = tiny_ppo_models(), ppo_config()
    rollout, stats = rollout_of(models, config)
    mask = rollout.response_mask
    assert mask.sum() > 2 * len(rollout), "responses worth comparing"
    kl = torch.where(mask, rollout.logprobs - rollout.ref_logprobs, 0.0)
    assert kl.abs().max() <= 1e-6 and abs(stats["kl"]) <= 1e-6

    ratios = []
    real = rlhf.ppo.policy_loss_clipped

    def recording(logprobs, old_logprobs, advantages, response_mask, clip_range):
        ratios.append(torch.where(response_mask, (logprobs - old_logprobs).exp(), 1.0).detach())
        return real(logprobs, old_logprobs, advantages, response_mask, clip_range)

    monkeypatch.setattr(rlhf.ppo, "policy_loss_clipped", recording)
    optimizer = torch.optim.SGD(list(models.policy.parameters()) + list(models.value.parameters()), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ppo_update(models, rollout, config, accelerator_on_cpu(), optimizer, scheduler, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ratios[0], torch.ones_like(ratios[0]), atol=1e-6, rtol=0)


def test_a_trimmed_minibatch_trains_on_the_same_loss_and_gradients() -> None:
    """Dropping the columns that are padding in every row of a minibatch changes no loss, statistic or gradient."""
    from rlhf.ppo import PPO

    models, config = tiny_ppo_models(), ppo_config()
    rollout, _ = rollout_of(models, config)
    lengths = rollout.attention_mask[:, : rollout.prompt_length].sum(-1)
    minibatch = rollout.select((lengths < lengths.max()).nonzero()[:, 0])  # the shorter prompts: common left padding to drop
    trimmed = minibatch.trimmed()
    assert trimmed.query_responses.shape[1] < minibatch.query_responses.shape[1], "the test trims something"
    algorithm = PPO(models, config)
    results = []
    for batch in (minibatch, trimmed):
        models.policy.zero_grad(), models.value.zero_grad()
        loss, stats = algorithm.update_step(batch, 0.1)
        loss.backward()
        results.append((loss.detach(), stats, [p.grad.clone() for p in models.policy.parameters()]))
    (loss, stats, grads), (trimmed_loss, trimmed_stats, trimmed_grads) = results
    torch.testing.assert_close(trimmed_loss, loss, atol=1e-6, rtol=1e-5)
    assert stats.keys() == trimmed_stats.keys()
    for key in stats:
        assert abs(stats[key] - trimmed_stats[key]) <= 1e-5 + 1e-5 * abs(stats[key]), key
    for grad, trimmed_grad in zip(grads, trimmed_grads):
        torch.testing.assert_close(trimmed_grad, grad, atol=1e-6, rtol=1e-4)


def update_statistics(models, rollout, config) -> dict:
    optimizer = torch.optim.SGD(list(models.policy.parameters()) + list(models.value.parameters()), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return ppo_update(models, rollout, config, accelerator_on_cpu(), optimizer, scheduler, torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # skipped steps
def test_update_statistics_have_the_same_keys_when_every_loss_is_nan(monkeypatch) -> None:
    """A process whose every micro-batch is non-finite returns the same keys as the others (NaN
    values), so `mean_over_processes` makes the same reductions on every process."""
    import math

    import rlhf.ppo

    models, config = tiny_ppo_models(), ppo_config()
    rollout, _ = rollout_of(models, config)
    finite = update_statistics(models, rollout, config)
    assert all(math.isfinite(v) for v in finite.values()), finite
    real = rlhf.ppo.policy_loss_clipped

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * math.nan, stats

    monkeypatch.setattr(rlhf.ppo, "policy_loss_clipped", nan_loss)
    nan = update_statistics(models, rollout, config)
    assert nan.keys() == finite.keys()
    assert nan["nonfinite_steps"] == 2 and math.isnan(nan["policy_loss"]) and math.isnan(nan["ratio_max"])


# ----------------------------------------------------------------------------- score normalisation


def stopped_rows(rollout, eos: int) -> torch.Tensor:
    """(B,) whether each response emitted EOS."""
    return ((rollout.query_responses[:, rollout.prompt_length :] == eos) & rollout.response_mask).any(-1)


def rm_scores(models, rollout) -> torch.Tensor:
    from rlhf.rl_models import normalised_scores

    return normalised_scores(models.reward, rollout.query_responses, rollout.attention_mask)


@pytest.mark.parametrize("minimum, over", [(4, "stopped"), (100, "all")])
def test_score_normalisation_is_measured_on_responses_sampled_as_rollouts_are(monkeypatch, minimum, over) -> None:
    """The mean and std come from the reward model's scores of the very token sequences rollouts of the
    same prompts and generator would hold: of those that stopped, or of all when too few did."""
    import rlhf.rl_models
    from rlhf.ppo import PPO
    from rlhf.rl_models import measure_score_normalisation

    monkeypatch.setattr(rlhf.rl_models, "MIN_NORMALISATION_SAMPLES", minimum)
    models, config = tiny_ppo_models(), ppo_config(rollout_batch_size=16)
    tokens = prompts(32, seed=1)
    measured = measure_score_normalisation(models, tokens, config, torch.Generator().manual_seed(5))

    generator, scores, stopped = torch.Generator().manual_seed(5), [], []
    for start in (0, 16):  # rollouts of the same prompts, the generator's stream continued
        rollout, _ = PPO(models, config).rollout_step(tokens[start : start + 16], [""] * 16, 0.1, generator)
        scores.append(rm_scores(models, rollout))
        stopped.append(stopped_rows(rollout, models.tokenizer.eos_token_id))
    scores, stopped = torch.cat(scores), torch.cat(stopped)
    assert 4 <= int(stopped.sum()) < 32, "some responses stop, some do not"
    kept = scores[stopped] if over == "stopped" else scores
    assert (measured.samples, measured.responses) == (len(kept), 32)
    assert measured.mean == pytest.approx(kept.mean().item(), abs=1e-6)
    assert measured.std == pytest.approx(kept.std(correction=0).item(), abs=1e-6)


def test_score_normalisation_without_prompts_is_the_identity() -> None:
    from rlhf.rl_models import ScoreNormalisation, measure_score_normalisation

    assert measure_score_normalisation(tiny_ppo_models(), [], ppo_config(), torch.Generator()) == ScoreNormalisation()


def test_rollout_scores_are_normalised_where_the_response_stopped() -> None:
    from rlhf.rl_models import ScoreNormalisation

    models, config = tiny_ppo_models(), ppo_config(rollout_batch_size=16, missing_eos_penalty=-7.0)
    models.score_normalisation = ScoreNormalisation(mean=0.3, std=1.5)
    rollout, _ = rollout_of(models, config)
    stopped = stopped_rows(rollout, models.tokenizer.eos_token_id)
    assert stopped.any() and not stopped.all()
    expected = torch.where(stopped, (rm_scores(models, rollout) - 0.3) / 1.5, -7.0)
    torch.testing.assert_close(rollout.scores, expected, atol=1e-6, rtol=0)


def test_value_model_starts_on_the_scale_of_ppo_scores() -> None:
    """use_score_normalisation folds into the value head the reward model's stored normalisation (here an
    older model's 0.5 and 2) and PPO's own (0.3 and 1.5): its outputs are on the scale of PPO's scores."""
    from rlhf.rl_models import ScoreNormalisation, use_score_normalisation

    models = tiny_ppo_models()
    models.value.config.reward_mean, models.value.config.reward_std = 0.5, 2.0
    ids, mask = batch(models.value.config.vocab_size)
    with torch.no_grad():
        before = models.value(input_ids=ids, attention_mask=mask).token_scores
        use_score_normalisation(models, ScoreNormalisation(mean=0.3, std=1.5, samples=10, responses=12))
        after = models.value(input_ids=ids, attention_mask=mask).token_scores
    torch.testing.assert_close(after, ((before - 0.5) / 2.0 - 0.3) / 1.5, atol=1e-6, rtol=0)
    assert (models.value.config.reward_mean, models.value.config.reward_std) == (0.0, 1.0), "nothing applied twice"
    assert models.score_normalisation.mean == 0.3
