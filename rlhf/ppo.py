"""PPO with a KL penalty: its rollout step and its update step on the RL driver (`rlhf.rl_driver`).

The maths lives in `rlhf.ppo_math` (pure functions); this module wires it to models. The rollout
step samples and scores a batch (`rlhf.rl_models.sample_and_score`), reads the value model, turns the
scores into KL-penalised per-token rewards and GAE advantages whitened over every process's batch.
The update step is the clipped policy loss plus the clipped value loss on one minibatch.

Values are read at the positions whose logits predict the response tokens (the state before each).
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.ppo_math import (
    KL_ESTIMATORS, Rollout, explained_variance, gae_advantages, kl_penalised_rewards, masked_mean, policy_loss_clipped,
    value_loss_clipped,
)  # fmt: skip
from rlhf.rl_models import RLModels, response_logprobs, sample_and_score, unwrapped, whiten_across_processes


def response_values(value_model, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
    """Values (B, T) of the states before each response token."""
    token_scores = value_model(input_ids=sequences, attention_mask=attention_mask).token_scores  # (B, P + T, 1)
    return token_scores[:, prompt_length - 1 : -1, 0].float()


class PPO:
    """PPO (Schulman et al. 2017) as RLHF uses it (Ziegler et al. 2019; the N+ implementation details)."""

    def __init__(self, models: RLModels, config, reward_functions: list[Callable] = (), judge: Callable | None = None):
        self.models, self.config, self.reward_functions, self.judge = models, config, reward_functions, judge

    @torch.no_grad()
    def rollout_step(self, prompt_tokens: list[list[int]], prompt_texts: list[str], beta: float,
                     generator: torch.Generator) -> tuple[Rollout, dict[str, float]]:  # fmt: skip
        """Sample, score and evaluate one batch of prompts; returns the rollout and its statistics."""
        config, models = self.config, self.models
        # 1. Sample and score; both policies' log-probabilities (`sample_and_score`). 2. Values.
        scored = sample_and_score(models, prompt_tokens, prompt_texts, config, generator, self.reward_functions, self.judge)
        sample, mask = scored.sample, scored.sample.response_mask
        values = response_values(unwrapped(models.value), sample.sequences, sample.attention_mask, sample.prompt_length)

        # 3. Per-token KL penalty, the score at the last token, then GAE advantages whitened over every process's batch.
        kl = KL_ESTIMATORS[config.kl_estimator](scored.logprobs, scored.ref_logprobs)
        rewards, non_score = kl_penalised_rewards(scored.scores, kl, mask, beta)
        if config.whiten_rewards:
            rewards = whiten_across_processes(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, config.gamma, config.lam)
        advantages = whiten_across_processes(advantages, mask)

        rollout = Rollout(
            query_responses=sample.sequences, attention_mask=sample.attention_mask, response_mask=mask,
            logprobs=scored.logprobs, ref_logprobs=scored.ref_logprobs, scores=scored.scores, advantages=advantages,
            prompt_length=sample.prompt_length, values=values, rewards=rewards, returns=returns,
        )  # fmt: skip
        stats = {**scored.stats, "reward": (scored.scores + non_score.sum(-1)).mean().item(),
                 "explained_variance": explained_variance(values, returns, mask).item()}  # fmt: skip
        return rollout, stats

    def update_step(self, batch: Rollout, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy loss plus `vf_coef` times the clipped value loss on one minibatch."""
        config, models = self.config, self.models
        logprobs, entropy = response_logprobs(models.policy, batch.query_responses, batch.attention_mask,
                                              batch.prompt_length, config.temperature)  # fmt: skip
        values = response_values(models.value, batch.query_responses, batch.attention_mask, batch.prompt_length)
        policy_loss, policy_stats = policy_loss_clipped(logprobs, batch.logprobs, batch.advantages, batch.response_mask,
                                                        config.clip_range)  # fmt: skip
        value_loss, value_stats = value_loss_clipped(values, batch.values, batch.returns, batch.response_mask,
                                                     config.clip_range_value)  # fmt: skip
        stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                 "entropy": masked_mean(entropy, batch.response_mask).item(), **policy_stats, **value_stats}  # fmt: skip
        return policy_loss + config.vf_coef * value_loss, stats
