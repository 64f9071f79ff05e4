"""Stage `tokenizer`: train the tokenizer on the pipeline's text."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from rlhf.config import TokenizerConfig
from rlhf.data import all_strings, read_rows, read_text_documents
from rlhf.stages import StageContext
from rlhf.console import say


def upstream(config) -> tuple[str, ...]:
    return ()


def inputs(config: TokenizerConfig) -> list[str]:
    return list(config.data)


class TokenizerInputs(NamedTuple):
    texts: list[str]
    """The training text: plain-text files whole, every string of tabular files."""


def read_inputs(config: TokenizerConfig) -> TokenizerInputs:
    texts = []
    for name in config.data:
        if Path(name).suffix == ".txt":
            texts += read_text_documents([name])
        else:
            rows = read_rows(name)
            texts += [s for row in rows[: len(rows) - config.exclude_last_rows] for s in all_strings(row)]
    return TokenizerInputs(texts)


def run(ctx: StageContext) -> dict:
    from rlhf.tokenizer import save_tokenizer, train_tokenizer

    config: TokenizerConfig = ctx.config
    # 1. Gather text: plain-text files whole, every string of tabular files.
    texts = read_inputs(config).texts
    # 2. Train and save.
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size, kind=config.kind)
    save_tokenizer(tokenizer, ctx.begin())
    say("tokenizer", f"{config.kind}, {len(tokenizer)} tokens, trained on {sum(len(t) for t in texts):,} characters")
    return {"vocab_size": len(tokenizer), "characters": sum(len(t) for t in texts)}
