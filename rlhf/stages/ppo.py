"""Stage `ppo`: PPO with a KL penalty against the SFT policy, scored by the reward model.

Models: the policy (from SFT), a frozen reference (the SFT model, or the LoRA policy with its
adapters disabled), the frozen reward model (normalised scores) and a value model initialised
from the reward model; dropout off everywhere. Each iteration: sample, score, compute
KL-penalised rewards and GAE advantages, then several epochs of clipped updates (see
`rlhf.ppo`). Checkpoints hold both models, both optimizers and schedulers, the KL controller
and the iteration; sampling and shuffling are seeded per iteration, so a resumed run follows
the same curve.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

from rlhf.config import PPOConfig
from rlhf.data import check_prompt_rows, read_rows
from rlhf.stages import StageContext

CHECKPOINT_FILES = ("policy.safetensors", "value.safetensors", "optimizers.pt", "state.json")


def upstream(config: PPOConfig) -> tuple[str, ...]:
    return ("sft", "reward")


def inputs(config: PPOConfig) -> list[str]:
    return [config.prompts] + ([config.eval_prompts] if config.eval_prompts else [])


class PPOInputs(NamedTuple):
    prompts: list[Any]
    eval_prompts: list[Any]
    reward_functions: list[Callable]
    judge: Callable | None


def read_inputs(config: PPOConfig) -> PPOInputs:
    """The checked training and held-out prompts, the extra reward functions and the judge."""
    from rlhf.responses import load_function

    prompts, eval_prompts = [], []
    for name, kept in ((config.prompts, prompts), (config.eval_prompts, eval_prompts)):
        if name:
            rows = read_rows(name)
            check_prompt_rows(name, rows)
            kept += [row["prompt"] for row in rows]
    reward_functions = [load_function(name, f"reward_functions[{i}]") for i, name in enumerate(config.reward_functions)]
    judge = load_function(config.judge, "judge") if config.judge else None
    return PPOInputs(prompts, eval_prompts, reward_functions, judge)


def prompt_order(n_prompts: int, step: int, batch: int, seed: int) -> list[int]:
    """Indices of the prompts of iteration `step`: an endless stream, reshuffled every pass."""
    indices = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n_prompts)
        permutation = list(range(n_prompts))
        random.Random(seed * 7919 + epoch).shuffle(permutation)
        indices.append(permutation[offset])
    return indices


def scheduler(optimizer, config: PPOConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def save_checkpoint(folder: Path, models, optimizers, schedulers, controller, step: int, baseline: dict | None) -> None:
    """Weights as safetensors, optimizer tensors via torch.save (read back with weights_only), state as JSON."""
    import torch
    from safetensors.torch import save_model

    from rlhf.artifacts import atomic_write_text

    temporary = folder.with_name(folder.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    save_model(models.policy, str(temporary / "policy.safetensors"))
    save_model(models.value, str(temporary / "value.safetensors"))
    torch.save({"optimizers": [o.state_dict() for o in optimizers], "schedulers": [s.state_dict() for s in schedulers]},
               temporary / "optimizers.pt")  # fmt: skip
    state = {"step": step, "kl_controller": controller.state_dict(), "sft_evaluation": baseline}
    atomic_write_text(temporary / "state.json", json.dumps(state))
    temporary.rename(folder)  # a checkpoint folder exists only once complete


def load_checkpoint(folder: Path, models, optimizers, schedulers, controller) -> tuple[int, dict | None]:
    """Restore a checkpoint; returns (iteration, the SFT policy's held-out evaluation)."""
    import torch
    from safetensors.torch import load_model

    load_model(models.policy, str(folder / "policy.safetensors"))
    load_model(models.value, str(folder / "value.safetensors"))
    states = torch.load(folder / "optimizers.pt", weights_only=True)
    for optimizer, state in zip(optimizers, states["optimizers"]):
        optimizer.load_state_dict(state)
    for sched, state in zip(schedulers, states["schedulers"]):
        sched.load_state_dict(state)
    state = json.loads((folder / "state.json").read_text())
    controller.load_state_dict(state["kl_controller"])
    return state["step"], state.get("sft_evaluation")


def latest_checkpoint(root: Path, fingerprint: str, fresh: bool = False) -> Path | None:
    """The newest complete checkpoint written under the same fingerprint (others, or all when `fresh`, are removed)."""
    import shutil

    from rlhf.artifacts import atomic_write_text

    stamp = root / "fingerprint"
    if root.is_dir() and (fresh or not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, fingerprint)
    done = [p for p in root.glob("step-*") if not p.name.endswith(".tmp") and all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run(ctx: StageContext) -> dict:
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.artifacts import CHECKPOINTS, append_metrics, truncate_metrics
    from rlhf.errors import ArtifactError, TrainingDiverged
    from rlhf.evaluation import sample_policy
    from rlhf.model import set_dropout
    from rlhf.ppo import PPOModels, make_rollout, ppo_update
    from rlhf.ppo_math import AdaptiveKLController, FixedKLController
    from rlhf.responses import encode_prompts, prompt_text
    from rlhf.tokenizer import check_fits_model
    from rlhf.training import GracefulStop, precision_flags

    config: PPOConfig = ctx.config

    # 1. Read prompts and plug-ins; check the upstream models fit one tokenizer; load the models.
    prompts, eval_prompts, reward_functions, judge = read_inputs(config)
    sft_dir, reward_dir = ctx.upstream("sft"), ctx.upstream("reward")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    if AutoTokenizer.from_pretrained(reward_dir).get_vocab() != tokenizer.get_vocab():
        raise ArtifactError(f"{reward_dir}: the reward model's tokenizer differs from {sft_dir}'s; re-run the reward stage")
    for folder in (sft_dir, reward_dir):
        check_fits_model(tokenizer, AutoConfig.from_pretrained(folder), folder)
    context = AutoConfig.from_pretrained(sft_dir).n_positions
    if config.max_new_tokens >= context:
        raise ctx.setting_error("max_new_tokens", f"{config.max_new_tokens} leaves no room for a prompt in the policy's context ({context})")
    out_dir = ctx.begin()

    flags = precision_flags(config.amp)
    accelerator = Accelerator(mixed_precision="bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no")
    torch.manual_seed(ctx.seed)
    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    reference = None
    if config.lora:
        lora = config.lora
        policy = get_peft_model(policy, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=lora.target_modules, task_type="CAUSAL_LM"))  # fmt: skip
    else:
        reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval().requires_grad_(False)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval().requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    for model in (policy, reference, reward, value):
        if model is not None:
            set_dropout(model, 0.0)

    # 2. Optimizers, schedules and the KL controller; resume from the last checkpoint if any.
    updates_per_step = config.ppo_epochs * config.rollout_batch_size // (config.minibatch_size * config.grad_accum)
    total_updates = config.steps * updates_per_step
    optimizers = [
        torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr, eps=1e-5),
        torch.optim.AdamW(value.parameters(), lr=config.value_lr or config.lr, eps=1e-5),
    ]
    schedulers = [scheduler(o, config, total_updates) for o in optimizers]
    policy, value, *optimizers = accelerator.prepare(policy, value, *optimizers)
    device = accelerator.device
    reward.to(device)
    if reference is not None:
        reference.to(device)
    models = PPOModels(policy=policy, value=value, reward=reward, reference=reference, tokenizer=tokenizer)
    controller = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                  if config.kl_target > 0 else FixedKLController(config.kl_coef))  # fmt: skip
    checkpoints = out_dir / CHECKPOINTS
    start_step, before = 0, None
    last = latest_checkpoint(checkpoints, ctx.fingerprint, ctx.fresh)
    if last is not None:
        start_step, before = load_checkpoint(last, models, optimizers, schedulers, controller)
        truncate_metrics(out_dir, start_step)
        print(f"ppo: resuming from {last} (iteration {start_step})")
    else:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    unwrapped = accelerator.unwrap_model(policy)

    # 3. Evaluate the SFT policy on held-out prompts (same seed as the final evaluation).
    def evaluate() -> dict:
        """Held-out means: normalised RM score, judge, KL to the reference (not with LoRA), length, stop share."""
        samples = sample_policy(unwrapped, tokenizer, eval_prompts, config.max_new_tokens, seed=ctx.seed,
                                temperature=config.temperature, reward_model=reward, reference=reference, judge=judge)  # fmt: skip
        result = {"rm_score": samples.mean("rm_scores"), "length": samples.mean("lengths"), "stopped": samples.mean("stopped")}
        if reference is not None:
            result["kl"] = samples.mean("kl")
        if judge:
            result["judge"] = samples.mean("judge_scores")
        return result

    if eval_prompts and start_step == 0:
        before = evaluate()

    # 4. The PPO loop: rollout, update, log, checkpoint.
    encoded = encode_prompts(tokenizer, prompts)
    limit = unwrapped.config.n_positions - config.max_new_tokens
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="ppo", unit="it")
    diverged = 0  # iterations in a row whose every update was NaN or inf
    with GracefulStop("ppo") as stop:  # SIGINT/SIGTERM: finish the iteration, save a checkpoint, stop
        for step in progress:
            # 4a. The iteration's prompts, sampled and scored with a per-iteration seed.
            batch = prompt_order(len(prompts), step, config.rollout_batch_size, ctx.seed)
            generator = torch.Generator(device=device).manual_seed(ctx.seed * 1_000_003 + step)
            rollout, stats = make_rollout(
                models, [encoded[i][-limit:] for i in batch], [prompt_text(prompts[i]) for i in batch],
                config, controller.value, generator, reward_functions, judge,
            )  # fmt: skip
            # 4b. Clipped policy and value updates over reshuffled minibatches.
            shuffle = torch.Generator().manual_seed(ctx.seed * 1_000_003 + step)
            stats.update(ppo_update(models, rollout, config, accelerator, optimizers, schedulers, shuffle))
            diverged = diverged + 1 if stats["nonfinite_steps"] == updates_per_step else 0
            if diverged >= config.max_nonfinite_iterations:
                kept = latest_checkpoint(checkpoints, ctx.fingerprint)
                raise TrainingDiverged(
                    f"ppo: {diverged} iterations in a row had only NaN/inf losses or gradients (iteration {step + 1}); "
                    f"stopped. Last good checkpoint: {kept or 'none'}; lower lr or check the reward model's scores"
                )
            # 4c. Adapt beta toward the target KL (no-op when fixed), log, checkpoint.
            controller.update(stats["kl"], config.rollout_batch_size)
            stats.update(step=step + 1, episodes=(step + 1) * config.rollout_batch_size, lr=schedulers[0].get_last_lr()[0])
            if accelerator.is_main_process:
                append_metrics(out_dir, stats)
            if stats["kl"] < -1e-3:
                warnings.warn(f"ppo iteration {step + 1}: negative mean KL {stats['kl']:.4f}: k1 estimates are noisy; "
                              "a persistent negative KL means the policy and reference disagree on the sampling setup")  # fmt: skip
            if stats["ratio_max"] > 10:
                warnings.warn(f"ppo iteration {step + 1}: importance ratio reached {stats['ratio_max']:.1f}; lower lr or clip_range")
            progress.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", beta=f"{controller.value:.3f}")
            due = (step + 1) % config.save_every == 0 and step + 1 < config.steps
            if (due or stop.received) and accelerator.is_main_process:
                save_checkpoint(checkpoints / f"step-{step + 1}", models, optimizers, schedulers, controller, step + 1, before)
            if stop.received:
                stop.exit(checkpoints / f"step-{step + 1}")

    # 5. Evaluate on held-out prompts; save the policy (adapters merged) and the value model.
    metrics: dict = {"iterations": config.steps, "episodes": config.steps * config.rollout_batch_size, "beta": controller.value}
    if eval_prompts:
        after = evaluate()
        metrics.update({f"eval_{name}": value_ for name, value_ in after.items()})
        metrics.update({f"eval_{name}_sft": value_ for name, value_ in (before or {}).items()})
        print(f"ppo: on {len(eval_prompts)} held-out prompts (sampled, seed {ctx.seed}):")
        for name in sorted(after):
            was = f"{before[name]:.3f} (SFT) -> " if before else ""
            print(f"  {name:9} {was}{after[name]:.3f} (PPO)")
    final = unwrapped.merge_and_unload() if config.lora else unwrapped
    final.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    accelerator.unwrap_model(value).save_pretrained(out_dir / "value")
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
