"""What every training stage shares: arguments from our typed config, metrics logging, resume,
skipping NaN/inf steps, a wall-clock budget and stopping cleanly on SIGINT or SIGTERM.

The stages configure TRL's trainers (`SFTTrainer`, `RewardTrainer`, `DPOTrainer`); this module maps one
`TrainingConfig` onto their arguments so the stages stay short recipes. `GracefulStop` serves
PPO's own loop too.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback

from rlhf import tracking
from rlhf.artifacts import CHECKPOINTS, append_metrics
from rlhf.checkpoints import newest_checkpoint, resume_checkpoint
from rlhf.config import LR_SCHEDULES, TrainingConfig
from rlhf.console import StepLines, progress_bar, say
from rlhf.distributed import any_process, barrier, every_process, is_main_process, on_main
from rlhf.errors import TrainingDiverged

SCHEDULE_ARGUMENTS = {"cosine": {"min_lr_rate": 0.0}, "linear": {}, "constant": {}}
"""Their arguments where a stage has no `min_lr` of its own (the RL stages): cosine decays to 0."""


def precision_flags(amp: str) -> dict[str, bool]:
    """AMP on CUDA only: bf16 where the card supports it, else fp16 (with a gradient scaler); fp32 on CPU."""
    if amp == "off" or not torch.cuda.is_available():
        if amp in ("bf16", "fp16") and not torch.cuda.is_available():
            print(f"note: amp={amp} needs CUDA; training in fp32 on the CPU")
        return {"bf16": False, "fp16": False}
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": amp == "bf16", "fp16": amp == "fp16"}


def tf32_available() -> bool:
    """Whether this machine's GPU multiplies fp32 matrices in TF32 (Ampere and later, ~8x the fp32 rate)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def trainer_arguments(args_class: type, config: TrainingConfig, stage_dir: Path, seed: int, has_eval: bool, **extra):
    """`args_class` (TRL's SFTConfig, RewardConfig or DPOConfig) filled from our config."""
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
        lr_scheduler_type=LR_SCHEDULES[config.lr_schedule],
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else None,
        optim="adamw_torch_fused",  # fused kernels on CPU too (torch >= 2.4)
        gradient_checkpointing=config.gradient_checkpointing,
        tf32=True if tf32_available() else None,
        torch_compile=config.compile,
        ddp_find_unused_parameters=False,  # every parameter takes part in every step: no search each step
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


class MetricsLog(TrainerCallback):
    """Every Trainer log (loss, learning rate, eval metrics, ...) of the main process: appended to the stage's
    metrics.jsonl, sent to its trackers (`report_to`), and shown as step lines (`rlhf.console`) over a
    progress bar, in place of the Trainer's own dict prints and bar. The Trainer's closing summary
    (train_runtime, ...) goes to the file only: the stage prints its own."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.started = time.perf_counter()
        self.trackers: list = []
        self.lines: StepLines | None = None
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.lines = StepLines(self.ctx.name, state.max_steps)
        self.bar = progress_bar(f"[{self.ctx.name}]", state.max_steps, initial=state.global_step)
        self.trackers = tracking.make_trackers(self.ctx.config.report_to, self.ctx.run_dir, self.ctx.name, self.ctx.out_dir,
                                               resume_step=state.global_step)  # fmt: skip
        tracking.start(self.trackers, tracking.stage_config(self.ctx))
        tracking.announce(self.ctx)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "time": round(time.perf_counter() - self.started, 3), **logs}
        append_metrics(self.ctx.out_dir, row)
        tracking.log(self.trackers, logs, state.global_step)
        if "train_runtime" not in logs:
            self.lines.log(row)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
        tracking.finish(self.trackers)
        self.trackers = []


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient of `parameters` is free of NaN and inf (parameters without one are ignored).

    One total norm (a fused per-tensor norm, then their norm) rather than an isfinite and an `all` per
    tensor: NaN or inf anywhere makes the norm NaN or inf, and the ~100 small ops of the per-tensor check
    took 14-34 ms a step against 0.6 ms for the norm (the 0.84M-parameter Tiny Shakespeare model on a
    busy 2-core CPU). A norm that overflows fp32 (gradients near 1e19) also counts as non-finite:
    clipping would zero such a step anyway.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norm = torch.nn.utils.get_total_norm(grads)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded (FSDP2) gradients: the global norm
    return bool(torch.isfinite(norm))


class NonFiniteGuard(TrainerCallback):
    """Skips every optimizer step whose loss or gradients hold NaN or inf; stops after `limit` in a row.

    A skipped step's gradients are dropped before `optimizer.step()`, and AdamW leaves parameters
    without gradients untouched: weights and optimizer moments stay as they were, so every
    checkpoint holds good weights; the learning-rate schedule advances as for any step. (Under
    fp16's gradient scaler the scaler skips such steps itself.) Each skipped step is a row of
    metrics.jsonl: `{"step", "nonfinite_steps": 1, "nonfinite_in_a_row"}`. At the limit the Trainer
    stops without saving that step, and `diverged` holds the message for `TrainingDiverged`.
    """

    def __init__(self, stage: str, stage_dir: Path, limit: int):
        self.stage, self.stage_dir, self.limit = stage, stage_dir, limit
        self.loss_finite = True  # over the micro-batches of the current optimizer step
        self.in_a_row = 0
        self.diverged: str | None = None

    def watch(self, training_step):
        """`trainer.training_step` that also notes whether each micro-batch's loss is finite."""

        def step(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            self.loss_finite = self.loss_finite and bool(torch.isfinite(loss).all())
            return loss

        return step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        # Each process sees its own losses (and, when sharded, its own gradients): all skip together.
        finite = every_process(self.loss_finite and gradients_finite(parameters))
        self.loss_finite = True
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if getattr(optimizer, "scaler", None) is None:
            for p in parameters:
                p.grad = None
        if state.is_world_process_zero:
            append_metrics(self.stage_dir, {"step": state.global_step + 1, "nonfinite_steps": 1, "nonfinite_in_a_row": self.in_a_row})

    def on_step_end(self, args, state, control, **kwargs):
        if self.in_a_row >= self.limit:
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False
            self.diverged = (
                f"{self.stage}: {self.in_a_row} optimizer steps in a row had NaN/inf losses or gradients "
                f"(step {state.global_step}); stopped. Last good checkpoint: {newest_checkpoint(Path(args.output_dir)) or 'none'}; "
                "lower lr or check the data"
            )


class GracefulStop(TrainerCallback):
    """While entered, SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after its current step.

    The loop then saves a checkpoint and calls `exit`, which raises KeyboardInterrupt (the CLI
    exits 130 saying the same command resumes). A second signal raises at once. As a Trainer
    callback it asks the Trainer to save and stop at the end of the step; PPO's loop asks
    `requested()` itself. Outside the main thread, where Python cannot handle signals, it does
    nothing. (Under torchrun the workers run in sessions of their own: torchrun passes them the
    signal it gets, once.)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stage: str):
        self.stage = stage
        self.received: str | None = None  # the signal's name, once one arrives
        self.previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def handle(self, number, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        print(f"\n[{self.stage}] {self.received} received; saving a checkpoint after this step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def exit(self, checkpoint: Path | str) -> NoReturn:
        """Raise KeyboardInterrupt once every process is here (the main one may still be writing `checkpoint`)."""
        barrier()
        print(f"[{self.stage}] stopped by {self.received}; saved {checkpoint}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    def requested(self) -> bool:
        """Whether a signal asked to stop, here or in another process (which then all stop at the same
        step; every process asks at the same point). The first process's signal name is kept."""
        if any_process(self.received is not None):
            self.received = self.received or "a signal to another process"
        return self.received is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested():
            control.should_save = True
            control.should_training_stop = True


class TimeBudget(TrainerCallback, ExportableState):
    """Ends training once `seconds` of it have passed, the time before a resume included, so that an
    interrupted run gets the budget of an uninterrupted one (algorithms compared on the same wall-clock
    each get the same). The seconds spent so far travel in each checkpoint's trainer_state.json
    (`stateful_callbacks`, transformers' `ExportableState`). The stage then completes with the weights
    it has: the step that crossed the line is the last, and no checkpoint is written for it. Every
    process stops at the same step (the slowest one's clock decides)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.spent_before = 0.0  # training seconds of the runs this one resumes
        self.started: float | None = None  # this process's start of training
        self.stopped_at: int | None = None  # the step training stopped at, once the budget ran out

    def spent(self) -> float:
        """Training seconds so far, those before a resume included."""
        return self.spent_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds}, "attributes": {"spent_before": self.spent()}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)  # a resumed run: the checkpoint's record
        if isinstance(saved, dict):
            self.spent_before = float(saved.get("attributes", {}).get("spent_before", 0.0))
        state.stateful_callbacks[type(self).__name__] = self.state()  # (a checkpoint from before this record has none)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.spent() >= self.seconds):
            control.should_training_stop = True
            control.should_save = False
            self.stopped_at = state.global_step


def resume_point(ctx) -> str | None:
    """The checkpoint stage `ctx` resumes from (`rlhf.checkpoints.resume_checkpoint`), as the path TRL takes."""
    last = resume_checkpoint(ctx.out_dir, ctx.fingerprint)
    if last is not None:
        say(ctx.name, f"resuming from {last}")
    return str(last) if last is not None else None


def train(trainer, ctx) -> float:
    """Run (or resume) `trainer.train()` for stage context `ctx`; returns wall seconds.

    NaN/inf steps are skipped (`NonFiniteGuard`); SIGINT or SIGTERM saves a checkpoint and stops
    (`GracefulStop`); a `max_seconds` budget ends training early (`TimeBudget`).
    """
    stage_dir = ctx.out_dir
    guard = NonFiniteGuard(ctx.name, stage_dir, ctx.config.max_nonfinite_steps)
    trainer.training_step = guard.watch(trainer.training_step)
    stop = GracefulStop(ctx.name)
    budget = [TimeBudget(ctx.config.max_seconds)] if ctx.config.max_seconds else []
    trainer.remove_callback(ProgressCallback)  # MetricsLog prints our lines and bar instead of its dicts
    trainer.remove_callback(PrinterCallback)
    for callback in (guard, *budget, stop, MetricsLog(ctx)):  # a signal's checkpoint wins over the budget's no-save
        trainer.add_callback(callback)
    started = time.perf_counter()
    with stop:
        trainer.train(resume_from_checkpoint=on_main(lambda: resume_point(ctx)))
    if guard.diverged:
        raise TrainingDiverged(guard.diverged)
    if stop.received:
        stop.exit(Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")
    if budget and budget[0].stopped_at is not None:
        say(ctx.name, f"max_seconds {ctx.config.max_seconds:g} reached; stopped after step {budget[0].stopped_at}")
    return time.perf_counter() - started


def peft_config(lora):
    """PEFT's LoraConfig for our causal LM from a stage's `LoraSettings`; None without LoRA."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      task_type="CAUSAL_LM")  # fmt: skip


def save_and_judge(trainer, tokenizer, out_dir: Path, config, judge, judge_prompts: list, seed: int, metrics: dict) -> bool:
    """Save the trained policy (adapters merged) with `save_trained`; then, on the main process, put the
    held-out judge score of the saved policy (greedy, as `rlhf.responses.judge_policy`) into
    `metrics["judge_after"]` when there is a judge. Returns whether this is the main process (the others'
    recipes return no metrics)."""
    from transformers import AutoModelForCausalLM

    from rlhf.responses import judge_policy

    save_trained(trainer, tokenizer, out_dir, merge_lora=config.lora is not None)
    if not is_main_process():
        return False
    if judge:
        policy = AutoModelForCausalLM.from_pretrained(out_dir).to(trainer.args.device)
        metrics["judge_after"] = judge_policy(policy, tokenizer, judge_prompts, judge, config.max_new_tokens, seed)
    return True


def save_trained(trainer, tokenizer, out_dir: Path, merge_lora: bool = False) -> None:
    """The trained model (LoRA adapters merged) and tokenizer in save_pretrained layout, written by the
    main process. Sharded by FSDP or DeepSpeed, the full weights are gathered first, every process
    taking part."""
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if is_main_process():
        model = trainer.model.merge_and_unload() if merge_lora else trainer.model
        model.save_pretrained(out_dir, state_dict=state_dict)
        tokenizer.save_pretrained(out_dir)
