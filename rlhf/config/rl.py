"""The configs of the RL stages: what every algorithm on the RL driver shares (`RLConfig`), then one
class per algorithm with only its own settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.base import OMIT_DEFAULT, LoraSettings, OptimizationConfig, _check

KL_ESTIMATOR_NAMES = ("k1",)
"""The names of `rlhf.ppo_math.KL_ESTIMATORS` (which needs torch; a test keeps the two equal)."""


@dataclass
class RLConfig(OptimizationConfig):
    """Settings of the RL driver (`rlhf.rl_driver`), shared by every algorithm."""

    prompts: str = ""
    """Prompts to answer ('prompt' column: a string or a conversation ending with the user)."""
    steps: int = 100
    """Rollout-and-update iterations."""
    rollout_batch_size: int = 64
    """Prompts answered per iteration by each process (each `group_size` times where the algorithm samples groups)."""
    minibatch_size: int = 16
    """Episodes per micro-batch on each process; an optimizer step sees processes x minibatch_size x grad_accum."""
    grad_accum: int = 1
    """Minibatches accumulated per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate of the policy (AdamW); the shared optimizer settings are in OptimizationConfig."""
    lr_schedule: str = "linear"
    """Schedule after warm-up, over all the run's optimizer steps (see OptimizationConfig)."""
    max_new_tokens: int = 40
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature; the log-probabilities the update trains on use the same scaled logits."""
    clip_range: float = 0.2
    """Clipping of the importance ratio between the sampling policy and the updated one."""
    kl_coef: float = 0.05
    """beta: weight of the KL to the reference (initial value when adaptive)."""
    kl_target: float = 0.0
    """If > 0, beta adapts toward this mean KL per sequence over kl_horizon episodes (Ziegler et al.)."""
    kl_horizon: int = 10000
    """Episodes over which the adaptive controller closes the KL gap. Each iteration of n episodes
    multiplies beta by 1 + clip(KL / kl_target - 1, -0.2, 0.2) * n / kl_horizon, so by 1 +- 0.2 n / kl_horizon
    at most, and over k iterations by at most (1 +- 0.2 n / kl_horizon)^k. Size it to the run: with n = 64
    and k = 60, a horizon of 10000 lets beta move by 8% at most (0.9987^60 = 0.93), 800 by a factor of
    about 2.6 either way (0.984^60 = 0.38, 1.016^60 = 2.59)."""
    missing_eos_penalty: float = -1.0
    """Score given (in normalised reward units) to a response that never emits the stop token."""
    norm_prompts: int = 256
    """Prompts (from the start of the training stream) the SFT policy answers before training, sampled
    exactly as rollouts are (engine, temperature, max_new_tokens): the mean and std of the reward model's
    scores on those that stopped normalise the scores trained on (and PPO's value head). Measured once
    and kept in the checkpoints. 0 keeps the reward stage's normalisation."""
    reward_functions: list[str] = field(default_factory=list)
    """Extra 'module:function' rewards taking (prompts, responses) texts, added to the score."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's normalised score in the score. 0 trains on `reward_functions` alone (and the
    missing-EOS penalty): the reward model is then only logged as rm_score."""
    lora: LoraSettings | None = None
    """Train LoRA adapters on the policy; the reference is the policy with adapters disabled."""
    eval_prompts: str = ""
    """Held-out prompts scored before and after training (judge, reward model, KL to the reference)."""
    judge: str = ""
    """Optional 'module:function' judge for the held-out evaluation, e.g. 'rlhf.demo_task:gold_judge'."""
    save_every: int = 20
    """Write a resumable checkpoint every this many iterations."""
    max_nonfinite_iterations: int = 3
    """Stop after this many iterations in a row whose every update had a NaN or inf loss or gradient."""
    weight_decay: float = field(default=0.01, metadata={OMIT_DEFAULT: True})
    """AdamW's decoupled weight decay on the trained models (policy, value); 0.01 is torch's default, which
    the RL stages used before it was a setting."""
    max_seconds: float = field(default=0.0, metadata={OMIT_DEFAULT: True})
    """Stop after the first iteration that ends this many seconds into training, those before a resume
    included (0: no limit); the stage then completes with the policy it has (the learning-rate schedule
    still spans `steps`)."""

    @property
    def group_size(self) -> int:
        """Answers sampled per prompt (adjacent rows of the batch)."""
        return 1

    @property
    def update_passes(self) -> int:
        """Passes of the update over each iteration's episodes."""
        return 1

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.prompts), "prompts: give a file")
        for name in ("steps", "rollout_batch_size", "minibatch_size", "grad_accum", "max_new_tokens", "save_every",
                     "max_nonfinite_iterations"):  # fmt: skip
            _check(getattr(self, name) > 0, f"{name}: must be positive, got {getattr(self, name)}")
        _check(self.rollout_batch_size * self.group_size % (self.minibatch_size * self.grad_accum) == 0,
               "rollout_batch_size (x group_size) must be a multiple of minibatch_size * grad_accum")  # fmt: skip
        _check(self.norm_prompts >= 0, f"norm_prompts: must be >= 0, got {self.norm_prompts}")
        _check(self.temperature > 0, f"temperature: must be positive, got {self.temperature}")
        _check(self.clip_range > 0, f"clip_range: must be positive, got {self.clip_range}")
        _check(self.kl_coef >= 0, f"kl_coef: must be >= 0, got {self.kl_coef}")
        _check(self.kl_target >= 0 and self.kl_horizon > 0, "kl_target must be >= 0 and kl_horizon positive")
        _check(self.kl_target == 0 or self.kl_coef > 0, "kl_target: an adaptive beta needs a positive kl_coef to start from")
        _check(bool(self.eval_prompts) or not self.judge, "judge: needs eval_prompts")
        _check(self.reward_model_weight >= 0, f"reward_model_weight: must be >= 0, got {self.reward_model_weight}")
        _check(self.reward_model_weight > 0 or bool(self.reward_functions),
               "reward_model_weight: 0 leaves nothing to reward; add reward_functions")  # fmt: skip
        _check(self.max_seconds >= 0, f"max_seconds: must be >= 0, got {self.max_seconds}")
        _check(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class PPOConfig(RLConfig):
    """PPO with a value model and GAE; the KL penalty is a per-token reward."""

    ppo_epochs: int = 4
    """Passes over each rollout batch, minibatches reshuffled every pass."""
    value_lr: float = 0.0
    """Peak learning rate of the value model; 0 means lr."""
    kl_estimator: str = "k1"
    """Per-token KL estimate penalised in the reward: 'k1' (log-ratio), the only one whose gradient as a
    detached reward is the KL's ('k3' is not: E[k3 * grad log pi] != grad KL, so it is refused)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    clip_range_value: float = 0.2
    """Value clipping around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss (the value model has its own optimizer group; this scales its gradient)."""
    whiten_rewards: bool = False
    """Whiten the KL-penalised rewards (keeping their mean) before GAE."""

    @property
    def update_passes(self) -> int:
        return self.ppo_epochs

    def __post_init__(self):
        super().__post_init__()
        _check(self.ppo_epochs > 0, f"ppo_epochs: must be positive, got {self.ppo_epochs}")
        _check(self.value_lr >= 0, f"value_lr: must be >= 0, got {self.value_lr}")
        _check(self.kl_estimator != "k3", "kl_estimator: 'k3' as a per-token reward gives a biased KL gradient "
                                          "(E[k3 * grad log pi] != grad KL); use 'k1', whose gradient is exact")
        _check(self.kl_estimator in KL_ESTIMATOR_NAMES,
               f"kl_estimator: must be one of {', '.join(KL_ESTIMATOR_NAMES)}, got {self.kl_estimator!r}")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam: must be in [0, 1]")
        _check(self.clip_range_value > 0, f"clip_range_value: must be positive, got {self.clip_range_value}")
        _check(self.vf_coef >= 0, f"vf_coef: must be >= 0, got {self.vf_coef}")


@dataclass
class CriticFreeConfig(RLConfig):
    """What the critic-free algorithms (GRPO, RLOO, REINFORCE++) share."""

    answers_per_prompt: int = 4
    """Answers sampled per prompt: the group whose scores are each other's baseline."""
    update_epochs: int = 1
    """Passes over each iteration's episodes, minibatches reshuffled every pass (1: on-policy)."""

    @property
    def group_size(self) -> int:
        return self.answers_per_prompt

    @property
    def update_passes(self) -> int:
        return self.update_epochs

    def __post_init__(self):
        _check(self.answers_per_prompt > 0, f"answers_per_prompt: must be positive, got {self.answers_per_prompt}")
        super().__post_init__()
        _check(self.update_epochs > 0, f"update_epochs: must be positive, got {self.update_epochs}")


GRPO_VARIANTS = ("grpo", "dr_grpo")


@dataclass
class GRPOConfig(CriticFreeConfig):
    """GRPO: advantages normalised within each prompt's group, the KL to the reference a k3 loss term."""

    rollout_batch_size: int = 16
    """Prompts answered per iteration by each process, each `answers_per_prompt` times."""
    kl_coef: float = 0.05
    """beta: weight of the k3 KL-to-reference loss term (initial value when adaptive)."""
    variant: str = "grpo"
    """'grpo' (advantage (r - group mean) / group std, loss averaged per sequence then over the batch) or
    'dr_grpo' (Liu et al. 2025: no division by the std, loss summed over tokens with a constant normaliser)."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.variant in GRPO_VARIANTS, f"variant: must be one of {', '.join(GRPO_VARIANTS)}, got {self.variant!r}")
        _check(self.answers_per_prompt > 1, f"answers_per_prompt: a group needs at least 2 answers, got {self.answers_per_prompt}")


@dataclass
class RLOOConfig(CriticFreeConfig):
    """RLOO: each answer's baseline is the mean score of the other answers to its prompt; KL in the reward."""

    rollout_batch_size: int = 16
    """Prompts answered per iteration by each process, each `answers_per_prompt` times."""

    def __post_init__(self):
        super().__post_init__()
        _check(self.answers_per_prompt > 1, f"answers_per_prompt: leave-one-out needs at least 2 answers, got {self.answers_per_prompt}")


@dataclass
class ReinforcePPConfig(CriticFreeConfig):
    """REINFORCE++: per-token KL penalty in the reward, returns normalised over the whole batch."""

    answers_per_prompt: int = 1
    """Answers sampled per prompt (REINFORCE++ needs no group; more only adds samples per prompt)."""
    gamma: float = 1.0
    """Discount of the returns."""

    def __post_init__(self):
        super().__post_init__()
        _check(0 <= self.gamma <= 1, f"gamma: must be in [0, 1], got {self.gamma}")
