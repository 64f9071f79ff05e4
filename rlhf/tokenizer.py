"""Train and save tokenizers for the in-house GPT decoder.

Two kinds are supported:

* ``"bpe"`` -- byte-level BPE (GPT-2 style). Every UTF-8 string round-trips exactly.
* ``"char"`` -- character level (nanoGPT's Tiny Shakespeare model): one token per character
  seen in training, plus 256 ``<0xNN>`` byte-fallback tokens so unseen characters still
  round-trip.

Both return a ``transformers.PreTrainedTokenizerFast`` with the special tokens below at
ids 0..4, a pad token distinct from EOS, no automatic BOS/EOS insertion and a chat
template whose assistant turns are wrapped in ``{% generation %}`` markers (for TRL's
``assistant_only_loss`` / ``return_assistant_tokens_mask``). Save it with
``tok.save_pretrained(dir)`` (or :func:`save_tokenizer`) and reload it with
``AutoTokenizer.from_pretrained(dir)``.

Note: special-token text occurring inside ordinary input (e.g. the literal string
``"<|user|>"``) is encoded as that special token, like every HF tokenizer with added
special tokens; such strings therefore decode to the same text but not via plain bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config.stages import TOKENIZER_KINDS as KINDS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]  # ids 0..4
_MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the full byte alphabet

ROLE_TOKENS = [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]
"""The role markers of our chat template (special tokens of our tokenizers)."""


def chat_template(eos_token: str = EOS_TOKEN) -> str:
    """Our chat template, closing each message with `eos_token` (ours, or a pretrained tokenizer's own).

    Each message renders as '<|role|>' + content + eos, with no extra whitespace. The assistant
    content and its closing eos sit inside {% generation %} so that they form the assistant mask;
    the '<|assistant|>' marker itself is prompt (it is the generation prompt).
    """
    if "'" in eos_token or "\\" in eos_token:
        raise ValueError(f"end-of-sequence token {eos_token!r}: quotes and backslashes cannot go into the chat template")
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception('Unsupported chat role: ' + message['role']) -}}"
        "{%- endif -%}"
        "{{- '<|' + message['role'] + '|>' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- message['content'] + '" + eos_token + "' -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- message['content'] + '" + eos_token + "' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_TOKEN + "' -}}{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template()

TextsOrFiles = Iterable[str] | Iterable[os.PathLike]


def _iter_texts(source: TextsOrFiles) -> Iterable[str]:
    """Yield texts; ``PathLike`` items are read as UTF-8 files, ``str`` items are raw text.

    A single ``str`` / ``PathLike`` is treated as a one-element collection.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else source
    for item in items:
        if isinstance(item, os.PathLike):
            yield Path(item).read_text(encoding="utf-8")
        else:
            yield item


def _build_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return tk


def _build_char(texts: Iterable[str]):
    from tokenizers import Tokenizer, decoders, models

    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *sorted(chars), *byte_tokens]:
        vocab.setdefault(token, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tk


def train_tokenizer(
    source: TextsOrFiles,
    vocab_size: int = 4096,
    kind: str = "bpe",
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer and wrap it as a ``PreTrainedTokenizerFast`` with a chat template.

    Args:
        source: Training data. ``str`` items are raw texts; ``os.PathLike`` items (e.g.
            ``pathlib.Path``) are read as UTF-8 files. A lone ``str``/``PathLike`` is one
            item. Use :func:`train_tokenizer_from_files` to pass file names as plain strings.
        vocab_size: Upper bound on the vocabulary size, special tokens included (``"bpe"``
            only; ignored for ``"char"``).
        kind: ``"bpe"`` (byte-level BPE) or ``"char"`` (characters + byte fallback).
        min_frequency: Minimum pair count for a BPE merge (``"bpe"`` only).
        model_max_length: Optional maximum sequence length stored on the tokenizer.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "bpe" and vocab_size < _MIN_BPE_VOCAB:
        raise ValueError(f"byte-level BPE needs vocab_size >= {_MIN_BPE_VOCAB}, got {vocab_size}")
    texts = _iter_texts(source)
    tk = _build_bpe(texts, vocab_size, min_frequency) if kind == "bpe" else _build_char(texts)
    # Register the specials as added tokens (ids 0..4 already exist) so they are never split.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert [tk.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))

    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        extra_special_tokens=ROLE_TOKENS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **extra,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def train_tokenizer_from_files(
    files: Iterable[str | os.PathLike],
    vocab_size: int = 4096,
    kind: str = "bpe",
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Like :func:`train_tokenizer`, treating every item of ``files`` as a UTF-8 file path."""
    return train_tokenizer(
        [Path(f) for f in files], vocab_size, kind, min_frequency, model_max_length
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> Path:
    """Save ``tok`` (tokenizer.json, config, chat template) to ``out_dir``; return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def check_fits_model(tok: PreTrainedTokenizerFast, model_config, where: str | os.PathLike) -> None:
    """Refuse a tokenizer and a model that do not belong together (an `ArtifactError` naming `where`).

    The model must embed every token id (its vocabulary may be padded beyond the tokenizer's), and
    pad and end-of-sequence must be the same tokens for both (a model may list several end-of-sequence
    ids, as Llama 3's configs do: the tokenizer's must be one of them).
    """
    from rlhf.errors import ArtifactError

    if len(tok) > model_config.vocab_size:
        raise ArtifactError(
            f"{where}: the tokenizer has {len(tok)} tokens but the model's vocabulary is {model_config.vocab_size}: "
            "they do not belong together"
        )
    for name in ("pad_token_id", "eos_token_id"):
        expected = getattr(model_config, name, None)
        if expected is not None and getattr(tok, name) not in (expected if isinstance(expected, list) else [expected]):
            raise ArtifactError(f"{where}: the tokenizer's {name} is {getattr(tok, name)} but the model's is {expected}")
