"""rlhf.critic_free on tiny models on the CPU: groups are adjacent rows, each algorithm's advantages
are its `group_math` function of the scores, KL goes where the algorithm puts it, and the update's
first ratio is 1."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_ppo_models
from test_ppo import N, accelerator_on_cpu, prompts

GROUP = 4


def config_of(name: str, **changes):
    from rlhf.config import GRPOConfig, ReinforcePPConfig, RLOOConfig

    cls = {"grpo": GRPOConfig, "dr_grpo": GRPOConfig, "rloo": RLOOConfig, "reinforce_pp": ReinforcePPConfig}[name]
    settings = dict(prompts="prompts.jsonl", rollout_batch_size=4, answers_per_prompt=GROUP, minibatch_size=8,
                    max_new_tokens=N, temperature=0.7, lr=1e-3)  # fmt: skip
    if name == "dr_grpo":
        settings["variant"] = "dr_grpo"
    return cls(**{**settings, **changes})


def algorithm_of(name: str, models, config):
    from rlhf.stages.critic_free import algorithm_class

    return algorithm_class(config)(models, config)


ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_rollout_answers_each_prompt_in_adjacent_rows_with_the_algorithms_advantages(name) -> None:
    from rlhf.group_math import (
        discounted_returns, dr_grpo_advantages, grpo_advantages, kl_penalised_scores, masked_whiten, rloo_advantages,
        token_advantages,
    )  # fmt: skip
    from rlhf.ppo_math import kl_penalised_rewards

    models, config = tiny_ppo_models(), config_of(name)
    models.value = None
    tokens = prompts(4)
    rollout, stats = algorithm_of(name, models, config).rollout_step(tokens, [""] * 4, 0.1, torch.Generator().manual_seed(0))
    assert len(rollout) == 4 * GROUP and rollout.values is None
    for row in range(len(rollout)):  # row r answers prompt r // GROUP (left-padded to the batch's width)
        prompt = tokens[row // GROUP]
        assert rollout.query_responses[row, rollout.prompt_length - len(prompt) : rollout.prompt_length].tolist() == prompt
    mask, scores = rollout.response_mask, rollout.scores
    kl = rollout.logprobs - rollout.ref_logprobs
    assert torch.where(mask, kl, 0.0).abs().max() <= 1e-6, "policy = reference at the start"
    expected = {
        "grpo": lambda: token_advantages(grpo_advantages(scores, GROUP), mask),
        "dr_grpo": lambda: token_advantages(dr_grpo_advantages(scores, GROUP), mask),
        "rloo": lambda: token_advantages(rloo_advantages(kl_penalised_scores(scores, kl, mask, 0.1), GROUP), mask),
        "reinforce_pp": lambda: masked_whiten(discounted_returns(kl_penalised_rewards(scores, kl, mask, 0.1)[0], mask), mask),
    }[name]()
    torch.testing.assert_close(rollout.advantages, expected, atol=1e-6, rtol=0)
    assert stats["group_score_std"] > 0, "answers to one prompt differ: the baselines are not vacuous"


def test_grpo_groups_of_equal_scores_have_zero_advantage(monkeypatch) -> None:
    """A prompt whose answers all score the same teaches nothing: advantage 0, no NaN."""
    import rlhf.rl_models

    models, config = tiny_ppo_models(), config_of("grpo", missing_eos_penalty=0.0)
    models.value = None
    monkeypatch.setattr(rlhf.rl_models, "normalised_scores", lambda model, ids, mask: torch.zeros(len(ids)))
    rollout, _ = algorithm_of("grpo", models, config).rollout_step(prompts(4), [""] * 4, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(rollout.advantages, torch.zeros_like(rollout.advantages))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_update_step_starts_at_ratio_1_and_puts_the_kl_where_the_algorithm_does(name) -> None:
    from rlhf.rl_training import update

    models, config = tiny_ppo_models(), config_of(name)
    models.value = None
    algorithm = algorithm_of(name, models, config)
    rollout, _ = algorithm.rollout_step(prompts(4), [""] * 4, 0.1, torch.Generator().manual_seed(0))
    loss, stats = algorithm.update_step(rollout.select(torch.arange(8)), 0.1)
    assert torch.isfinite(loss) and loss.requires_grad
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["clipfrac"] == 0.0
    assert ("kl_loss" in stats) == name.endswith("grpo"), "GRPO's KL is a loss term; RLOO's and REINFORCE++'s are in the reward"
    if "kl_loss" in stats:
        assert stats["kl_loss"] == pytest.approx(0.0, abs=1e-6), "k3 of a policy against itself"
    before = [p.detach().clone() for p in models.policy.parameters()]
    optimizer = torch.optim.AdamW(models.policy.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    result = update(models, algorithm, rollout, config, 0.1, accelerator_on_cpu(), optimizer, schedule, torch.Generator().manual_seed(0))
    assert result["nonfinite_steps"] == 0
    changed = [not torch.equal(a, b) for a, b in zip(before, models.policy.parameters())]
    assert all(changed), "every trainable parameter of the policy moved"
