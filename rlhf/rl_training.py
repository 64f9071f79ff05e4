"""Optimizer steps and checkpoints of the RL stages (used by `rlhf.rl_driver`).

`update` runs an algorithm's `update_step` over reshuffled minibatches with one optimizer over
every trained model (a parameter group each, so fp16's scaler unscales once per step);
`save_checkpoint` / `load_checkpoint` write and read `step-<n>/` checkpoints (`rlhf.checkpoints`
finds the newest complete one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf.distributed import every_process
from rlhf.ppo_math import Rollout
from rlhf.rl_models import RLModels, ScoreNormalisation, unwrapped

STATE = "state.json"


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, models: RLModels, optimizer, scheduler, scaler, controller, step: int,
                    baseline: dict | None, seconds: float = 0.0) -> None:  # fmt: skip
    """Weights as safetensors, optimizer, schedule and fp16 gradient-scaler (`scaler`, None without
    fp16) states via torch.save (read back with weights_only), the rest as JSON, written last;
    `seconds`: training seconds so far (`max_seconds` counts them after a resume)."""
    from safetensors.torch import save_model

    from rlhf.artifacts import atomic_write_text

    temporary = folder.with_name(folder.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    for name, model in models.trained().items():
        save_model(unwrapped(model), str(temporary / f"{name}.safetensors"))
    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        states["scaler"] = scaler.state_dict()
    torch.save(states, temporary / "optimizer.pt")
    state = {"step": step, "kl_controller": controller.state_dict(), "sft_evaluation": baseline,
             "score_normalisation": dataclasses.asdict(models.score_normalisation), "seconds": seconds}  # fmt: skip
    atomic_write_text(temporary / STATE, json.dumps(state))
    temporary.rename(folder)  # a checkpoint folder exists only once complete


class Resumed(NamedTuple):
    """What a checkpoint says beyond the states it restores."""

    step: int
    """Iterations done."""
    sft_evaluation: dict | None
    """The SFT policy's held-out evaluation, made before the first iteration."""
    seconds: float
    """Training seconds up to the checkpoint (0 in checkpoints written before it was recorded)."""


def load_checkpoint(folder: Path, models: RLModels, optimizer, scheduler, scaler, controller) -> Resumed:
    """Restore a checkpoint (every process reads the same one), the run's score normalisation included."""
    from safetensors.torch import load_model

    from rlhf.rl_models import use_score_normalisation

    state = json.loads((folder / STATE).read_text())
    use_score_normalisation(models, ScoreNormalisation(**state["score_normalisation"]))  # the value head's record; weights next
    for name, model in models.trained().items():
        load_model(unwrapped(model), str(folder / f"{name}.safetensors"))
    states = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if scaler is not None and "scaler" in states:
        scaler.load_state_dict(states["scaler"])
    controller.load_state_dict(state["kl_controller"])
    return Resumed(state["step"], state.get("sft_evaluation"), float(state.get("seconds", 0.0)))


# ----------------------------------------------------------------------------- the update
def adamw(trained: dict[str, torch.nn.Module], learning_rates: dict[str, float], weight_decay: float) -> torch.optim.AdamW:
    """One AdamW over every trained model, a parameter group each (`learning_rates` by name: policy, value),
    so fp16's scaler unscales once per step. The fused kernel on the CPU too: one op for every tensor
    instead of a loop over them (over 10x faster per step at the demo's shape)."""
    groups = [{"params": [p for p in trained[name].parameters() if p.requires_grad], "lr": learning_rates[name]}
              for name in trained]  # fmt: skip
    return torch.optim.AdamW(groups, eps=1e-5, weight_decay=weight_decay, fused=True)


def update(models: RLModels, algorithm, rollout: Rollout, config, beta: float, accelerator, optimizer,
           scheduler, generator: torch.Generator) -> dict[str, float]:  # fmt: skip
    """`config.update_passes` passes of `algorithm.update_step` over reshuffled minibatches of `rollout`.

    Under DDP the gradients are averaged over the processes on the last micro-batch of each optimizer
    step only. A step whose loss or gradients are NaN or inf on any process is skipped by all (see
    `optimizer_step`) and counted in `nonfinite_steps`. The statistics are means over the micro-batches
    with a finite loss; every process returns the same keys, NaN where no micro-batch was finite.
    """
    clock = time.perf_counter()
    totals: dict[str, list[float]] = {}
    per_step = config.minibatch_size * config.grad_accum
    skipped = 0
    for _ in range(config.update_passes):
        order = torch.randperm(len(rollout), generator=generator)
        for start in range(0, len(rollout), per_step):
            finite = True
            for micro in range(config.grad_accum):
                index = order[start + micro * config.minibatch_size : start + (micro + 1) * config.minibatch_size]
                with gradient_sync(accelerator, models, micro == config.grad_accum - 1):
                    with accelerator.autocast():
                        # each micro-batch as wide as its longest real prompt and response
                        loss, stats = algorithm.update_step(rollout.select(index.to(rollout.scores.device)).trimmed(), beta)
                    accelerator.backward(loss / config.grad_accum)  # even a NaN one: every DDP process must take part
                if not torch.isfinite(loss):  # its statistics count as missing (NaN), keeping every key
                    finite = False
                    stats = dict.fromkeys(stats, math.nan)
                for key, value in stats.items():
                    totals.setdefault(key, []).append(float(value))
            skipped += not optimizer_step(models, accelerator, optimizer, scheduler, config.max_grad_norm, finite)
    kept = {key: [v for v in values if not math.isnan(v)] for key, values in totals.items()}
    result = {key: sum(values) / len(values) if values else math.nan for key, values in kept.items()}
    result["ratio_max"] = max(kept.get("ratio_max", []), default=math.nan)
    result["nonfinite_steps"] = skipped
    result["time_update"] = time.perf_counter() - clock
    return result


def gradient_sync(accelerator, models: RLModels, sync: bool):
    """A context in which backward all-reduces the gradients across processes only if `sync`
    (DDP's `no_sync` otherwise: micro-batches before the last of an optimizer step accumulate locally)."""
    stack = contextlib.ExitStack()
    if not sync:
        for model in models.trained().values():
            stack.enter_context(accelerator.no_sync(model))
    return stack


def optimizer_step(models: RLModels, accelerator, optimizer, scheduler, max_grad_norm: float, loss_finite: bool) -> bool:
    """Clip each trained model's gradients and apply them, then advance the schedule; returns whether
    the step was taken.

    A step with a NaN/inf loss or gradient on any process is dropped by every process (gradients
    cleared; AdamW leaves weights and moments as they were). Under fp16 the gradient scaler unscales
    once, before clipping, and drops such a step itself, lowering its scale.
    """
    from rlhf.training import gradients_finite

    trained = list(models.trained().values())
    finite = every_process(loss_finite and gradients_finite(p for model in trained for p in model.parameters()))
    if finite or accelerator.scaler is not None:
        accelerator.unscale_gradients()
        if max_grad_norm > 0:
            for model in trained:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        finite = not accelerator.optimizer_step_was_skipped
    scheduler.step()  # the schedule follows optimizer steps taken or skipped alike
    optimizer.zero_grad(set_to_none=True)
    return finite
