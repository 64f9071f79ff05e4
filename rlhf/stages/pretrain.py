"""Stage `pretrain`: next-token prediction from scratch on plain text, on TRL's `SFTTrainer`
(`rlhf.sft_trainer`: full logits where they are small).

The corpus is tokenized into one stream (documents separated by EOS); its last `eval_fraction`
is held out, like nanoGPT's 90/10 split. TRL packs each part into fixed-length blocks ("wrapped"
packing) and trains with the shared schedule, clipping and precision settings. With `packing:
documents` each document is instead a row of its own from position 0 (the last `eval_fraction` of
the documents held out), padded per batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from rlhf.config import PretrainConfig
from rlhf.data import read_text_documents
from rlhf.errors import DataError
from rlhf.stages import StageContext
from rlhf.console import say

DATA_PARALLEL = True  # under torchrun, each process trains on its share of every batch


def upstream(config) -> tuple[str, ...]:
    return ("tokenizer",)


def inputs(config: PretrainConfig) -> list[str]:
    return list(config.data)


class PretrainInputs(NamedTuple):
    documents: list[str]
    """The corpus, one string per document (as `txt_documents` and `text_column` choose)."""


def read_inputs(config: PretrainConfig) -> PretrainInputs:
    return PretrainInputs(read_text_documents(config.data, config.text_column, config.exclude_last_rows, config.txt_documents == "lines"))


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """All documents as one token list, each followed by EOS when there are several."""
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(documents) > 1:
            stream.append(tokenizer.eos_token_id)
    return stream


def blocks(stream: list[int], size: int) -> list[list[int]]:
    """Rows of the dataset handed to TRL's packer: the stream cut into pieces of `size` tokens."""
    return [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]


def document_rows(tokenizer, documents: list[str], size: int) -> list[list[int]]:
    """Rows for `packing: documents`: each document with its EOS, from position 0, cut into pieces of
    at most `size` tokens."""
    rows = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows += [ids[i : i + size] for i in range(0, len(ids), size)]
    return rows


def split_rows(config: PretrainConfig, tokenizer, documents: list[str], size: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(training rows, held-out rows, corpus tokens): the last `eval_fraction` of the corpus is held
    out, as a tail of the token stream ('wrapped') or of the documents ('documents')."""
    if config.packing == "documents":
        rows = document_rows(tokenizer, documents, size)
        held_out = max(1, int(len(rows) * config.eval_fraction))
        return rows[:-held_out], rows[-held_out:], sum(map(len, rows))
    stream = token_stream(tokenizer, documents)
    held_out = max(size, int(len(stream) * config.eval_fraction))
    return blocks(stream[:-held_out], size), blocks(stream[-held_out:], size), len(stream)


def run(ctx: StageContext) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from rlhf.model import RlhfConfig, RlhfForCausalLM
    from rlhf.sft_trainer import SFTTrainer
    from rlhf.training import save_trained, train, trainer_arguments

    config: PretrainConfig = ctx.config
    block_size = config.block_size or config.model.n_positions

    # 1. Read the corpus and the tokenizer; hold out the tail of the token stream.
    documents = read_inputs(config).documents
    tokenizer = AutoTokenizer.from_pretrained(ctx.upstream("tokenizer"))
    train_blocks, eval_blocks, tokens = split_rows(config, tokenizer, documents, block_size)
    if not train_blocks or not eval_blocks:
        raise DataError(f"{config.data[0]}: corpus too small: {tokens} tokens for blocks of {block_size}")
    unit = f"blocks of {block_size}" if config.packing == "wrapped" else f"documents (up to {block_size} tokens)"
    say("pretrain", f"{tokens:,} tokens, {len(train_blocks):,} training {unit}, {len(eval_blocks)} held out")
    out_dir = ctx.begin()

    # 2. Build the model from scratch.
    torch.manual_seed(ctx.seed)
    shape = config.model
    llama = {"n_kv_head": shape.n_kv_head or shape.n_head, "rope_theta": shape.rope_theta, "tie_word_embeddings": False}
    model_config = RlhfConfig(
        vocab_size=len(tokenizer), n_positions=shape.n_positions, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, dropout=shape.dropout, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, layout=shape.layout,
        **(llama if shape.layout == "llama" else {"activation_function": shape.activation}),
    )  # fmt: skip
    model = RlhfForCausalLM(model_config)
    say("pretrain", f"model of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # 3. Train on TRL's SFTTrainer: pre-tokenized rows, wrapped packing into fixed blocks or one document a row.
    packing = {"packing": True, "packing_strategy": "wrapped"} if config.packing == "wrapped" else {"packing": False}
    args = trainer_arguments(SFTConfig, config, out_dir, ctx.seed, has_eval=True, max_length=block_size, **packing)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": train_blocks}),
        eval_dataset=Dataset.from_dict({"input_ids": eval_blocks}),
        processing_class=tokenizer,
    )
    seconds = train(trainer, ctx)

    # 4. Evaluate on the held-out tail and save in save_pretrained layout.
    evaluation = trainer.evaluate()
    save_trained(trainer, tokenizer, out_dir)
    metrics = {
        "eval_loss": evaluation["eval_loss"],
        "eval_perplexity": math.exp(evaluation["eval_loss"]),
        "eval_accuracy": evaluation.get("eval_mean_token_accuracy"),
        "train_seconds": round(seconds, 1),
        "steps": trainer.state.global_step,
    }
    say(
        "pretrain", f"{metrics['steps']} steps in {seconds:.1f} s; held-out loss {metrics['eval_loss']:.4f}, "
        f"perplexity {metrics['eval_perplexity']:.2f}, next-token accuracy {metrics['eval_accuracy']:.3f}", quiet_too=True
    )
    return metrics
