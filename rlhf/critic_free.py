"""The critic-free RL algorithms on the RL driver: GRPO (and Dr. GRPO), RLOO and REINFORCE++.

None trains a value model: each answer's baseline comes from other answers. Each samples
`answers_per_prompt` answers per prompt (adjacent rows, so a process's batch holds whole groups),
scores them as PPO does (`rlhf.rl_models.sample_and_score`), and turns the scores into per-token
advantages by its own pure function (`rlhf.group_math`); every one updates with the clipped policy
loss (`group_math.policy_loss`), `update_epochs` passes over each iteration's episodes. They differ
only in where the KL to the reference goes and how the advantages and the loss are formed:

| algorithm   | advantage                                             | KL to the reference              | loss over tokens |
|-------------|-------------------------------------------------------|----------------------------------|------------------|
| GRPO        | (r - group mean) / group std                          | k3 loss term, weight beta        | sequence_mean    |
| Dr. GRPO    | r - group mean                                        | k3 loss term, weight beta        | token_sum        |
| RLOO        | r' - mean of the others' r', r' = r - beta * sum k1   | in the sequence reward           | token_mean       |
| REINFORCE++ | returns of per-token rewards, whitened over the batch | per-token reward -beta * k1      | token_mean       |
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf.group_math import (
    GROUP_ADVANTAGES, discounted_returns, kl_loss, kl_penalised_scores, policy_loss, rloo_advantages, token_advantages,
)  # fmt: skip
from rlhf.ppo_math import Rollout, kl_penalised_rewards, masked_mean
from rlhf.rl_models import RLModels, ScoredSample, response_logprobs, sample_and_score, whiten_across_processes


class CriticFree:
    """The rollout and update steps the critic-free algorithms share; a subclass gives `advantages`."""

    aggregation = "token_mean"
    """How the per-token losses reduce to one (`group_math.LOSS_AGGREGATIONS`)."""
    kl_in_loss = False
    """True: the KL to the reference is a k3 loss term weighted by beta; False: it is in the rewards."""

    def __init__(self, models: RLModels, config, reward_functions: list[Callable] = (), judge: Callable | None = None):
        self.models, self.config, self.reward_functions, self.judge = models, config, reward_functions, judge

    def advantages(self, scored: ScoredSample, beta: float) -> torch.Tensor:
        """Per-token advantages (B, T) of one batch of scored groups."""
        raise NotImplementedError

    @torch.no_grad()
    def rollout_step(self, prompt_tokens: list[list[int]], prompt_texts: list[str], beta: float,
                     generator: torch.Generator) -> tuple[Rollout, dict[str, float]]:  # fmt: skip
        """Sample `answers_per_prompt` answers per prompt, score them, and compute their advantages."""
        scored = sample_and_score(self.models, prompt_tokens, prompt_texts, self.config, generator, self.reward_functions,
                                  self.judge, copies=self.config.group_size)  # fmt: skip
        sample = scored.sample
        advantages = self.advantages(scored, beta)
        rollout = Rollout(
            query_responses=sample.sequences, attention_mask=sample.attention_mask, response_mask=sample.response_mask,
            logprobs=scored.logprobs, ref_logprobs=scored.ref_logprobs, scores=scored.scores, advantages=advantages,
            prompt_length=sample.prompt_length,
        )  # fmt: skip
        spread = scored.scores.view(-1, self.config.group_size).std(-1, correction=0).mean().item()
        return rollout, {**scored.stats, "group_score_std": spread}

    def update_step(self, batch: Rollout, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy loss, plus beta times the k3 KL loss where the KL is not in the rewards."""
        config, mask = self.config, batch.response_mask
        logprobs, entropy = response_logprobs(self.models.policy, batch.query_responses, batch.attention_mask,
                                              batch.prompt_length, config.temperature)  # fmt: skip
        loss, stats = policy_loss(logprobs, batch.logprobs, batch.advantages, mask, config.clip_range, self.aggregation,
                                  config.max_new_tokens)  # fmt: skip
        stats = {"policy_loss": loss.item(), "entropy": masked_mean(entropy, mask).item(), **stats}
        if self.kl_in_loss:
            kl = kl_loss(logprobs, batch.ref_logprobs, mask, self.aggregation, config.max_new_tokens)
            stats["kl_loss"] = kl.item()
            loss = loss + beta * kl
        return loss, stats


class GRPO(CriticFree):
    """Group Relative Policy Optimization (Shao et al. 2024); `variant: dr_grpo` is Liu et al. 2025's."""

    kl_in_loss = True

    def __init__(self, models: RLModels, config, reward_functions: list[Callable] = (), judge: Callable | None = None):
        super().__init__(models, config, reward_functions, judge)
        self.aggregation = {"grpo": "sequence_mean", "dr_grpo": "token_sum"}[config.variant]

    def advantages(self, scored: ScoredSample, beta: float) -> torch.Tensor:
        group = GROUP_ADVANTAGES[self.config.variant](scored.scores, self.config.group_size)  # (B,)
        return token_advantages(group, scored.sample.response_mask)


class RLOO(CriticFree):
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024), the KL in the sequence reward."""

    def advantages(self, scored: ScoredSample, beta: float) -> torch.Tensor:
        mask = scored.sample.response_mask
        rewards = kl_penalised_scores(scored.scores, scored.kl, mask, beta)  # (B,)
        return token_advantages(rloo_advantages(rewards, self.config.group_size), mask)


class ReinforcePP(CriticFree):
    """REINFORCE++ (Hu 2025): per-token KL-penalised rewards, their returns whitened over every process's batch."""

    def advantages(self, scored: ScoredSample, beta: float) -> torch.Tensor:
        mask = scored.sample.response_mask
        rewards, _ = kl_penalised_rewards(scored.scores, scored.kl, mask, beta)  # (B, T)
        return whiten_across_processes(discounted_returns(rewards, mask, self.config.gamma), mask)
