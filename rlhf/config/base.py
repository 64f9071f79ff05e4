"""Settings shared by several stages: the value checks, the model shape, the optimizer, the Trainer
stages' loop, LoRA. Every field is documented once, below its declaration."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_INT = 2**31 - 1
"""Largest integer any setting takes: larger ones are typos, and overflow the libraries' C integers."""
MAX_FLOAT = 1e6
"""Largest magnitude any real-valued setting takes (rates, coefficients, penalties, epochs)."""
MAX_VOCAB = 1_000_000
"""Largest BPE vocabulary: far beyond any corpus this trains on (a typo such as 10**12 aborts the tokenizer trainer)."""
LORA_TARGETS_BY_LAYOUT = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
"""The Linear layers of `rlhf.model` in each layout (`rlhf.model.LAYOUTS`, tied to it by a test)."""
LAYOUTS = tuple(LORA_TARGETS_BY_LAYOUT)
"""The decoder's layouts (`RlhfConfig.layout`)."""
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
"""GPT-2 config names for the tanh-approximated GELU (one function, one fused kernel)."""
SUPPORTED_ACTIVATIONS = TANH_GELUS + ("gelu",)
"""The gpt2 layout's MLP activations (`RlhfConfig.activation_function`); 'gelu' is the exact (erf) one."""
OMIT_DEFAULT = "omit_default_from_fingerprint"
"""Field metadata for a field added after runs were recorded: holding its default, it is left out of the
manifest's config and the fingerprint (`rlhf.config.fingerprinted_config`), so those runs stay up to date."""
NOT_FINGERPRINTED = "not_fingerprinted"
"""Field metadata for a setting that changes where results are reported, not what is trained (`report_to`): it
is left out of the manifest's config and the fingerprint, so changing it re-runs nothing."""
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")
"""The experiment trackers a stage can report to (`report_to`; `rlhf.tracking` builds them, each an optional
extra: pip install -e ".[tensorboard]")."""
LORA_TARGETS = tuple(name for names in LORA_TARGETS_BY_LAYOUT.values() for name in names)
"""Every layer name LoRA adapters can wrap, either layout. A model has only its own layout's names, so
naming all of them (the default) wraps exactly the layout's layers."""


LR_SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
"""Our learning-rate schedule names (`OptimizationConfig.lr_schedule`) -> transformers' scheduler types."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_trackers(names: list[str]) -> None:
    for name in names:
        _check(name in TRACKERS, f"report_to: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
    _check(len(set(names)) == len(names), f"report_to: a tracker is named twice in {names}")


@dataclass
class ModelShape:
    layout: str = field(default="gpt2", metadata={OMIT_DEFAULT: True})
    """'gpt2' (learned positions, LayerNorm, GELU MLP, tied head) or 'llama' (rotary positions, RMSNorm,
    SwiGLU MLP, grouped-query attention, untied head, no biases)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_kv_head: int = field(default=0, metadata={OMIT_DEFAULT: True})
    """Key/value heads of the llama layout (grouped-query attention; must divide n_head); 0 means n_head."""
    n_embd: int = 128
    """Width of the residual stream."""
    n_positions: int = 256
    """Context length: the longest sequence the model can read."""
    rope_theta: float = field(default=10000.0, metadata={OMIT_DEFAULT: True})
    """Base of the llama layout's rotary position embeddings."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (pretraining and SFT only)."""
    activation: str = field(default="gelu_new", metadata={OMIT_DEFAULT: True})
    """The gpt2 layout's MLP activation: 'gelu_new' (GPT-2's tanh approximation) or 'gelu' (exact, as
    nanoGPT)."""

    def __post_init__(self):
        _check(self.layout in LAYOUTS, f"layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            _check(getattr(self, name) > 0, f"{name}: must be positive, got {getattr(self, name)}")
        _check(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _check(self.n_kv_head >= 0 and (self.n_kv_head == 0 or self.n_head % self.n_kv_head == 0),
               f"n_kv_head: must divide n_head ({self.n_head}), got {self.n_kv_head}")  # fmt: skip
        _check(self.layout == "llama" or self.n_kv_head == 0, "n_kv_head: only the llama layout has grouped-query attention")
        _check(self.rope_theta > 0, f"rope_theta: must be positive, got {self.rope_theta}")
        _check(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _check(self.activation in SUPPORTED_ACTIVATIONS,
               f"activation: must be one of {', '.join(SUPPORTED_ACTIVATIONS)}, got {self.activation!r}")  # fmt: skip
        _check(self.layout == "gpt2" or self.activation == "gelu_new", "activation: the llama layout's MLP is SwiGLU, it has no GELU to choose")


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
    gradient_checkpointing: bool = field(default=False, metadata={OMIT_DEFAULT: True})
    """Recompute activations in backward: less memory, about a third more compute (the RL stages: the
    trained models' update forwards; sampling keeps its KV cache)."""
    report_to: list[str] = field(default_factory=list, metadata={NOT_FINGERPRINTED: True})
    """Experiment trackers that get the stage's curves and its resolved config: 'tensorboard', 'trackio',
    'wandb', 'mlflow', or a list (default: none; a pipeline's top-level `report_to` sets every stage's).
    TensorBoard writes into the stage folder (`tensorboard --logdir <run_dir>` shows every stage); the others
    log to project <run_dir's name>, run <stage>. Changing it re-runs nothing."""

    def __post_init__(self):
        _check(self.lr > 0, f"lr: must be positive, got {self.lr}")
        _check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule: must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        _check(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        _check(self.amp in ("auto", "bf16", "fp16", "off"), f"amp: unknown {self.amp!r}")
        check_trackers(self.report_to)


@dataclass
class TrainingConfig(OptimizationConfig):
    """Settings shared by the Trainer-based stages (pretrain, sft, reward, dpo)."""

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
    compile: bool = False
    """torch.compile the model (worth it on CUDA for long runs; the first steps are slow while it compiles)."""
    max_nonfinite_steps: int = 10
    """Stop after this many optimizer steps in a row with a NaN or inf loss or gradient (each one is skipped)."""
    max_seconds: float = field(default=0.0, metadata={OMIT_DEFAULT: True})
    """Stop training after this many seconds of training, those before a resume included (0: no limit); the
    stage completes with the weights it has."""

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
        _check(self.max_seconds >= 0, f"max_seconds: must be >= 0, got {self.max_seconds}")



@dataclass
class LoraSettings:
    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get adapters; by default all of the model's (gpt2: c_attn, c_proj, c_fc; llama:
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). A name of the other layout matches nothing."""

    def __post_init__(self):
        _check(self.r > 0, f"r: must be positive, got {self.r}")
        _check(self.alpha > 0, f"alpha: must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "target_modules: name at least one layer")
        gpt2, llama = (", ".join(LORA_TARGETS_BY_LAYOUT[layout]) for layout in ("gpt2", "llama"))
        for name in self.target_modules:
            _check(name in LORA_TARGETS, f"target_modules: {name!r} matches no layer (the model has {gpt2}); a llama-layout model has {llama}")


