"""The config of the DPO stage (direct preference optimisation on TRL's `DPOTrainer`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.base import LoraSettings, TrainingConfig, _check

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
"""The loss types TRL 1.16's DPOTrainer computes (it exports no list of them; its `_compute_loss` names these)."""


@dataclass
class DPOStageConfig(TrainingConfig):
    data: str = ""
    """Preference pairs, in any format the reward stage reads (prompt + chosen + rejected, chosen + rejected,
    messages, or hh-rlhf dialogue strings); a 'margin' column is ignored."""
    beta: float = 0.1
    """Strength of the pull toward the reference (SFT) policy: the implicit reward is beta x the log-ratio
    to it. For 'ipo' it is the regulariser tau (the target gap is 1 / (2 beta))."""
    loss_type: str = "sigmoid"
    """TRL's DPO loss: 'sigmoid' (the DPO paper's), 'ipo', 'hinge', 'robust', ... (one of DPO_LOSS_TYPES)."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped, for 'robust' (in [0, 0.5)) and 'exo_pair' (> 0 required)."""
    max_length: int = 0
    """Longest tokenized prompt + response; 0 means the model's context. Longer pairs are cut at the end."""
    eval_rows: int = 0
    """Hold out exactly the last this many rows (a fixed test split); 0 uses eval_fraction."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights (the reference is the model with adapters disabled);
    they are merged into the saved model."""
    eval_prompts: str = ""
    """Optional held-out prompts ('prompt' column) whose responses the judge scores, before and after DPO."""
    judge: str = ""
    """Optional 'module:function' scoring (prompts, responses) -> floats, e.g. 'rlhf.demo_task:gold_judge'."""
    max_new_tokens: int = 48
    """Response length limit when generating for the judge."""

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.data), "data: give a file")
        _check(self.beta > 0, f"beta: must be positive, got {self.beta}")
        _check(self.loss_type in DPO_LOSS_TYPES,
               f"loss_type: unknown {self.loss_type!r} (one of {', '.join(DPO_LOSS_TYPES)})")  # fmt: skip
        _check(0 <= self.label_smoothing < 0.5, f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        _check(self.loss_type != "exo_pair" or self.label_smoothing > 0, "label_smoothing: 'exo_pair' needs it > 0 (the paper uses 1e-3)")
        _check(self.max_length >= 0 and self.eval_rows >= 0, "max_length and eval_rows: must be >= 0")
        _check(bool(self.eval_prompts) == bool(self.judge), "eval_prompts and judge: give both or neither")
        _check(self.max_new_tokens > 0, f"max_new_tokens: must be positive, got {self.max_new_tokens}")
