"""The models an RL stage trains and scores with, and every forward the RL algorithms share.

`RLModels` holds the policy, its frozen reference, the frozen reward model and, for PPO, a value
model. `load_models` loads them from the upstream stages' folders. Conventions (as `rlhf.ppo_math`):
the policy's log-probabilities are those of the temperature-scaled logits it sampled from;
`logits[:, P - 1 : -1]` predict the response tokens `sequences[:, P:]` (P = prompt width).

`sample_and_score` is one rollout's shared half for every algorithm: sample (each prompt `copies`
times, copies adjacent), score (reward model normalised to the SFT policy's own samples, a penalty
for a missing stop token, programmatic rewards), and the policy's and reference's log-probabilities
by the forward the update uses (so the first importance ratio is exactly 1).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.distributed import all_sum
from rlhf.generation import GenerationResult
from rlhf.model import normalise_score_head
from rlhf.ppo_math import entropy_from_logits, kl_k1, logprobs_from_logits, masked_sum, whiten
from rlhf.responses import decode_responses, sample_batch

MIN_NORMALISATION_SAMPLES = 16
"""Fewer stopped responses than this and the score normalisation is measured over every response."""


@dataclass
class ScoreNormalisation:
    """The RL score: the reward model's normalised score rescaled, ``(score - mean) / std``, with the
    mean and std of the SFT policy's own rollout samples (`measure_score_normalisation`). The
    identity until measured."""

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
class RLModels:
    policy: torch.nn.Module
    """Causal LM being trained (possibly a PEFT model; DDP-wrapped under torchrun)."""
    reward: torch.nn.Module
    """Frozen reward model; its config holds the normalisation statistics of older models."""
    reference: torch.nn.Module | None
    """Frozen copy of the initial policy; None with LoRA (the policy with adapters disabled)."""
    tokenizer: Any
    value: torch.nn.Module | None = None
    """PPO's scalar-head model, initialised from the reward model (see `use_score_normalisation`); None without a critic."""
    score_normalisation: ScoreNormalisation = field(default_factory=ScoreNormalisation)
    """How the reward model's normalised scores are rescaled (set by `use_score_normalisation`)."""

    def trained(self) -> dict[str, torch.nn.Module]:
        """The models the optimizer updates, by checkpoint file stem."""
        return {"policy": self.policy, **({"value": self.value} if self.value is not None else {})}


def load_models(sft_dir, reward_dir, tokenizer, lora, with_value: bool, gradient_checkpointing: bool = False) -> RLModels:
    """The policy (from SFT; LoRA adapters added if `lora`), its reference (a frozen copy, or None with
    LoRA), the frozen reward model and, `with_value`, a value model initialised from it; dropout off
    everywhere. With `gradient_checkpointing`, the trained models recompute their activations in backward."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.model import set_dropout
    from rlhf.training import peft_config

    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    if gradient_checkpointing:  # it recomputes only in training mode (dropout is off: the function is unchanged)
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy.train()
    reference = None
    if lora:
        policy = get_peft_model(policy, peft_config(lora))
    else:
        reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval().requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(reward_dir) if with_value else None
    if value is not None and gradient_checkpointing:
        value.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        value.train()
    for model in (policy, reference, reward, value):
        if model is not None:
            set_dropout(model, 0.0)
    return RLModels(policy=policy, reward=reward, reference=reference, tokenizer=tokenizer, value=value)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (itself when not wrapped)."""
    return model.module if hasattr(model, "module") else model


def reference_context(models: RLModels):
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
    T = sequences.shape[1] - prompt_length
    # the head only where its logits predict a response token: (B, T + 1, V), less the last position
    logits = model(input_ids=sequences, attention_mask=attention_mask, logits_to_keep=T + 1).logits[:, :-1]  # (B, T, V)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature  # (no copy at 1 in fp32)
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach())
    return logprobs_from_logits(logits, sequences[:, prompt_length:]), entropy


def normalised_scores(reward_model, sequences, attention_mask) -> torch.Tensor:
    """Reward-model scores (B,) at each sequence's last real token, normalised to the SFT policy's statistics."""
    raw = reward_model(input_ids=sequences, attention_mask=attention_mask).logits[:, 0].float()
    return (raw - reward_model.config.reward_mean) / reward_model.config.reward_std


def use_score_normalisation(models: RLModels, normalisation: ScoreNormalisation) -> None:
    """Score rollouts with `normalisation`, and fold into the value model's head (if any) every map from
    its outputs to the RL scores: its stored normalisation (older reward models; 0 and 1 otherwise), then
    `normalisation`. The value model then starts on the scale of the returns it predicts. Once per run."""
    models.score_normalisation = normalisation
    if models.value is None:
        return
    value = unwrapped(models.value)
    mean, std = value.config.reward_mean, value.config.reward_std
    value.config.reward_mean, value.config.reward_std = 0.0, 1.0
    normalise_score_head(value, mean, std)
    normalise_score_head(value, normalisation.mean, normalisation.std)


def sample_episodes(models: RLModels, prompt_tokens: list[list[int]], config, generator: torch.Generator,
                    copies: int = 1) -> GenerationResult:  # fmt: skip
    """The policy's responses to token prompts, each `copies` times in adjacent rows, sampled as
    rollouts are (engine, temperature, max_new_tokens)."""
    policy = unwrapped(models.policy)  # generation steps differ between processes: no DDP collectives here
    return sample_batch(policy, models.tokenizer, prompt_tokens, config.max_new_tokens, config.temperature, generator, copies)


@torch.no_grad()
def measure_score_normalisation(models: RLModels, prompt_tokens: list[list[int]], config, generator: torch.Generator
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


@dataclass
class ScoredSample:
    """One batch of sampled, scored episodes: what every algorithm's rollout starts from."""

    sample: GenerationResult
    scores: torch.Tensor
    """(B,): the score each episode is trained on (normalised reward model, no-EOS penalty, reward functions)."""
    logprobs: torch.Tensor
    """(B, T): the policy's log-probs of the response tokens, by the update's forward."""
    ref_logprobs: torch.Tensor
    """(B, T): the reference's log-probs of the same tokens."""
    stats: dict[str, float]
    """Means over the batch: score, rm_score, kl (k1 summed over each response), length, stop share, judge, timings."""

    @property
    def kl(self) -> torch.Tensor:
        """(B, T): the per-token k1 estimate log pi - log pi_ref."""
        return kl_k1(self.logprobs, self.ref_logprobs)


@torch.no_grad()
def sample_and_score(
    models: RLModels,
    prompt_tokens: list[list[int]],
    prompt_texts: list[str],
    config,
    generator: torch.Generator,
    reward_functions: list[Callable] = (),
    judge: Callable | None = None,
    copies: int = 1,
) -> ScoredSample:
    """Sample each prompt `copies` times, score the responses and compute both policies' log-probs.

    `judge` (prompts, responses) -> scores is only logged (e.g. the demo's gold judge beside the
    reward model's score, to watch for reward hacking); `reward_functions` are added to the score.
    """
    device = next(models.policy.parameters()).device
    texts = [text for text in prompt_texts for _ in range(copies)]
    clock = time.perf_counter()

    # 1. Sample responses (the engine's own log-probabilities serve sampling only).
    sample = sample_episodes(models, prompt_tokens, config, generator, copies)
    generation_seconds, clock = time.perf_counter() - clock, time.perf_counter()

    # 2. Score: the reward model (normalised, then rescaled to the SFT policy's samples), a penalty for a
    #    missing stop token, programmatic rewards.
    rm_scores = normalised_scores(models.reward, sample.sequences, sample.attention_mask)
    scores = torch.where(sample.stopped, config.reward_model_weight * models.score_normalisation(rm_scores),
                         torch.full_like(rm_scores, config.missing_eos_penalty))  # fmt: skip
    responses = decode_responses(models.tokenizer, sample.responses, sample.response_mask) if reward_functions or judge else []
    for function in reward_functions:
        scores = scores + torch.tensor(function(texts, responses), dtype=scores.dtype, device=device)

    # 3. Policy and reference log-probabilities by the forward the update uses (the engine's KV-cache path
    #    rounds differently: the first ratio would not be 1, nor the KL of an unchanged policy 0).
    policy = unwrapped(models.policy)  # a no-grad pass: no DDP collectives (other processes' batches differ)
    P = sample.prompt_length
    logprobs, _ = response_logprobs(policy, sample.sequences, sample.attention_mask, P, config.temperature)
    with reference_context(models) as reference:
        ref_logprobs, _ = response_logprobs(reference, sample.sequences, sample.attention_mask, P, config.temperature)

    mask = sample.response_mask
    stats = {
        "score": scores.mean().item(),
        "rm_score": rm_scores.mean().item(),
        "kl": (kl_k1(logprobs, ref_logprobs) * mask).sum(-1).mean().item(),
        "response_length": mask.sum(-1).float().mean().item(),
        "stopped": sample.stopped.float().mean().item(),
        **({"judge": sum(judge(texts, responses)) / len(responses)} if judge else {}),
        "time_generate": generation_seconds,
        "time_score": time.perf_counter() - clock,
    }
    return ScoredSample(sample, scores, logprobs, ref_logprobs, stats)
