"""Stage `reward`: a reward model on preference pairs, on TRL's `RewardTrainer`.

The scalar-head model starts from the `init` stage's backbone (SFT by default; or a model folder,
loaded by `rlhf.pretrained`), dropout off, and
learns a Bradley-Terry loss (minus an optional per-pair margin; optional reward centring). A
sequence's reward is the score at its last non-pad token. After training it reports held-out
pairwise accuracy and mean margin, then normalises: the init policy answers training prompts,
and the mean and standard deviation of their scores are folded into the score head (weight / std,
bias (bias - mean) / std), so the saved model's scores are mean 0, std 1 under that policy (as in
OpenAI's original RLHF work) and a value model initialised from it starts on that scale. The
config keeps reward_mean 0 and reward_std 1 and records the folded figures (folded_reward_mean/std).
"""

from __future__ import annotations

import random
import statistics
from typing import NamedTuple

from rlhf.config import REWARD_INIT_STAGES, RewardConfig
from rlhf.data import read_preference_split
from rlhf.errors import DataError
from rlhf.stages import StageContext
from rlhf.console import say

DATA_PARALLEL = True  # under torchrun, each process trains on its share of every batch; the main one evaluates


def upstream(config: RewardConfig) -> tuple[str, ...]:
    from rlhf.pretrained import init_folder

    return () if init_folder(config.init, REWARD_INIT_STAGES) else (config.init,)


def inputs(config: RewardConfig) -> list[str]:
    from rlhf.pretrained import init_folder

    return [config.data] + ([config.init] if init_folder(config.init, REWARD_INIT_STAGES) else [])


def split_rows(rows: list, config: RewardConfig) -> tuple[list, list]:
    from rlhf.data import split_preference_rows

    return split_preference_rows(rows, config.eval_rows, config.eval_fraction)


class RewardInputs(NamedTuple):
    train_pairs: list[dict]
    eval_pairs: list[dict]
    skipped: int
    """hh-rlhf rows skipped for an empty final answer."""


def read_inputs(config: RewardConfig) -> RewardInputs:
    """The checked training and held-out pairs (and the model folder of a folder `init`). The split comes
    before conversion, so the held-out rows are fixed."""
    from rlhf.pretrained import check_init

    check_init(config.init, REWARD_INIT_STAGES)
    return RewardInputs(*read_preference_split(config.data, config.eval_rows, config.eval_fraction))


def pair_lengths(tokenizer, pair: dict) -> int:
    """Tokens of the longer side of a pair, rendered as the trainer renders it."""
    from rlhf.scoring import render_conversation

    texts = [render_conversation(tokenizer, pair.get("prompt"), pair[side]) for side in ("chosen", "rejected")]
    return max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def pair_accuracy(scorer, pairs: list[dict]) -> tuple[float, float]:
    """(share of pairs where chosen outscores rejected, mean raw margin)."""
    prompts = [p.get("prompt") for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs], normalised=False)
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs], normalised=False)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(m > 0 for m in margins) / len(margins), statistics.fmean(margins)


def run(ctx: StageContext) -> dict:
    import torch
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from rlhf.distributed import is_main_process
    from rlhf.model import normalise_score_head, set_dropout
    from rlhf.pretrained import init_folder, load_causal_lm, load_reward_model
    from rlhf.responses import sample_responses
    from rlhf.scoring import RewardScorer
    from rlhf.tokenizer import check_fits_model
    from rlhf.training import save_trained, train, trainer_arguments

    config: RewardConfig = ctx.config

    # 1. Read and check the pairs; split before conversion so the test rows are fixed.
    train_pairs, eval_pairs, skipped = read_inputs(config)
    if skipped:
        say("reward", f"skipped {skipped} hh-rlhf pairs whose final answer is empty")

    # 2. Load the init backbone (a stage's, or a model folder's); count pairs the context cannot hold (the
    #    trainer leaves them out).
    init_dir = init_folder(config.init, REWARD_INIT_STAGES) or ctx.upstream(config.init)
    torch.manual_seed(ctx.seed)  # the new score head's initialisation
    model, tokenizer = load_reward_model(init_dir)
    say("reward", f"{init_dir}'s backbone with a new score head, trained from here")
    check_fits_model(tokenizer, model.config, init_dir)
    set_dropout(model, 0.0)
    max_length = config.max_length or model.config.n_positions
    if max_length > model.config.n_positions:
        raise ctx.setting_error("max_length", f"{max_length} exceeds the model's context ({model.config.n_positions})")
    too_long = sum(pair_lengths(tokenizer, p) > max_length for p in train_pairs)
    if too_long == len(train_pairs):
        raise DataError(f"{config.data}: every training pair is longer than max_length {max_length} tokens")
    if too_long:
        say("reward", f"{too_long} of {len(train_pairs)} training pairs exceed max_length {max_length} and are left out")
    out_dir = ctx.begin()

    # 3. Train with TRL's RewardTrainer (Bradley-Terry, optional margin and centring).
    args = trainer_arguments(
        TRLRewardConfig, config, out_dir, ctx.seed, has_eval=True, max_length=max_length,
        center_rewards_coefficient=config.center_rewards_coefficient or None, disable_dropout=True,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_pairs), eval_dataset=Dataset.from_list(eval_pairs),
    )  # fmt: skip
    seconds = train(trainer, ctx)
    save_trained(trainer, tokenizer, out_dir)
    if not is_main_process():
        return {}

    # 4. Held-out accuracy and margin, scored exactly as downstream tools score (the main process).
    scorer = RewardScorer(out_dir)
    accuracy, margin = pair_accuracy(scorer, eval_pairs)

    # 5. Normalise under the init policy's own responses to training prompts: fold the statistics into
    #    the saved model's score head (the model as saved, reloaded by the scorer: sharding-proof).
    prompts = [p["prompt"] for p in train_pairs if "prompt" in p]
    if len(prompts) >= 2:
        random.Random(ctx.seed).shuffle(prompts)
        prompts = prompts[: config.norm_prompts]
        policy = load_causal_lm(init_dir)[0].to(scorer.device)
        responses = sample_responses(policy, tokenizer, prompts, config.norm_max_new_tokens, temperature=1.0, seed=ctx.seed)
        raw = scorer.score(prompts, responses, normalised=False)
        source = f"{len(prompts)} responses of the {config.init} policy"
    else:  # implicit text pairs: no prompts to answer, so normalise over the training texts
        raw = scorer.score([None] * len(train_pairs), [p["chosen"] for p in train_pairs], normalised=False)
        source = f"{len(raw)} chosen training texts"
    mean, std = statistics.fmean(raw), statistics.pstdev(raw) or 1.0
    normalise_score_head(scorer.model, mean, std)
    scorer.model.save_pretrained(out_dir)

    metrics = {
        "eval_accuracy": accuracy, "eval_margin": margin, "eval_pairs": len(eval_pairs), "train_pairs": len(train_pairs),
        "too_long_pairs": too_long, "skipped_empty_pairs": skipped, "reward_mean": mean, "reward_std": std,
        "train_seconds": round(seconds, 1), "steps": trainer.state.global_step,
    }  # fmt: skip
    say(
        "reward", f"{metrics['steps']} steps in {seconds:.1f} s; held-out pairwise accuracy {accuracy:.3f} "
        f"on {len(eval_pairs)} pairs, mean margin {margin:.3f}; normalised over {source} "
        f"(mean {mean:.3f}, std {std:.3f}, folded into the score head)", quiet_too=True
    )
    return metrics
