"""Stage `ppo`: PPO with a KL penalty against the SFT policy, scored by the reward model.

Models: the policy (from SFT), a frozen reference (the SFT model, or the LoRA policy with its
adapters disabled), the frozen reward model (normalised scores) and a value model initialised
from the reward model; dropout off everywhere. Before training, the SFT policy answers
`norm_prompts` prompts exactly as rollouts sample, and the mean and std of the reward model's
scores on those that stopped normalise PPO's scores; the same map is folded into the value
model's head, so it starts on the scale of its targets. Each iteration: sample, score, compute
KL-penalised rewards and GAE advantages, then several epochs of clipped updates (see
`rlhf.ppo`). Checkpoints hold both models, the optimizer, its schedule and fp16's gradient
scaler, the KL controller, the score normalisation and the iteration; sampling and shuffling are
seeded per iteration, so a resumed run follows the same curve.

Under torchrun every process samples its own share of each iteration's prompts with its own seeds;
advantages are whitened, the KL controller steered and the metrics averaged over all of them
(`rlhf.ppo`); DDP averages the gradients. The main process evaluates, logs and saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

from rlhf.config import PPOConfig
from rlhf.data import check_prompt_rows, read_rows
from rlhf.stages import StageContext

DATA_PARALLEL = True
CHECKPOINT_FILES = ("policy.safetensors", "value.safetensors", "optimizer.pt", "state.json")
RANK_SEED_STRIDE = 2**40
"""Added per process rank to the sampling and shuffling seeds: each process draws its own samples."""
NORMALISATION_SEED = 2**62
"""Added to the run's seed for the score-normalisation samples: apart from every iteration's seeds."""


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
    from rlhf.distributed import sharding
    from rlhf.errors import ConfigError
    from rlhf.responses import load_function

    if sharding():
        raise ConfigError(
            f"PPO does not run under {sharding()} sharding (sampling needs every weight in each process); "
            "launch this stage data-parallel: torchrun, or accelerate launch without the sharding config"
        )

    prompts, eval_prompts = [], []
    for name, kept in ((config.prompts, prompts), (config.eval_prompts, eval_prompts)):
        if name:
            rows = read_rows(name)
            check_prompt_rows(name, rows)
            kept += [row["prompt"] for row in rows]
    reward_functions = [load_function(name, f"reward_functions[{i}]", probe=prompts)
                        for i, name in enumerate(config.reward_functions)]  # fmt: skip
    judge = load_function(config.judge, "judge", probe=eval_prompts) if config.judge else None
    return PPOInputs(prompts, eval_prompts, reward_functions, judge)


def prompt_order(n_prompts: int, chunk: int, batch: int, seed: int) -> list[int]:
    """Indices of the `chunk`-th `batch` prompts of an endless stream, reshuffled every pass. Iteration
    `step` of process `rank` out of `world` takes chunk `step * world + rank`."""
    permutations: dict[int, list[int]] = {}  # each pass's order, shuffled once per call (a batch spans one or two)
    indices = []
    for position in range(chunk * batch, (chunk + 1) * batch):
        epoch, offset = divmod(position, n_prompts)
        if epoch not in permutations:
            permutations[epoch] = list(range(n_prompts))
            random.Random(seed * 7919 + epoch).shuffle(permutations[epoch])
        indices.append(permutations[epoch][offset])
    return indices


def scheduler(optimizer, config: PPOConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def save_checkpoint(folder: Path, models, optimizer, scheduler, scaler, controller, step: int, baseline: dict | None) -> None:
    """Weights as safetensors, optimizer, schedule and fp16 gradient-scaler (`scaler`, None without
    fp16) states via torch.save (read back with weights_only), the rest as JSON."""
    import torch
    from safetensors.torch import save_model

    from rlhf.artifacts import atomic_write_text
    from rlhf.ppo import unwrapped

    temporary = folder.with_name(folder.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    save_model(unwrapped(models.policy), str(temporary / "policy.safetensors"))
    save_model(unwrapped(models.value), str(temporary / "value.safetensors"))
    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        states["scaler"] = scaler.state_dict()
    torch.save(states, temporary / "optimizer.pt")
    state = {"step": step, "kl_controller": controller.state_dict(), "sft_evaluation": baseline,
             "score_normalisation": dataclasses.asdict(models.score_normalisation)}  # fmt: skip
    atomic_write_text(temporary / "state.json", json.dumps(state))
    temporary.rename(folder)  # a checkpoint folder exists only once complete


def load_checkpoint(folder: Path, models, optimizer, scheduler, scaler, controller) -> tuple[int, dict | None]:
    """Restore a checkpoint (every process reads the same one), the run's score normalisation included;
    returns (iteration, the SFT policy's held-out evaluation)."""
    import torch
    from safetensors.torch import load_model

    from rlhf.ppo import ScoreNormalisation, unwrapped, use_score_normalisation

    state = json.loads((folder / "state.json").read_text())
    use_score_normalisation(models, ScoreNormalisation(**state["score_normalisation"]))  # the value head's record; weights next
    load_model(unwrapped(models.policy), str(folder / "policy.safetensors"))
    load_model(unwrapped(models.value), str(folder / "value.safetensors"))
    states = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if scaler is not None and "scaler" in states:
        scaler.load_state_dict(states["scaler"])
    controller.load_state_dict(state["kl_controller"])
    return state["step"], state.get("sft_evaluation")


def latest_checkpoint(root: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written under the same fingerprint (others are removed)."""
    import shutil

    from rlhf.artifacts import atomic_write_text

    stamp = root / "fingerprint"
    if root.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, fingerprint)
    done = [p for p in root.glob("step-*") if not p.name.endswith(".tmp") and all((p / f).is_file() for f in CHECKPOINT_FILES)]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run(ctx: StageContext) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.artifacts import CHECKPOINTS, append_metrics, truncate_metrics
    from rlhf.distributed import is_main_process, mean_over_processes, on_main, rank, world_size
    from rlhf.errors import ArtifactError, TrainingDiverged
    from rlhf.evaluation import sample_policy
    from rlhf.model import set_dropout
    from rlhf.ppo import PPOModels, make_rollout, measure_score_normalisation, ppo_update, use_score_normalisation
    from rlhf.ppo_math import AdaptiveKLController, FixedKLController
    from rlhf.responses import encode_prompts, prompt_text
    from rlhf.tokenizer import check_fits_model
    from rlhf.training import GracefulStop, precision_flags, tf32_available

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
    cuda = torch.cuda.is_available()
    AcceleratorState._reset_state()  # an earlier stage's Trainer fixed its own precision (as TrainingArguments resets it)
    accelerator = Accelerator(mixed_precision="bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no", cpu=not cuda)
    if tf32_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matrix products autocast leaves
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

    # 2. One optimizer (a parameter group per model, so fp16's scaler unscales once per step), its
    #    schedule and the KL controller; resume from the last checkpoint if any (its score normalisation too).
    updates_per_step = config.ppo_epochs * config.rollout_batch_size // (config.minibatch_size * config.grad_accum)
    total_updates = config.steps * updates_per_step
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.lr},
              {"params": list(value.parameters()), "lr": config.value_lr or config.lr}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, eps=1e-5, fused=cuda)
    schedule = scheduler(optimizer, config, total_updates)
    policy, value, optimizer = accelerator.prepare(policy, value, optimizer)
    device = accelerator.device
    reward.to(device)
    if reference is not None:
        reference.to(device)
    models = PPOModels(policy=policy, value=value, reward=reward, reference=reference, tokenizer=tokenizer)
    controller = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                  if config.kl_target > 0 else FixedKLController(config.kl_coef))  # fmt: skip
    checkpoints = out_dir / CHECKPOINTS
    start_step, before = 0, None
    last = on_main(lambda: latest_checkpoint(checkpoints, ctx.fingerprint))
    if last is not None:
        start_step, before = load_checkpoint(last, models, optimizer, schedule, accelerator.scaler, controller)
        print(f"ppo: resuming from {last} (iteration {start_step})")
    if is_main_process() and last is not None:
        truncate_metrics(out_dir, start_step)  # the iterations after the checkpoint are logged again
    elif is_main_process():
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    unwrapped = accelerator.unwrap_model(policy)
    encoded = encode_prompts(tokenizer, prompts)
    limit = unwrapped.config.n_positions - config.max_new_tokens
    cut = sum(len(ids) > limit for ids in encoded)
    if cut and is_main_process():
        print(f"ppo: {cut} of {len(encoded)} prompts are longer than {limit} tokens (the context "
              f"{unwrapped.config.n_positions} less max_new_tokens {config.max_new_tokens}): only their last {limit} are kept")  # fmt: skip
    encoded = [ids[-limit:] for ids in encoded]  # keep each prompt's end, where the question is

    # 3. A fresh run normalises PPO's scores under the SFT policy's own PPO samples (the main process
    #    samples and measures; every process folds the same map into its value model's head).
    if last is None:
        chosen = prompt_order(len(prompts), 0, config.norm_prompts, ctx.seed)
        generator = torch.Generator(device=device).manual_seed(ctx.seed * 1_000_003 + NORMALISATION_SEED)
        with accelerator.autocast():
            measured = on_main(lambda: measure_score_normalisation(models, [encoded[i] for i in chosen], config, generator))
        use_score_normalisation(models, measured)
        if config.norm_prompts:
            print(f"ppo: scores normalised over {measured.samples} of {measured.responses} SFT-policy responses to "
                  f"PPO prompts (reward-model units: mean {measured.mean:.3f}, std {measured.std:.3f})")  # fmt: skip
    norm = models.score_normalisation
    norm_metrics = {"score_norm_mean": norm.mean, "score_norm_std": norm.std, "score_norm_samples": norm.samples}

    # 4. Evaluate the SFT policy on held-out prompts (same seed as the final evaluation).
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

    if eval_prompts and start_step == 0 and is_main_process():
        before = evaluate()

    # 5. The PPO loop: rollout, update, log, checkpoint. Each process answers its own prompts.
    episodes_per_step = config.rollout_batch_size * world_size()
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="ppo", unit="it",
                    disable=not is_main_process())
    diverged = 0  # iterations in a row whose every update was NaN or inf
    with GracefulStop("ppo") as stop:  # SIGINT/SIGTERM: finish the iteration, save a checkpoint, stop
        for step in progress:
            # 5a. This process's share of the iteration's prompts, sampled and scored with its own seed.
            batch = prompt_order(len(prompts), step * world_size() + rank(), config.rollout_batch_size, ctx.seed)
            seed = ctx.seed * 1_000_003 + step + rank() * RANK_SEED_STRIDE
            with accelerator.autocast():
                rollout, stats = make_rollout(
                    models, [encoded[i] for i in batch], [prompt_text(prompts[i]) for i in batch],
                    config, controller.value, torch.Generator(device=device).manual_seed(seed), reward_functions, judge,
                )  # fmt: skip
            # 5b. Clipped policy and value updates over reshuffled minibatches; statistics averaged over processes.
            stats.update(ppo_update(models, rollout, config, accelerator, optimizer, schedule, torch.Generator().manual_seed(seed)))
            stats = mean_over_processes(stats, maxima=("ratio_max",))
            diverged = diverged + 1 if stats["nonfinite_steps"] == updates_per_step else 0
            if diverged >= config.max_nonfinite_iterations:
                kept = on_main(lambda: latest_checkpoint(checkpoints, ctx.fingerprint))
                raise TrainingDiverged(
                    f"ppo: {diverged} iterations in a row had only NaN/inf losses or gradients (iteration {step + 1}); "
                    f"stopped. Last good checkpoint: {kept or 'none'}; lower lr or check the reward model's scores"
                )
            # 5c. Adapt beta toward the target KL (no-op when fixed), log, checkpoint.
            controller.update(stats["kl"], episodes_per_step)
            stats.update(step=step + 1, episodes=(step + 1) * episodes_per_step, lr=schedule.get_last_lr()[0])
            if step == 0:
                stats.update(norm_metrics)
            if is_main_process():
                append_metrics(out_dir, stats)
            if stats["kl"] < -1e-3:
                warnings.warn(f"ppo iteration {step + 1}: negative mean KL {stats['kl']:.4f}: k1 estimates are noisy; "
                              "a persistent negative KL means the policy and reference disagree on the sampling setup")  # fmt: skip
            if stats["ratio_max"] > 10:
                warnings.warn(f"ppo iteration {step + 1}: importance ratio reached {stats['ratio_max']:.1f}; lower lr or clip_range")
            progress.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", beta=f"{controller.value:.3f}")
            due = (step + 1) % config.save_every == 0 and step + 1 < config.steps
            stopping = stop.requested()
            if due or stopping:
                on_main(lambda: save_checkpoint(checkpoints / f"step-{step + 1}", models, optimizer, schedule, accelerator.scaler,
                                                controller, step + 1, before))  # fmt: skip
            if stopping:
                stop.exit(checkpoints / f"step-{step + 1}")

    # 6. The main process evaluates on held-out prompts and saves the policy (adapters merged) and the value model.
    if not is_main_process():
        return {}
    metrics: dict = {"iterations": config.steps, "episodes": config.steps * episodes_per_step, "beta": controller.value,
                     **norm_metrics}  # fmt: skip
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
