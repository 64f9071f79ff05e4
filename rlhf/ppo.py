"""PPO with a KL penalty on `accelerate`: rollouts, rewards, advantages, clipped updates.

The maths lives in `rlhf.ppo_math` (pure functions); this module wires it to models:
`make_rollout` samples responses with our KV-cache engine and turns them into a `Rollout`
(policy and reference log-probs recomputed by the update's own forward, reward-model scores
normalised to the SFT policy's own PPO samples (`measure_score_normalisation`), values,
KL-penalised rewards, whitened GAE advantages); `ppo_update` runs the clipped policy and value losses over reshuffled minibatches.

Conventions: the policy's log-probabilities are those of the temperature-scaled logits it sampled
from; `logits[:, P - 1 : -1]` predict the response tokens `sequences[:, P:]` (P = prompt width);
values are read at the same positions (the state before each response token).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.distributed import all_sum, every_process
from rlhf.generation import GenerationResult, generate, left_pad
from rlhf.model import normalise_score_head
from rlhf.ppo_math import (
    KL_ESTIMATORS,
    Rollout,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalised_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    policy_loss_clipped,
    value_loss_clipped,
    whiten,
)
from rlhf.training import gradients_finite


MIN_NORMALISATION_SAMPLES = 16
"""Fewer stopped responses than this and the score normalisation is measured over every response."""


@dataclass
class ScoreNormalisation:
    """PPO's score: the reward model's normalised score rescaled, ``(score - mean) / std``, with the
    mean and std of the SFT policy's own PPO samples (`measure_score_normalisation`). The identity
    until measured."""

    mean: float = 0.0
    std: float = 1.0
    samples: int = 0
    """Responses the figures come from (0: not measured)."""
    responses: int = 0
    """Responses sampled; `samples` of them stopped, or all if too few stopped."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B,) -> (B,)."""
        return (scores - self.mean) / self.std


@dataclass
class PPOModels:
    policy: torch.nn.Module
    """Causal LM being trained (possibly a PEFT model)."""
    value: torch.nn.Module
    """Scalar-head model trained alongside (initialised from the reward model; see `use_score_normalisation`)."""
    reward: torch.nn.Module
    """Frozen reward model; its config holds the normalisation statistics of older models."""
    reference: torch.nn.Module | None
    """Frozen copy of the initial policy; None with LoRA (the policy with adapters disabled)."""
    tokenizer: Any
    score_normalisation: ScoreNormalisation = field(default_factory=ScoreNormalisation)
    """How PPO rescales the reward model's normalised scores (set by `use_score_normalisation`)."""


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (itself when not wrapped)."""
    return model.module if hasattr(model, "module") else model


def reference_context(models: PPOModels):
    """The reference policy: the frozen copy, or the LoRA policy with its adapters disabled."""
    if models.reference is not None:
        return contextlib.nullcontext(models.reference)
    policy = unwrapped(models.policy)

    @contextlib.contextmanager
    def disabled():
        with policy.disable_adapter():
            yield policy

    return disabled()


def response_logprobs(model, sequences, attention_mask, prompt_length: int, temperature: float):
    """(log-probs (B, T), entropy (B, T)) of the response tokens under temperature-scaled logits.

    The entropy is only logged: it is computed without gradient (no graph through its (B, T, V) terms).
    """
    logits = model(input_ids=sequences, attention_mask=attention_mask).logits[:, prompt_length - 1 : -1]  # (B, T, V)
    logits = logits.float() / temperature
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach())
    return logprobs_from_logits(logits, sequences[:, prompt_length:]), entropy


def response_values(value_model, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
    """Values (B, T) of the states before each response token."""
    token_scores = value_model(input_ids=sequences, attention_mask=attention_mask).token_scores  # (B, P + T, 1)
    return token_scores[:, prompt_length - 1 : -1, 0].float()


def normalised_scores(reward_model, sequences, attention_mask) -> torch.Tensor:
    """Reward-model scores (B,) at each sequence's last real token, normalised to the SFT policy's statistics."""
    raw = reward_model(input_ids=sequences, attention_mask=attention_mask).logits[:, 0].float()
    return (raw - reward_model.config.reward_mean) / reward_model.config.reward_std


def use_score_normalisation(models: PPOModels, normalisation: ScoreNormalisation) -> None:
    """Score rollouts with `normalisation`, and fold into the value model's head every map from its
    outputs to PPO's scores: its stored normalisation (older reward models; 0 and 1 otherwise), then
    `normalisation`. The value model then starts on the scale of the returns it predicts. Once per run."""
    models.score_normalisation = normalisation
    value = unwrapped(models.value)
    mean, std = value.config.reward_mean, value.config.reward_std
    value.config.reward_mean, value.config.reward_std = 0.0, 1.0
    normalise_score_head(value, mean, std)
    normalise_score_head(value, normalisation.mean, normalisation.std)


def sample_episodes(models: PPOModels, prompt_tokens: list[list[int]], config, generator: torch.Generator) -> GenerationResult:
    """The policy's responses to token prompts, sampled as rollouts are (engine, temperature, max_new_tokens)."""
    tokenizer, device = models.tokenizer, next(models.policy.parameters()).device
    ids, mask = left_pad(prompt_tokens, tokenizer.pad_token_id, device)
    policy = unwrapped(models.policy)  # generation steps differ between processes: no DDP collectives here
    return generate(
        policy, ids, mask, config.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
        temperature=config.temperature, generator=generator,
    )  # fmt: skip


@torch.no_grad()
def measure_score_normalisation(models: PPOModels, prompt_tokens: list[list[int]], config, generator: torch.Generator
                                ) -> ScoreNormalisation:  # fmt: skip
    """Mean and (population) std of the reward model's normalised scores on the policy's responses to
    `prompt_tokens`, sampled as rollouts are, `rollout_batch_size` prompts at a time: over the exact
    token sequences of the responses that stopped (the others get `missing_eos_penalty`, not a score),
    or of all if fewer than MIN_NORMALISATION_SAMPLES stopped; the identity with fewer than two
    (no prompts: nothing sampled)."""
    if not prompt_tokens:
        return ScoreNormalisation()
    stopped, every = [], []
    for start in range(0, len(prompt_tokens), config.rollout_batch_size):
        sample = sample_episodes(models, prompt_tokens[start : start + config.rollout_batch_size], config, generator)
        scores = normalised_scores(models.reward, sample.sequences, sample.attention_mask)
        every.append(scores)
        stopped.append(scores[sample.stopped])
    stopped, every = torch.cat(stopped), torch.cat(every)
    scores = stopped if len(stopped) >= MIN_NORMALISATION_SAMPLES else every
    if len(scores) < 2:
        return ScoreNormalisation(responses=len(every))
    std = scores.std(correction=0).item()
    return ScoreNormalisation(scores.mean().item(), std if std > 0 else 1.0, samples=len(scores), responses=len(every))


@torch.no_grad()
def whiten_across_processes(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`masked_whiten` with the mean and (population) variance over the masked entries of every
    process's batch. values, mask: (B, T) -> (B, T). With one process it equals `masked_whiten`."""
    count = all_sum(masked_sum(torch.ones_like(values), mask)).clamp_min(1)
    mean = all_sum(masked_sum(values, mask)) / count
    var = all_sum(masked_sum((values - mean).square(), mask)) / count
    return whiten(values, mask, mean, var, shift_mean)


@torch.no_grad()
def make_rollout(
    models: PPOModels,
    prompt_tokens: list[list[int]],
    prompt_texts: list[str],
    config,
    beta: float,
    generator: torch.Generator,
    reward_functions: list[Callable] = (),
    judge: Callable | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and evaluate one batch of prompts; returns the rollout and its statistics.

    `judge` (prompts, responses) -> scores is only logged (e.g. the demo's gold judge beside the
    reward model's score, to watch for reward hacking); `reward_functions` are added to the score.
    """
    from rlhf.responses import decode_responses

    tokenizer, device = models.tokenizer, next(models.policy.parameters()).device
    policy = unwrapped(models.policy)  # a no-grad pass: no DDP collectives (other processes' batches differ)
    clock = time.perf_counter()

    # 1. Sample responses (the engine's own log-probabilities serve sampling only).
    sample = sample_episodes(models, prompt_tokens, config, generator)
    sequences, attention, response_mask, P = sample.sequences, sample.attention_mask, sample.response_mask, sample.prompt_length
    generation_seconds = time.perf_counter() - clock

    # 2. Score: the reward model (normalised, then rescaled to the SFT policy's PPO samples), a penalty
    #    for a missing stop token, programmatic rewards.
    clock = time.perf_counter()
    rm_scores = normalised_scores(models.reward, sequences, attention)
    scores = torch.where(sample.stopped, config.reward_model_weight * models.score_normalisation(rm_scores),
                         torch.full_like(rm_scores, config.missing_eos_penalty))
    responses = decode_responses(tokenizer, sample.responses, response_mask) if reward_functions or judge else []
    if reward_functions:
        for function in reward_functions:
            scores = scores + torch.tensor(function(prompt_texts, responses), dtype=scores.dtype, device=device)

    # 3. Policy and reference log-probabilities by the forward the update uses (the engine's KV-cache
    #    path rounds differently: the first ratio would not be 1, nor the KL of an unchanged policy 0), and values.
    logprobs, _ = response_logprobs(policy, sequences, attention, P, config.temperature)
    with reference_context(models) as reference:
        ref_logprobs, _ = response_logprobs(reference, sequences, attention, P, config.temperature)
    values = response_values(unwrapped(models.value), sequences, attention, P)
    scoring_seconds = time.perf_counter() - clock

    # 4. Per-token KL penalty, the score at the last token, then GAE advantages whitened over every process's batch.
    kl = KL_ESTIMATORS[config.kl_estimator](logprobs, ref_logprobs)
    rewards, non_score = kl_penalised_rewards(scores, kl, response_mask, beta)
    if config.whiten_rewards:
        rewards = whiten_across_processes(rewards, response_mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, values, response_mask, config.gamma, config.lam)
    advantages = whiten_across_processes(advantages, response_mask)

    rollout = Rollout(
        query_responses=sequences, attention_mask=attention, response_mask=response_mask,
        logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores,
        rewards=rewards, advantages=advantages, returns=returns, prompt_length=P,
    )  # fmt: skip
    kl_per_sequence = (kl * response_mask).sum(-1)
    stats = {
        "score": scores.mean().item(),
        "rm_score": rm_scores.mean().item(),
        "reward": (scores + non_score.sum(-1)).mean().item(),
        "kl": kl_per_sequence.mean().item(),
        "beta": beta,
        "response_length": response_mask.sum(-1).float().mean().item(),
        "stopped": sample.stopped.float().mean().item(),
        "explained_variance": explained_variance(values, returns, response_mask).item(),
        **({"judge": sum(judge(prompt_texts, responses)) / len(responses)} if judge else {}),
        "time_generate": generation_seconds,
        "time_score": scoring_seconds,
    }
    return rollout, stats


def ppo_update(models: PPOModels, rollout: Rollout, config, accelerator, optimizer, scheduler, generator) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy and value updates over reshuffled minibatches.

    `optimizer` holds both models' parameters (a group each). Under DDP the gradients are averaged
    over the processes on the last micro-batch of each optimizer step only. A step whose loss or
    gradients are NaN or inf on any process is skipped by all (see `optimizer_step`) and counted in
    `nonfinite_steps`. The statistics are means over the micro-batches with a finite loss; every
    process returns the same keys, NaN where no micro-batch was finite.
    """
    clock = time.perf_counter()
    totals: dict[str, list[float]] = {}
    per_step = config.minibatch_size * config.grad_accum
    skipped = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(rollout), generator=generator)
        for start in range(0, len(rollout), per_step):
            finite = True
            for micro in range(config.grad_accum):
                index = order[start + micro * config.minibatch_size : start + (micro + 1) * config.minibatch_size]
                batch = rollout.select(index.to(rollout.scores.device))
                with gradient_sync(accelerator, models, micro == config.grad_accum - 1):
                    with accelerator.autocast():
                        logprobs, entropy = response_logprobs(
                            models.policy, batch.query_responses, batch.attention_mask, batch.prompt_length, config.temperature
                        )
                        values = response_values(models.value, batch.query_responses, batch.attention_mask, batch.prompt_length)
                    policy_loss, policy_stats = policy_loss_clipped(
                        logprobs, batch.logprobs, batch.advantages, batch.response_mask, config.clip_range
                    )
                    value_loss, value_stats = value_loss_clipped(
                        values, batch.values, batch.returns, batch.response_mask, config.clip_range_value
                    )
                    loss = (policy_loss + config.vf_coef * value_loss) / config.grad_accum
                    accelerator.backward(loss)  # even a NaN one: every DDP process must take part in each reduction
                stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                         "entropy": masked_mean(entropy, batch.response_mask).item(), **policy_stats, **value_stats}  # fmt: skip
                if not torch.isfinite(loss):  # its statistics count as missing (NaN), keeping every key
                    finite = False
                    stats = dict.fromkeys(stats, math.nan)
                for key, value in stats.items():
                    totals.setdefault(key, []).append(float(value))
            skipped += not optimizer_step(models, accelerator, optimizer, scheduler, config.max_grad_norm, finite)
    kept = {key: [v for v in values if not math.isnan(v)] for key, values in totals.items()}
    result = {key: sum(values) / len(values) if values else math.nan for key, values in kept.items()}
    result["ratio_max"] = max(kept["ratio_max"], default=math.nan)
    result["nonfinite_steps"] = skipped
    result["time_update"] = time.perf_counter() - clock
    return result


def gradient_sync(accelerator, models: PPOModels, sync: bool) -> contextlib.ExitStack:
    """A context in which backward all-reduces the gradients across processes only if `sync`
    (DDP's `no_sync` otherwise: micro-batches before the last of an optimizer step accumulate locally)."""
    stack = contextlib.ExitStack()
    if not sync:
        for model in (models.policy, models.value):
            stack.enter_context(accelerator.no_sync(model))
    return stack


def optimizer_step(models: PPOModels, accelerator, optimizer, scheduler, max_grad_norm: float, loss_finite: bool) -> bool:
    """Clip each model's gradients and apply them, then advance the schedule; returns whether the
    step was taken.

    A step with a NaN/inf loss or gradient on any process is dropped by every process (gradients
    cleared; AdamW leaves weights and moments as they were). Under fp16 the gradient scaler unscales
    once, before clipping, and drops such a step itself, lowering its scale.
    """
    finite = every_process(loss_finite and all_gradients_finite(models))
    if finite or accelerator.scaler is not None:
        accelerator.unscale_gradients()
        if max_grad_norm > 0:
            for model in (models.policy, models.value):
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        finite = not accelerator.optimizer_step_was_skipped
    scheduler.step()  # the schedule follows optimizer steps taken or skipped alike
    optimizer.zero_grad(set_to_none=True)
    return finite


def all_gradients_finite(models: PPOModels) -> bool:
    return gradients_finite(p for model in (models.policy, models.value) for p in model.parameters())
