"""Stage `dpo`: direct preference optimisation of the SFT policy on preference pairs, on TRL's `DPOTrainer`.

No reward model and no sampling: the policy learns from the pairs directly, its implicit reward
being beta x its log-probability ratio to the reference, the SFT policy held fixed (with `lora`,
the same model with its adapters disabled, so only one copy is kept; the adapters are merged into
the saved model, so later stages load a plain model). The pairs are the reward stage's, read by
the same code. TRL logs rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins and
logps/chosen, logps/rejected to metrics.jsonl; held-out pairs give the same figures at the end. If
a judge is configured, the SFT and the DPO policies answer the held-out prompts greedily and both
scores are reported.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from rlhf.config import DPOStageConfig
from rlhf.data import read_preference_split
from rlhf.stages import StageContext
from rlhf.console import say

DATA_PARALLEL = True  # under torchrun, each process trains on its share of every batch; the main one judges


def upstream(config: DPOStageConfig) -> tuple[str, ...]:
    return ("sft",)


def inputs(config: DPOStageConfig) -> list[str]:
    return [config.data] + ([config.eval_prompts] if config.eval_prompts else [])


class DPOInputs(NamedTuple):
    train_pairs: list[dict]
    eval_pairs: list[dict]
    """The last rows of the file (`eval_rows`, else `eval_fraction`), split before conversion."""
    skipped: int
    """hh-rlhf rows left out for an empty final answer."""
    judge: Callable | None
    judge_prompts: list[Any]


def read_inputs(config: DPOStageConfig) -> DPOInputs:
    """The checked pairs, split as the reward stage splits them, and the judge with its held-out prompts if configured."""
    from rlhf.responses import read_judge

    train_pairs, eval_pairs, skipped = read_preference_split(config.data, config.eval_rows, config.eval_fraction)
    judge, judge_prompts = read_judge(config.eval_prompts, config.judge)
    return DPOInputs(train_pairs, eval_pairs, skipped, judge, judge_prompts)


def beyond_context(tokenized, pairs: int, max_length: int) -> dict[str, int]:
    """Counts of training pairs past `max_length` tokens after TRL's tokenization (`tokenized`: rows of
    prompt_ids, chosen_ids, rejected_ids): those it left out (the prompt alone fills the length) and
    those its collator cuts (prompt + the longer answer is longer)."""
    cut = sum(len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) > max_length for row in tokenized)
    return {"dropped_long_pairs": pairs - len(tokenized), "cut_long_pairs": cut}


def run(ctx: StageContext) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.distributed import is_main_process
    from rlhf.responses import judge_policy
    from rlhf.tokenizer import check_fits_model
    from rlhf.training import peft_config, save_and_judge, train, trainer_arguments

    config: DPOStageConfig = ctx.config

    # 1. Read and check the pairs (and judge prompts); the held-out rows are the file's last.
    train_pairs, eval_pairs, skipped, judge, judge_prompts = read_inputs(config)
    if skipped:
        say("dpo", f"skipped {skipped} hh-rlhf pairs whose final answer is empty")

    # 2. Load the SFT policy twice: the model to train and the fixed reference (none with LoRA:
    #    TRL then scores the reference with the adapters disabled).
    sft_dir = ctx.upstream("sft")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    check_fits_model(tokenizer, model.config, sft_dir)
    max_length = config.max_length or model.config.n_positions
    if max_length > model.config.n_positions:
        raise ctx.setting_error("max_length", f"{max_length} exceeds the SFT model's context ({model.config.n_positions})")
    reference = None if config.lora else AutoModelForCausalLM.from_pretrained(sft_dir)
    out_dir = ctx.begin()
    metrics: dict = {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "skipped_empty_pairs": skipped}
    if judge and is_main_process():
        metrics["judge_before"] = judge_policy(model, tokenizer, judge_prompts, judge, config.max_new_tokens, ctx.seed)

    # 3. Train on TRL's DPOTrainer with the chosen loss, optionally through LoRA.
    to_dataset = lambda pairs: Dataset.from_list([{k: v for k, v in p.items() if k != "margin"} for p in pairs])  # noqa: E731
    args = trainer_arguments(
        TRLDPOConfig, config, out_dir, ctx.seed, has_eval=True, max_length=max_length,
        beta=config.beta, loss_type=[config.loss_type], label_smoothing=config.label_smoothing,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=args, processing_class=tokenizer, peft_config=peft_config(config.lora),
        train_dataset=to_dataset(train_pairs), eval_dataset=to_dataset(eval_pairs),
    )  # fmt: skip
    metrics.update(beyond_context(trainer.train_dataset, len(train_pairs), max_length))
    if metrics["dropped_long_pairs"] or metrics["cut_long_pairs"]:
        say("dpo", f"of {len(train_pairs)} training pairs longer than {max_length} tokens, {metrics['cut_long_pairs']} "
            f"are cut to it (their end dropped) and {metrics['dropped_long_pairs']} left out (the prompt alone fills it)")  # fmt: skip
    seconds = train(trainer, ctx)
    evaluation = trainer.evaluate()

    # 4. Save (adapters merged); the main process judges the saved policy.
    if not save_and_judge(trainer, tokenizer, out_dir, config, judge, judge_prompts, ctx.seed, metrics):
        return {}
    metrics.update(
        eval_loss=evaluation["eval_loss"], eval_accuracy=evaluation["eval_rewards/accuracies"],
        eval_margin=evaluation["eval_rewards/margins"], train_seconds=round(seconds, 1), steps=trainer.state.global_step,
    )  # fmt: skip
    say(
        "dpo", f"{metrics['steps']} steps in {seconds:.1f} s ({config.loss_type}, beta {config.beta:g}); on "
        f"{len(eval_pairs)} held-out pairs: loss {metrics['eval_loss']:.4f}, implicit-reward accuracy "
        f"{metrics['eval_accuracy']:.3f}, mean margin {metrics['eval_margin']:.3f}", quiet_too=True
    )
    if judge:
        say(
            "dpo", f"judge score on {len(judge_prompts)} held-out prompts (greedy): SFT "
            f"{metrics['judge_before']:.3f} -> DPO {metrics['judge_after']:.3f}", quiet_too=True
        )
    return metrics
