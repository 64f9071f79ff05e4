"""Typed configuration: one dataclass per stage, parsed from a pipeline YAML.

A pipeline file looks like:

    run_dir: runs/demo          # where every stage writes (overridable with --run-dir)
    seed: 0
    stages:
      tokenizer: {data: [data_samples/corpus.txt], vocab_size: 2048}
      pretrain: {data: [data_samples/corpus.txt], model: {n_layer: 4}, max_steps: 300}
      sft: {data: data_samples/sft.jsonl, lr: 1e-3}

Stages run in the fixed order of `STAGE_ORDER`; a stage absent from `stages` is not run. Every
field is documented once, below its declaration. Unknown keys, keys given twice, wrong types and invalid
values are `ConfigError`s naming the file (or the override) and the key. Every number is checked as it
is read, for every field at once (`_convert`: finite, at most MAX_INT or MAX_FLOAT in magnitude), then
against its own range in its dataclass's `__post_init__`. Relative paths resolve against the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.data import decode_utf8
from rlhf.errors import ConfigError

STAGE_ORDER = ("tokenizer", "pretrain", "sft", "reward", "ppo", "report")
MAX_INT = 2**31 - 1
"""Largest integer any setting takes: larger ones are typos, and overflow the libraries' C integers."""
MAX_FLOAT = 1e6
"""Largest magnitude any real-valued setting takes (rates, coefficients, penalties, epochs)."""
MAX_VOCAB = 1_000_000
"""Largest BPE vocabulary: far beyond any corpus this trains on (a typo such as 10**12 aborts the tokenizer trainer)."""
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
"""The Linear layers of `rlhf.model` that LoRA adapters can wrap."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class TokenizerConfig:
    data: list[str] = field(default_factory=list)
    """Text files to train on: .txt read whole; .jsonl/.json every string value (messages included)."""
    kind: str = "bpe"
    """'bpe' (byte-level BPE) or 'char' (one token per character, byte fallback for unseen ones)."""
    vocab_size: int = 2048
    """Vocabulary size for 'bpe', special tokens and the 256 byte tokens included. Ignored for 'char'."""
    exclude_last_rows: int = 0
    """Rows at the end of each tabular file left out (keep a later stage's test split unseen)."""

    def __post_init__(self):
        _check(len(self.data) > 0, "data: give at least one file")
        _check(self.kind in ("bpe", "char"), f"kind: must be 'bpe' or 'char', got {self.kind!r}")
        _check(261 <= self.vocab_size <= MAX_VOCAB,
               f"vocab_size: must be in [261, {MAX_VOCAB}] (specials + 256 bytes at least), got {self.vocab_size}")
        _check(self.exclude_last_rows >= 0, f"exclude_last_rows: must be >= 0, got {self.exclude_last_rows}")


@dataclass
class ModelShape:
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    n_positions: int = 256
    """Context length: the longest sequence the model can read."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (pretraining and SFT only)."""

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            _check(getattr(self, name) > 0, f"{name}: must be positive, got {getattr(self, name)}")
        _check(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _check(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class OptimizationConfig:
    """Optimizer settings shared by every training stage, PPO included."""

    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    lr_schedule: str = "cosine"
    """After warm-up: 'cosine' (down to min_lr where the stage has one, else 0), 'linear' (down to 0) or 'constant'."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    amp: str = "auto"
    """Mixed precision: 'auto' (bf16 on CUDA where supported, else fp16; fp32 on CPU), 'bf16', 'fp16', 'off'."""

    def __post_init__(self):
        _check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        _check(self.lr_schedule in ("cosine", "linear", "constant"), f"lr_schedule: unknown {self.lr_schedule!r}")
        _check(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        _check(self.amp in ("auto", "bf16", "fp16", "off"), f"amp: unknown {self.amp!r}")


@dataclass
class TrainingConfig(OptimizationConfig):
    """Settings shared by the Trainer-based stages (pretrain, sft, reward)."""

    max_steps: int = -1
    """Optimizer steps to run; -1 means `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is -1."""
    batch_size: int = 16
    """Sequences per process (device) per micro-batch: an optimizer step sees processes x batch_size x grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    eval_fraction: float = 0.05
    """Share of the data held out for evaluation (the last rows, or the tail of a text corpus)."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 evaluates once, at the end."""
    eval_batch_size: int = 32
    """Sequences per evaluation batch."""
    log_every: int = 10
    """Log metrics every this many steps."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile the model (worth it on CUDA for long runs; the first steps are slow while it compiles)."""
    max_nonfinite_steps: int = 10
    """Stop after this many optimizer steps in a row with a NaN or inf loss or gradient (each one is skipped)."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.max_steps == -1 or self.max_steps > 0, f"max_steps: must be -1 or positive, got {self.max_steps}")
        _check(self.epochs > 0, f"epochs: must be positive, got {self.epochs}")
        _check(self.batch_size > 0, f"batch_size: must be positive, got {self.batch_size}")
        _check(self.grad_accum > 0, f"grad_accum: must be positive, got {self.grad_accum}")
        _check(0 <= self.min_lr <= self.lr, f"min_lr: must be in [0, lr], got {self.min_lr}")
        _check(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1/adam_beta2: must be in [0, 1)")
        _check(0 < self.eval_fraction < 1, f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        for name in ("eval_every", "log_every", "save_every"):
            _check(getattr(self, name) >= 0, f"{name}: must be >= 0")
        _check(self.max_nonfinite_steps > 0, f"max_nonfinite_steps: must be positive, got {self.max_nonfinite_steps}")


PACKINGS = ("wrapped", "documents")
TXT_DOCUMENTS = ("file", "lines")


@dataclass
class PretrainConfig(TrainingConfig):
    data: list[str] = field(default_factory=list)
    """Plain-text corpus: .txt files read whole, or .jsonl/.json/.parquet/.csv with a 'text' column."""
    model: ModelShape = field(default_factory=ModelShape)
    """Shape of the decoder trained from scratch."""
    block_size: int = 0
    """Tokens per packed training block; 0 means the model's context (n_positions)."""
    text_column: str = "text"
    """Column holding the text in tabular files (e.g. 'chosen' for hh-rlhf dialogues)."""
    exclude_last_rows: int = 0
    """Rows at the end of each tabular file left out (keep a later stage's test split unseen)."""
    packing: str = "wrapped"
    """'wrapped': documents joined by EOS into one stream cut into blocks of block_size (nanoGPT);
    'documents': each document its own row, starting at position 0 (longer ones cut into blocks),
    padded per batch. With learned positions, a corpus of short independent documents teaches
    facts far faster when each starts where a prompt starts."""
    txt_documents: str = "file"
    """How a .txt file splits into documents: 'file' (the whole file is one) or 'lines' (each non-empty line)."""

    def __post_init__(self):
        super().__post_init__()
        _check(len(self.data) > 0, "data: give at least one file")
        _check(self.packing in PACKINGS, f"packing: must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        _check(self.txt_documents in TXT_DOCUMENTS,
               f"txt_documents: must be one of {', '.join(TXT_DOCUMENTS)}, got {self.txt_documents!r}")
        _check(0 <= self.block_size <= self.model.n_positions, "block_size: must be in [0, model.n_positions]")
        _check(self.exclude_last_rows >= 0, f"exclude_last_rows: must be >= 0, got {self.exclude_last_rows}")


@dataclass
class LoraSettings:
    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get adapters."""

    def __post_init__(self):
        _check(self.r > 0, f"r: must be positive, got {self.r}")
        _check(self.alpha > 0, f"alpha: must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "target_modules: name at least one layer")
        for name in self.target_modules:
            _check(name in LORA_TARGETS, f"target_modules: {name!r} matches no layer (the model has {', '.join(LORA_TARGETS)})")


@dataclass
class SFTConfig(TrainingConfig):
    data: str = ""
    """Demonstrations: conversational 'messages', or 'prompt' + 'completion' (strings or messages)."""
    max_length: int = 0
    """Longest tokenized example; 0 means the model's context. A longer example is an error naming its row."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights; they are merged into the saved model."""
    eval_prompts: str = ""
    """Optional held-out prompts ('prompt' column) whose responses the judge scores, before and after SFT."""
    judge: str = ""
    """Optional 'module:function' scoring (prompts, responses) -> floats, e.g. 'rlhf.demo_task:gold_judge'."""
    max_new_tokens: int = 48
    """Response length limit when generating for the judge."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.data), "data: give a file")
        _check(bool(self.eval_prompts) == bool(self.judge), "eval_prompts and judge: give both or neither")
        _check(self.max_length >= 0, f"max_length: must be >= 0, got {self.max_length}")
        _check(self.max_new_tokens > 0, f"max_new_tokens: must be positive, got {self.max_new_tokens}")


@dataclass
class RewardConfig(TrainingConfig):
    data: str = ""
    """Preference pairs: prompt + chosen + rejected, chosen + rejected, messages, or hh-rlhf dialogue strings."""
    init: str = "sft"
    """Stage whose model initialises the backbone and whose policy samples the normalisation responses."""
    max_length: int = 0
    """Longest tokenized prompt + response; 0 means the model's context. Longer pairs are counted and left out."""
    eval_rows: int = 0
    """Hold out exactly the last this many rows (a fixed test split); 0 uses eval_fraction."""
    center_rewards_coefficient: float = 0.0
    """Weight of the auxiliary loss pulling rewards toward 0 (reward centring); 0 disables it."""
    norm_prompts: int = 256
    """Training prompts the init policy answers to compute the normalisation mean and std."""
    norm_max_new_tokens: int = 48
    """Response length limit for those samples."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.data), "data: give a file")
        _check(self.init in ("sft", "pretrain"), f"init: must be 'sft' or 'pretrain', got {self.init!r}")
        _check(self.max_length >= 0 and self.eval_rows >= 0, "max_length and eval_rows: must be >= 0")
        _check(self.center_rewards_coefficient >= 0, "center_rewards_coefficient: must be >= 0")
        _check(self.norm_prompts > 1, f"norm_prompts: must be > 1, got {self.norm_prompts}")
        _check(self.norm_max_new_tokens > 0, f"norm_max_new_tokens: must be positive, got {self.norm_max_new_tokens}")


@dataclass
class PPOConfig(OptimizationConfig):
    prompts: str = ""
    """Prompts to answer ('prompt' column: a string or a conversation ending with the user)."""
    steps: int = 100
    """Rollout-and-update iterations."""
    rollout_batch_size: int = 64
    """Prompts answered per iteration by each process: an iteration samples processes x rollout_batch_size episodes."""
    minibatch_size: int = 16
    """Rollouts per micro-batch on each process; an optimizer step sees processes x minibatch_size x grad_accum."""
    grad_accum: int = 1
    """Minibatches accumulated per optimizer step."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, minibatches reshuffled every pass."""
    lr: float = 3e-4
    """Peak learning rate of the policy (AdamW); the shared optimizer settings are in OptimizationConfig."""
    value_lr: float = 0.0
    """Peak learning rate of the value model; 0 means lr."""
    lr_schedule: str = "linear"
    """Schedule after warm-up, over all PPO optimizer steps (see OptimizationConfig)."""
    max_new_tokens: int = 40
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature; the log-probabilities PPO trains on use the same scaled logits."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty (initial value when adaptive)."""
    kl_estimator: str = "k1"
    """Per-token KL estimate penalised in the reward: 'k1' (log-ratio), the only one whose gradient as a
    detached reward is the KL's ('k3' is not: E[k3 * grad log pi] != grad KL, so it is refused)."""
    kl_target: float = 0.0
    """If > 0, beta adapts toward this mean KL per sequence over kl_horizon episodes (Ziegler et al.)."""
    kl_horizon: int = 10000
    """Episodes over which the adaptive controller closes the KL gap. Each iteration of n episodes
    (processes x rollout_batch_size) multiplies beta by 1 + clip(KL / kl_target - 1, -0.2, 0.2) * n / kl_horizon,
    so by 1 +- 0.2 n / kl_horizon at most, and over k iterations by at most (1 +- 0.2 n / kl_horizon)^k.
    Size it to the run: with n = 64 and k = 60, a horizon of 10000 lets beta move by 8% at most
    (0.9987^60 = 0.93), 800 by a factor of about 2.6 either way (0.984^60 = 0.38, 1.016^60 = 2.59)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    clip_range: float = 0.2
    """PPO ratio clipping."""
    clip_range_value: float = 0.2
    """Value clipping around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss (the value model has its own optimizer; this scales its gradient)."""
    whiten_rewards: bool = False
    """Whiten the KL-penalised rewards (keeping their mean) before GAE."""
    missing_eos_penalty: float = -1.0
    """Score given (in normalised reward units) to a response that never emits the stop token."""
    norm_prompts: int = 256
    """Prompts (from the start of the training stream) the SFT policy answers before training, sampled
    exactly as rollouts are (engine, temperature, max_new_tokens): the mean and std of the reward model's
    scores on those that stopped normalise PPO's scores, and the same map is folded into the value
    model's head. Measured once and kept in the checkpoints. 0 keeps the reward stage's normalisation."""
    reward_functions: list[str] = field(default_factory=list)
    """Extra 'module:function' rewards taking (prompts, responses) texts, added to the score."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's normalised score in the score. 0 trains on `reward_functions` alone (and the
    missing-EOS penalty): the reward model then only initialises the value model and is logged as rm_score."""
    lora: LoraSettings | None = None
    """Train LoRA adapters on the policy; the reference is the policy with adapters disabled."""
    eval_prompts: str = ""
    """Held-out prompts scored before and after PPO (judge, reward model, KL to the reference)."""
    judge: str = ""
    """Optional 'module:function' judge for the held-out evaluation, e.g. 'rlhf.demo_task:gold_judge'."""
    save_every: int = 20
    """Write a resumable checkpoint every this many iterations."""
    max_nonfinite_iterations: int = 3
    """Stop after this many iterations in a row whose every update had a NaN or inf loss or gradient."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.prompts), "prompts: give a file")
        for name in ("steps", "rollout_batch_size", "minibatch_size", "grad_accum", "ppo_epochs", "max_new_tokens",
                     "save_every", "max_nonfinite_iterations"):  # fmt: skip
            _check(getattr(self, name) > 0, f"{name}: must be positive, got {getattr(self, name)}")
        _check(self.rollout_batch_size % (self.minibatch_size * self.grad_accum) == 0,
               "rollout_batch_size must be a multiple of minibatch_size * grad_accum")  # fmt: skip
        _check(self.value_lr >= 0, f"value_lr: must be >= 0, got {self.value_lr}")
        _check(self.norm_prompts >= 0, f"norm_prompts: must be >= 0, got {self.norm_prompts}")
        _check(self.temperature > 0, f"temperature: must be positive, got {self.temperature}")
        _check(self.kl_coef >= 0, f"kl_coef: must be >= 0, got {self.kl_coef}")
        _check(self.kl_estimator != "k3", "kl_estimator: 'k3' as a per-token reward gives a biased KL gradient "
                                          "(E[k3 * grad log pi] != grad KL); use 'k1', whose gradient is exact")
        _check(self.kl_estimator == "k1", f"kl_estimator: must be 'k1', got {self.kl_estimator!r}")
        _check(self.kl_target >= 0 and self.kl_horizon > 0, "kl_target must be >= 0 and kl_horizon positive")
        _check(self.kl_target == 0 or self.kl_coef > 0, "kl_target: an adaptive beta needs a positive kl_coef to start from")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam: must be in [0, 1]")
        _check(self.clip_range > 0 and self.clip_range_value > 0, "clip_range and clip_range_value: must be positive")
        _check(self.vf_coef >= 0, f"vf_coef: must be >= 0, got {self.vf_coef}")
        _check(bool(self.eval_prompts) or not self.judge, "judge: needs eval_prompts")
        _check(self.reward_model_weight >= 0, f"reward_model_weight: must be >= 0, got {self.reward_model_weight}")
        _check(self.reward_model_weight > 0 or bool(self.reward_functions),
               "reward_model_weight: 0 leaves nothing to reward; add reward_functions")  # fmt: skip


@dataclass
class ReportConfig:
    eval_prompts: str = ""
    """Held-out prompts ('prompt' column); a 'reference' answer column adds BLEU and perplexity."""
    policies: list[str] = field(default_factory=lambda: ["sft", "ppo", "pretrain"])
    """Stages whose policies are compared, the first being the baseline of the win rates."""
    best_of: list[int] = field(default_factory=lambda: [4, 16])
    """Best-of-N baselines compared after those policies: for each N, `<first policy>@best-of-N` (N answers
    per prompt from the first policy, the one the reward model scores highest kept; see `rlhf compare`).
    Empty: none. Each costs N times the first policy's sampling."""
    reward: str = "reward"
    """Stage whose reward model scores the responses."""
    reference: str = "sft"
    """Stage whose policy KL is measured against."""
    judge: str = ""
    """Optional 'module:function' gold judge of (prompts, responses), e.g. 'rlhf.demo_task:gold_judge'."""
    eval_data: str = ""
    """Held-out SFT-format data for perplexity; empty: the eval prompts' reference answers."""
    samples: int = 0
    """Use the first this many prompts; 0 means all."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature (the PPO stage samples at its own; keep them equal to compare like with like)."""
    batch_size: int = 64
    """Prompts sampled together; part of the seeding, so `rlhf compare` must use the same to match."""

    def __post_init__(self):
        _check(bool(self.eval_prompts), "eval_prompts: give a prompt file")
        _check(len(self.policies) > 0, "policies: name at least one stage")
        for name in (*self.policies, self.reference):
            _check(name in ("pretrain", "sft", "ppo"), f"policies and reference: {name!r} is not a policy stage (pretrain, sft, ppo)")
        for n in self.best_of:
            _check(n >= 1, f"best_of: N must be a positive integer, got {n}")
        _check(len(set(self.best_of)) == len(self.best_of), f"best_of: an N is listed twice in {self.best_of}")
        _check(self.samples >= 0 and self.batch_size > 0 and self.max_new_tokens > 0,
               "samples >= 0, batch_size > 0 and max_new_tokens > 0 required")  # fmt: skip
        _check(self.temperature > 0, f"temperature: must be positive, got {self.temperature}")


STAGE_CONFIGS: dict[str, type] = {
    "tokenizer": TokenizerConfig, "pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig,
    "report": ReportConfig,
}  # fmt: skip


@dataclass
class PipelineConfig:
    run_dir: str = "runs/demo"
    """Artifact directory shared by all stages."""
    seed: int = 0
    """Seed for every stage (data order, initialisation, sampling)."""
    stages: dict[str, Any] = field(default_factory=dict)
    """Stage name -> its config; stages run in the order tokenizer, pretrain, sft, reward, ppo, report."""
    source: str = ""
    """The YAML file this came from (set by the loader, not by the file)."""

    def __post_init__(self):
        _check(self.run_dir.strip() != "", "run_dir: give a directory (an empty one would write into the current directory)")
        _check(self.seed >= 0, f"seed: must be >= 0, got {self.seed}")


# ----------------------------------------------------------------------------- parsing


def _join(where: str, key: Any) -> str:
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and inner is str:
            value = [value]  # a single file where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{where}: {value} is out of range (at most {MAX_INT} in magnitude)")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value) or abs(value) > MAX_FLOAT:
            raise ConfigError(f"{where}: {value!r} is out of range (a finite number at most {MAX_FLOAT:g} in magnitude)")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    return value


def build(cls: type, data: Any, where: str):
    """Instantiate dataclass `cls` from a mapping; `where` prefixes every error ('file: key.path')."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    kwargs = {key: _convert(hints[key], value, _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:
        # "lr: must be positive" from __post_init__ becomes "file: stages.sft.lr: must be positive"
        key, sep, problem = str(error).partition(": ")
        if sep and key in known:
            raise ConfigError(f"{_join(where, key)}: {problem}") from None
        raise ConfigError(f"{where}: {error}") from None


def apply_override(tree: dict, assignment: str, source: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML) inside the nested mapping `tree`."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected key.path=value")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a mapping in {source}")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML") from None


def deep_merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the plain loader keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base loader says so
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in the same mapping")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_tree(path: Path, seen: tuple = ()) -> dict:
    """A pipeline YAML as a mapping; `extends: other.yaml` (relative to this file) starts from another."""
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        tree = yaml.load(decode_utf8(path.read_bytes(), path, ConfigError), Loader=UniqueKeyLoader)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: {where}not valid YAML: {problem}") from None
    if tree is None:
        raise ConfigError(f"{path}: the pipeline file is empty; give at least `stages:`")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file name")
    parent_path = path.parent / parent
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path}: extends: {parent} includes itself")
    return deep_merge(read_tree(parent_path, seen + (path.resolve(),)), tree)


def load_pipeline(path: str | Path, overrides: list[str] = (), run_dir: str | None = None) -> PipelineConfig:
    """Parse a pipeline YAML (plus `key.path=value` overrides) into typed configs."""
    path = Path(path)
    tree = read_tree(path)
    for assignment in overrides:
        apply_override(tree, assignment, str(path))
    try:
        config = build_pipeline(tree, path)
    except ConfigError as error:
        raise blame_override(error, path, overrides) from None
    if run_dir is not None:
        if not run_dir.strip():
            raise ConfigError("--run-dir: give a directory (an empty one would write into the current directory)")
        config.run_dir = run_dir
    return config


def build_pipeline(tree: dict, path: Path) -> PipelineConfig:
    stages_tree = tree.pop("stages", None)
    if not stages_tree:  # absent, empty or {} / []: a run that would do nothing
        raise ConfigError(f"{path}: stages: no stage to run; name at least one of {', '.join(STAGE_ORDER)}")
    if not isinstance(stages_tree, dict):
        raise ConfigError(f"{path}: stages: expected a mapping of stage name to settings")
    config = build(PipelineConfig, tree, str(path) + ":")
    for name, settings in stages_tree.items():
        if name not in STAGE_CONFIGS:
            close = difflib.get_close_matches(str(name), list(STAGE_CONFIGS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(STAGE_CONFIGS)})"
            raise ConfigError(f"{path}: stages.{name}: unknown stage{hint}")
        config.stages[name] = build(STAGE_CONFIGS[name], settings, f"{path}: stages.{name}")
    config.source = str(path)
    return config


def blame_override(error: ConfigError, path: Path, overrides: list[str]) -> ConfigError:
    """An error about a key that a command-line override set names the override, not the YAML file."""
    prefix = f"{path}: "
    message = str(error)
    if not message.startswith(prefix):
        return error
    problem = message[len(prefix) :]
    blamed = re.match(r"[\w.\[\]]+", problem)  # the key path the error names: stages.sft.lr, stages.sfft
    for assignment in reversed(overrides):  # the last override of a key is the one that counts
        key = assignment.partition("=")[0]
        if blamed and (key == blamed[0] or key.startswith(blamed[0] + ".") or blamed[0].startswith(key + ".")):
            return ConfigError(f"override {assignment!r}: {problem}")
    return error


def stage_config_dict(stage_config: Any) -> dict:
    """A stage config as plain data (for manifests and fingerprints)."""
    return dataclasses.asdict(stage_config)
