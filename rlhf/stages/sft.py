"""Stage `sft`: supervised fine-tuning of the pretrained model on demonstrations, on TRL's `SFTTrainer`.

The model is the pretrain stage's output, or a model folder (`init: DIR`, loaded by `rlhf.pretrained`:
one of ours, or a transformers checkpoint converted to our decoder), so a pipeline may begin here.

Loss on the completion only: assistant turns for conversational `messages` data (TRL's
`assistant_only_loss`, driven by the chat template's generation markers), the completion for
`prompt`/`completion` data. With `lora`, PEFT adapters are trained and merged into the saved
model, so later stages load a plain model. If a judge is configured, the pretrained and the
fine-tuned policies answer the held-out prompts greedily and both scores are reported.
"""

from __future__ import annotations

import math

from typing import Any, Callable, NamedTuple

from rlhf.config import SFT_INIT_STAGES, SFTConfig
from rlhf.data import check_sft_rows, read_rows, split_tail
from rlhf.errors import DataError
from rlhf.stages import StageContext
from rlhf.console import say

DATA_PARALLEL = True  # under torchrun, each process trains on its share of every batch; the main one judges


def upstream(config: SFTConfig) -> tuple[str, ...]:
    from rlhf.pretrained import init_folder

    return () if init_folder(config.init, SFT_INIT_STAGES) else (config.init,)


def inputs(config: SFTConfig) -> list[str]:
    from rlhf.pretrained import init_folder

    base = [config.init] if init_folder(config.init, SFT_INIT_STAGES) else []
    return [config.data] + ([config.eval_prompts] if config.eval_prompts else []) + base


class SFTInputs(NamedTuple):
    rows: list[dict]
    data_format: str
    """'messages' or 'prompt_completion'."""
    judge: Callable | None
    judge_prompts: list[Any]


def read_inputs(config: SFTConfig) -> SFTInputs:
    """The checked demonstrations, and the judge with its held-out prompts if configured (and the model
    folder of a folder `init`)."""
    from rlhf.pretrained import check_init
    from rlhf.responses import read_judge

    check_init(config.init, SFT_INIT_STAGES)
    rows = read_rows(config.data)
    data_format = check_sft_rows(config.data, rows)
    judge, judge_prompts = read_judge(config.eval_prompts, config.judge)
    return SFTInputs(rows, data_format, judge, judge_prompts)


def rendered_lengths(tokenizer, rows: list[dict], data_format: str) -> list[int]:
    """Token count of each example as the trainer will see it."""
    from rlhf.responses import prompt_messages

    lengths = []
    for row in rows:
        if data_format == "messages":
            messages = row["messages"]
        else:
            completion = row["completion"]
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            messages = prompt_messages(row["prompt"]) + completion
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def last_turn_completions(rows: list[dict]) -> list[dict]:
    """`messages` rows as prompt/completion rows, the last assistant turn the completion: for a chat template
    without {% generation %} markers, where TRL cannot mask the loss to every assistant turn."""
    return [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows]


def check_lengths(path: str, lengths: list[int], max_length: int) -> None:
    """Refuse examples longer than `max_length`: truncating one would cut its answer and closing EOS."""
    too_long = [number for number, length in enumerate(lengths, start=1) if length > max_length]
    if too_long:
        first = too_long[0]
        raise DataError(
            f"{path}: row {first}: {lengths[first - 1]} tokens, longer than max_length {max_length} "
            f"({len(too_long)} of {len(lengths)} rows are); shorten or drop such rows"
        )


def run(ctx: StageContext) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig

    from rlhf.distributed import is_main_process
    from rlhf.pretrained import has_generation_markers, init_folder, load_causal_lm
    from rlhf.responses import judge_policy
    from rlhf.sft_trainer import SFTTrainer
    from rlhf.tokenizer import check_fits_model
    from rlhf.training import peft_config, save_and_judge, train, trainer_arguments

    config: SFTConfig = ctx.config

    # 1. Read and check the demonstrations (and judge prompts); hold out the last rows.
    rows, data_format, judge, judge_prompts = read_inputs(config)
    train_rows, eval_rows = split_tail(rows, config.eval_fraction)

    # 2. Load the pretrained model and tokenizer (the init stage's, or a model folder's, converted to our
    #    decoder); refuse examples the context cannot hold.
    pretrained = init_folder(config.init, SFT_INIT_STAGES) or ctx.upstream(config.init)
    torch.manual_seed(ctx.seed)  # the embeddings of tokens added to a folder's tokenizer
    model, tokenizer = load_causal_lm(pretrained)
    check_fits_model(tokenizer, model.config, pretrained)
    if data_format == "messages" and not has_generation_markers(tokenizer):
        say("sft", f"{pretrained}'s chat template has no {{% generation %}} markers: loss on each conversation's last answer")
        rows, data_format = last_turn_completions(rows), "prompt_completion"
        train_rows, eval_rows = split_tail(rows, config.eval_fraction)
    max_length = config.max_length or model.config.n_positions
    if max_length > model.config.n_positions:
        raise ctx.setting_error("max_length", f"{max_length} exceeds the pretrained model's context ({model.config.n_positions})")
    check_lengths(config.data, rendered_lengths(tokenizer, rows, data_format), max_length)
    out_dir = ctx.begin()
    metrics: dict = {"examples": len(rows)}
    if judge and is_main_process():
        metrics["judge_before"] = judge_policy(model, tokenizer, judge_prompts, judge, config.max_new_tokens, ctx.seed)

    # 3. Fine-tune on TRL's SFTTrainer, loss on completions only, optionally through LoRA.
    columns = ["messages"] if data_format == "messages" else ["prompt", "completion"]
    to_dataset = lambda part: Dataset.from_list([{c: row[c] for c in columns} for row in part])  # noqa: E731
    args = trainer_arguments(
        TRLSFTConfig, config, out_dir, ctx.seed, has_eval=True,
        max_length=max_length, assistant_only_loss=data_format == "messages",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=to_dataset(train_rows), eval_dataset=to_dataset(eval_rows),
        processing_class=tokenizer, peft_config=peft_config(config.lora),
    )  # fmt: skip
    seconds = train(trainer, ctx)
    evaluation = trainer.evaluate()

    # 4. Save (adapters merged); the main process judges the saved policy.
    if not save_and_judge(trainer, tokenizer, out_dir, config, judge, judge_prompts, ctx.seed, metrics):
        return {}
    metrics.update(
        eval_loss=evaluation["eval_loss"], eval_perplexity=math.exp(evaluation["eval_loss"]),
        eval_accuracy=evaluation.get("eval_mean_token_accuracy"), train_seconds=round(seconds, 1),
        steps=trainer.state.global_step,
    )  # fmt: skip
    say(
        "sft", f"{metrics['steps']} steps in {seconds:.1f} s; held-out completion loss {metrics['eval_loss']:.4f}, "
        f"perplexity {metrics['eval_perplexity']:.2f}, next-token accuracy {metrics['eval_accuracy']:.3f}", quiet_too=True
    )
    if judge:
        say(
            "sft", f"judge score on {len(judge_prompts)} held-out prompts (greedy): pretrained "
            f"{metrics['judge_before']:.3f} -> SFT {metrics['judge_after']:.3f}", quiet_too=True
        )
    return metrics
