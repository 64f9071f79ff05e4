"""The configs of the RL stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.base import LoraSettings, OptimizationConfig, _check


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


