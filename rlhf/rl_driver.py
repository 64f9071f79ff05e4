"""The RL driver: everything an RL stage does that is not its algorithm.

It owns the prompt stream (`prompt_order`), the seeding, the models and the optimizer, resume and
checkpoints, the score normalisation, the held-out evaluation, stopping (on a signal, on divergence,
on a time budget) and metrics logging. An algorithm (`rlhf.ppo.PPO`, `rlhf.critic_free`) supplies
only two steps, in the way cleanrl keeps `# ALGO LOGIC` apart from plumbing:

    rollout_step(prompt_tokens, prompt_texts, beta, generator) -> (Rollout, stats)
    update_step(minibatch: Rollout, beta) -> (loss, stats)

and the driver runs `update_step` over reshuffled minibatches (`update_passes` passes of each
iteration's episodes, gradients accumulated, clipped and applied by one optimizer; see `update`).

Seeds: iteration `step` of process `rank` samples with `seed * 1_000_003 + step + rank * RANK_SEED_STRIDE`
and takes chunk `step * world + rank` of the prompt stream, so a resumed run follows the same curve
and every process samples its own episodes. Checkpoints (`step-<n>/` under the staging folder, see
`rlhf.checkpoints`) hold the trained models, the optimizer with its schedule and fp16 gradient
scaler, the KL controller, the score normalisation and the SFT policy's evaluation.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch

from rlhf.console import say
from rlhf.distributed import every_process, is_main_process, mean_over_processes, on_main, rank, world_size
from rlhf.ppo_math import AdaptiveKLController, FixedKLController, Rollout
from rlhf.responses import encode_prompts
from rlhf.rl_inputs import RLInputs, read_inputs
from rlhf.rl_models import RLModels, unwrapped

RANK_SEED_STRIDE = 2**40
"""Added per process rank to the sampling and shuffling seeds: each process draws its own samples."""
NORMALISATION_SEED = 2**62
"""Added to the run's seed for the score-normalisation samples: apart from every iteration's seeds."""
STATE = "state.json"


class Algorithm(Protocol):
    """What an RL algorithm supplies to the driver."""

    def rollout_step(self, prompt_tokens: list[list[int]], prompt_texts: list[str], beta: float,
                     generator: torch.Generator) -> tuple[Rollout, dict[str, float]]: ...  # fmt: skip

    def update_step(self, batch: Rollout, beta: float) -> tuple[torch.Tensor, dict[str, float]]: ...


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


def kl_controller(config):
    return (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
            if config.kl_target > 0 else FixedKLController(config.kl_coef))  # fmt: skip




# ----------------------------------------------------------------------------- the run
class RLRun:
    """One RL stage's run: the driver's state, set up in the order a recipe calls its methods
    (`start`, `prepare`, `resume_or_normalise`, `evaluate`, `train`, `finish`)."""

    def __init__(self, ctx, inputs: RLInputs, models: RLModels, accelerator):
        self.ctx, self.config, self.inputs, self.models, self.accelerator = ctx, ctx.config, inputs, models, accelerator
        self.optimizer = self.schedule = None
        self.controller = kl_controller(ctx.config)
        self.start_step = 0
        self.seconds_before = 0.0
        """Training seconds of the runs this one resumes (`max_seconds` counts them)."""
        self.iterations = 0
        """Iterations done so far, those before a resume included."""
        self.sft_evaluation: dict | None = None
        self.resumed_from: Path | None = None
        self.encoded: list[list[int]] = []

    # 1. Inputs, upstream models, accelerator, models.
    @classmethod
    def start(cls, ctx, with_value: bool) -> RLRun:
        """Read and check the prompts and plug-ins, check the SFT and reward models fit one tokenizer and
        the response length fits the context, open the staging folder and load the models."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from transformers import AutoConfig, AutoTokenizer

        from rlhf.errors import ArtifactError
        from rlhf.rl_models import load_models
        from rlhf.tokenizer import check_fits_model
        from rlhf.tracking import make_trackers
        from rlhf.training import precision_flags, tf32_available

        config = ctx.config
        inputs = read_inputs(config)
        sft_dir, reward_dir = ctx.upstream("sft"), ctx.upstream("reward")
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        if AutoTokenizer.from_pretrained(reward_dir).get_vocab() != tokenizer.get_vocab():
            raise ArtifactError(f"{reward_dir}: the reward model's tokenizer differs from {sft_dir}'s; re-run the reward stage")
        for folder in (sft_dir, reward_dir):
            check_fits_model(tokenizer, AutoConfig.from_pretrained(folder), folder)
        context = AutoConfig.from_pretrained(sft_dir).n_positions
        if config.max_new_tokens >= context:
            raise ctx.setting_error("max_new_tokens", f"{config.max_new_tokens} leaves no room for a prompt in the policy's context ({context})")
        ctx.begin()

        flags = precision_flags(config.amp)
        AcceleratorState._reset_state()  # an earlier stage's Trainer fixed its own precision (as TrainingArguments resets it)
        accelerator = Accelerator(mixed_precision="bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no",
                                  cpu=not torch.cuda.is_available(),
                                  log_with=make_trackers(config.report_to, ctx.run_dir, ctx.name, ctx.out_dir) or None)  # fmt: skip
        if tf32_available():
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matrix products autocast leaves
        torch.manual_seed(ctx.seed)
        models = load_models(sft_dir, reward_dir, tokenizer, config.lora, with_value, config.gradient_checkpointing)
        return cls(ctx, inputs, models, accelerator)

    # 2. One optimizer, its schedule; the models on the device.
    def prepare(self, learning_rates: dict[str, float]) -> None:
        """AdamW with a parameter group per trained model (`learning_rates` by name: policy, value), so
        fp16's scaler unscales once per step; the schedule spans every optimizer step of the run."""
        from transformers import get_scheduler

        from rlhf.config import LR_SCHEDULES
        from rlhf.training import SCHEDULE_ARGUMENTS

        from rlhf.rl_training import adamw

        config, models = self.config, self.models
        trained = models.trained()
        self.optimizer = adamw(trained, learning_rates, config.weight_decay)
        episodes = config.rollout_batch_size * config.group_size
        total = config.steps * config.update_passes * episodes // (config.minibatch_size * config.grad_accum)
        self.schedule = get_scheduler(LR_SCHEDULES[config.lr_schedule], self.optimizer, num_warmup_steps=config.warmup_steps,
                                      num_training_steps=total, scheduler_specific_kwargs=SCHEDULE_ARGUMENTS[config.lr_schedule])  # fmt: skip
        prepared = self.accelerator.prepare(*trained.values(), self.optimizer)
        for name, model in zip(trained, prepared):
            setattr(models, name, model)
        self.optimizer = prepared[-1]
        for model in (models.reward, models.reference):
            if model is not None:
                model.to(self.accelerator.device)
        encoded = encode_prompts(models.tokenizer, self.inputs.prompts)
        limit = unwrapped(models.policy).config.n_positions - config.max_new_tokens
        cut = sum(len(ids) > limit for ids in encoded)
        if cut and is_main_process():
            say(self.ctx.name, f"{cut} of {len(encoded)} prompts are longer than {limit} tokens (the context "
                  f"{limit + config.max_new_tokens} less max_new_tokens {config.max_new_tokens}): only their last {limit} are kept")  # fmt: skip
        self.encoded = encoded

    # 3. Resume, or measure the score normalisation of a fresh run.
    def resume_or_normalise(self) -> None:
        """Resume from the newest checkpoint of an interrupted build with this fingerprint (its score
        normalisation included); else the SFT policy answers `norm_prompts` prompts exactly as rollouts
        sample, and the mean and std of the reward model's scores normalise the run's scores."""
        from rlhf.checkpoints import resume_checkpoint
        from rlhf.rl_models import measure_score_normalisation, use_score_normalisation
        from rlhf.rl_training import load_checkpoint

        ctx, config, models = self.ctx, self.config, self.models
        last = on_main(lambda: resume_checkpoint(ctx.out_dir, ctx.fingerprint))
        if last is not None:
            self.start_step, self.sft_evaluation, self.seconds_before = load_checkpoint(
                last, models, self.optimizer, self.schedule, self.accelerator.scaler, self.controller)  # fmt: skip
            say(ctx.name, f"resuming from {last} (iteration {self.start_step})")
            return
        chosen = prompt_order(len(self.encoded), 0, config.norm_prompts, ctx.seed)
        generator = torch.Generator(device=self.accelerator.device).manual_seed(ctx.seed * 1_000_003 + NORMALISATION_SEED)
        with self.accelerator.autocast():
            measured = on_main(lambda: measure_score_normalisation(models, [self.encoded[i] for i in chosen], config, generator))
        use_score_normalisation(models, measured)
        if config.norm_prompts:
            say(ctx.name, f"scores normalised over {measured.samples} of {measured.responses} SFT-policy responses "
                  f"to training prompts (reward-model units: mean {measured.mean:.3f}, std {measured.std:.3f})")  # fmt: skip

    # 4. The held-out evaluation.
    def evaluate(self) -> dict[str, float]:
        """Held-out means (main process): normalised RM score, judge, KL to the reference (not with LoRA),
        length, stop share; the same seed every time, so the SFT policy's and the trained one's compare."""
        from rlhf.evaluation import sample_policy

        config, models = self.config, self.models
        samples = sample_policy(unwrapped(models.policy), models.tokenizer, self.inputs.eval_prompts, config.max_new_tokens,
                                seed=self.ctx.seed, temperature=config.temperature, reward_model=models.reward,
                                reference=models.reference, judge=self.inputs.judge)  # fmt: skip
        result = {"rm_score": samples.mean("rm_scores"), "length": samples.mean("lengths"), "stopped": samples.mean("stopped")}
        if models.reference is not None:
            result["kl"] = samples.mean("kl")
        if self.inputs.judge:
            result["judge"] = samples.mean("judge_scores")
        return result

    def evaluate_sft(self) -> None:
        if self.inputs.eval_prompts and self.start_step == 0 and is_main_process():
            self.sft_evaluation = self.evaluate()

    # 5. The loop.
    def train(self, algorithm: Algorithm) -> None:
        """Iterations from the resume point to `steps`: the algorithm's rollout step on this process's
        share of the prompts, the update, then the KL controller, logging, checkpoints and stopping."""
        from rlhf import tracking
        from rlhf.artifacts import CHECKPOINTS, append_metrics
        from rlhf.console import StepLines, progress_bar
        from rlhf.checkpoints import newest_checkpoint
        from rlhf.errors import TrainingDiverged
        from rlhf.responses import prompt_text
        from rlhf.rl_training import save_checkpoint, update
        from rlhf.training import GracefulStop

        ctx, config, models, controller = self.ctx, self.config, self.models, self.controller
        prompts, device = self.inputs.prompts, self.accelerator.device
        episodes_per_step = config.rollout_batch_size * config.group_size * world_size()
        updates_per_step = config.update_passes * config.rollout_batch_size * config.group_size // (config.minibatch_size * config.grad_accum)
        checkpoints = ctx.out_dir / CHECKPOINTS
        norm = models.score_normalisation
        bar = progress_bar(f"[{ctx.name}]", config.steps, initial=self.start_step, unit="it") if is_main_process() else None
        lines = StepLines(ctx.name, config.steps, unit="iteration")
        diverged = 0  # iterations in a row whose every update was NaN or inf
        started = time.perf_counter() - self.seconds_before  # so that max_seconds counts the time before a resume
        self.iterations = self.start_step
        # SIGINT/SIGTERM: finish the iteration, save a checkpoint, stop. The trackers and the bar close however it ends.
        with GracefulStop(ctx.name) as stop, self.reporting(bar):
            for step in range(self.start_step, config.steps):
                # a. This process's share of the iteration's prompts, sampled and scored with its own seed.
                batch = prompt_order(len(prompts), step * world_size() + rank(), config.rollout_batch_size, ctx.seed)
                seed = ctx.seed * 1_000_003 + step + rank() * RANK_SEED_STRIDE
                with self.accelerator.autocast():
                    rollout, stats = algorithm.rollout_step([self.encoded[i] for i in batch], [prompt_text(prompts[i]) for i in batch],
                                                            controller.value, torch.Generator(device=device).manual_seed(seed))  # fmt: skip
                # b. The algorithm's update over reshuffled minibatches; statistics averaged over processes.
                stats.update(update(models, algorithm, rollout, config, controller.value, self.accelerator, self.optimizer,
                                    self.schedule, torch.Generator().manual_seed(seed)))  # fmt: skip
                stats = mean_over_processes(stats, maxima=("ratio_max",))
                diverged = diverged + 1 if stats["nonfinite_steps"] == updates_per_step else 0
                if diverged >= config.max_nonfinite_iterations:
                    raise TrainingDiverged(
                        f"{ctx.name}: {diverged} iterations in a row had only NaN/inf losses or gradients (iteration {step + 1}); "
                        f"stopped. Last good checkpoint: {on_main(lambda: newest_checkpoint(checkpoints)) or 'none'}; "
                        "lower lr or check the reward model's scores"
                    )
                # c. Adapt beta toward the target KL (no-op when fixed), log, checkpoint, stop.
                stats.update(step=step + 1, episodes=(step + 1) * episodes_per_step, lr=self.schedule.get_last_lr()[0],
                             beta=controller.value)  # the beta this iteration trained with
                controller.update(stats["kl"], episodes_per_step)
                if step == 0:
                    stats.update(score_norm_mean=norm.mean, score_norm_std=norm.std, score_norm_samples=norm.samples)
                if is_main_process():
                    append_metrics(ctx.out_dir, stats)
                    lines.log(stats)
                    bar.update()
                self.accelerator.log(tracking.scalars(stats), step=step + 1)
                warn_if_odd(ctx.name, step, stats)
                out_of_time = every_process(config.max_seconds > 0 and time.perf_counter() - started >= config.max_seconds)
                stopping = stop.requested()
                if ((step + 1) % config.save_every == 0 and step + 1 < config.steps) or stopping:
                    on_main(lambda: save_checkpoint(checkpoints / f"step-{step + 1}", models, self.optimizer, self.schedule,
                                                    self.accelerator.scaler, controller, step + 1, self.sft_evaluation,
                                                    time.perf_counter() - started))  # fmt: skip
                if stopping:
                    stop.exit(checkpoints / f"step-{step + 1}")
                self.iterations = step + 1
                if out_of_time:
                    say(ctx.name, f"stopped after iteration {step + 1} of {config.steps}: max_seconds {config.max_seconds:g} reached")
                    break

    @contextlib.contextmanager
    def reporting(self, bar):
        """The trackers' run (started with the resolved config, resumed past the checkpoint), then the bar and
        the trackers closed."""
        from rlhf import tracking

        tracking.resume_at(self.accelerator.log_with, self.start_step)
        with tracking.quietly():
            self.accelerator.init_trackers(tracking.project_name(self.ctx.run_dir),
                                           config=tracking.hyperparameters(tracking.stage_config(self.ctx)))  # fmt: skip
        if is_main_process():
            tracking.announce(self.ctx)
        try:
            yield
        finally:
            if bar is not None:
                bar.close()
            tracking.finish(self.accelerator.trackers)  # not `end_training`: it also ends the process group

    # 6. Evaluate and save.
    def finish(self) -> dict:
        """The main process evaluates on held-out prompts and saves the policy (adapters merged), its
        tokenizer and PPO's value model; returns the stage's final metrics."""
        if not is_main_process():
            return {}
        ctx, models, before = self.ctx, self.models, self.sft_evaluation
        norm = models.score_normalisation
        episodes = self.iterations * self.config.rollout_batch_size * self.config.group_size * world_size()
        metrics: dict = {"iterations": self.iterations, "episodes": episodes,
                         "beta": self.controller.value, "score_norm_mean": norm.mean, "score_norm_std": norm.std,
                         "score_norm_samples": norm.samples}  # fmt: skip
        if self.inputs.eval_prompts:
            after = self.evaluate()
            metrics.update({f"eval_{name}": value for name, value in after.items()})
            metrics.update({f"eval_{name}_sft": value for name, value in (before or {}).items()})
            say(ctx.name, f"on {len(self.inputs.eval_prompts)} held-out prompts (sampled, seed {ctx.seed}):", quiet_too=True)
            for name in sorted(after):
                was = f"{before[name]:.3f} (SFT) -> " if before else ""
                say(ctx.name, f"  {name:9} {was}{after[name]:.3f} ({ctx.name})", quiet_too=True)
        policy = unwrapped(models.policy)
        (policy.merge_and_unload() if self.config.lora else policy).save_pretrained(ctx.out_dir)
        models.tokenizer.save_pretrained(ctx.out_dir)
        if models.value is not None:
            unwrapped(models.value).save_pretrained(ctx.out_dir / "value")
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


def warn_if_odd(stage: str, step: int, stats: dict[str, float]) -> None:
    if stats["kl"] < -1e-3:
        warnings.warn(f"{stage} iteration {step + 1}: negative mean KL {stats['kl']:.4f}: k1 estimates are noisy; "
                      "a persistent negative KL means the policy and reference disagree on the sampling setup")  # fmt: skip
    if stats.get("ratio_max", 0) > 10:
        warnings.warn(f"{stage} iteration {step + 1}: importance ratio reached {stats['ratio_max']:.1f}; lower lr or clip_range")
