"""What every Trainer-based stage shares: arguments from our typed config, metrics logging, resume.

The stages configure TRL's trainers (`SFTTrainer`, `RewardTrainer`); this module maps one
`TrainingConfig` onto their arguments so the stages stay short recipes.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from rlhf.artifacts import CHECKPOINTS, append_metrics, atomic_write_text, truncate_metrics
from rlhf.config import TrainingConfig

SCHEDULERS = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


def precision_flags(amp: str) -> dict[str, bool]:
    """AMP on CUDA only: bf16 where the card supports it, else fp16 (with a gradient scaler); fp32 on CPU."""
    if amp == "off" or not torch.cuda.is_available():
        if amp in ("bf16", "fp16") and not torch.cuda.is_available():
            print(f"note: amp={amp} needs CUDA; training in fp32 on the CPU")
        return {"bf16": False, "fp16": False}
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": amp == "bf16", "fp16": amp == "fp16"}


def trainer_arguments(args_class: type, config: TrainingConfig, stage_dir: Path, seed: int, has_eval: bool, **extra):
    """`args_class` (TRL's SFTConfig or RewardConfig) filled from our config."""
    cuda = torch.cuda.is_available()
    scheduler_kwargs = {"min_lr": config.min_lr} if config.lr_schedule == "cosine" else {}
    eval_strategy = "steps" if has_eval and config.eval_every else "no"
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    return args_class(
        output_dir=str(stage_dir / CHECKPOINTS),
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=SCHEDULERS[config.lr_schedule],
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else None,
        optim="adamw_torch_fused",  # fused kernels on CPU too (torch >= 2.4)
        gradient_checkpointing=config.gradient_checkpointing,
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,
        eval_strategy=eval_strategy,
        eval_steps=config.eval_every or None,
        logging_steps=config.log_every or 10,
        save_strategy="steps",
        save_steps=config.save_every or 10**9,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        report_to=[],
        dataloader_num_workers=0,
        **precision_flags(config.amp),
        **extra,
    )


class MetricsFile(TrainerCallback):
    """Appends every Trainer log (loss, learning rate, eval metrics, ...) to the stage's metrics.jsonl."""

    def __init__(self, stage_dir: Path):
        self.stage_dir = stage_dir
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "time": round(time.perf_counter() - self.started, 3), **logs}
            append_metrics(self.stage_dir, row)


def resume_point(stage_dir: Path, fingerprint: str, fresh: bool = False) -> str | None:
    """The last checkpoint of an interrupted run with the same fingerprint, else None.

    Checkpoints written under another config or other inputs, or by a run that completed (`fresh`),
    are deleted rather than resumed.
    """
    root = stage_dir / CHECKPOINTS
    stamp = root / "fingerprint"
    if root.is_dir() and (fresh or not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, fingerprint)
    # A kill during a save leaves a folder without trainer_state.json (written last): not resumable.
    for folder in root.glob("checkpoint-*"):
        if not (folder / "trainer_state.json").is_file():
            shutil.rmtree(folder)
    last = get_last_checkpoint(str(root))
    if last is None:
        (stage_dir / "metrics.jsonl").unlink(missing_ok=True)
        return None
    step = int(Path(last).name.split("-")[-1])
    truncate_metrics(stage_dir, step)
    print(f"resuming from {last}")
    return last


def train(trainer, ctx) -> float:
    """Run (or resume) `trainer.train()` for stage context `ctx`; returns wall seconds."""
    stage_dir = ctx.out_dir
    trainer.add_callback(MetricsFile(stage_dir))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_point(stage_dir, ctx.fingerprint, ctx.fresh))
    return time.perf_counter() - started
