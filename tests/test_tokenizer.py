"""Tests for rlhf.tokenizer: byte-level BPE and char tokenizers, saving, chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.tokenizer import (
    ASSISTANT_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    USER_TOKEN,
    save_tokenizer,
    train_tokenizer,
    train_tokenizer_from_files,
)

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "Hi! Yo.\n"
) * 20 + "Unicode: héllo wörld, 世界, 🙂 and tabs\tand   spaces.\n"

ROUND_TRIP = [
    "",
    "hello world",
    " leading space",
    "  two leading spaces and trailing  ",
    "multiple    inner   spaces",
    "line one\nline two\n\n\nline five\r\n",
    "\ttabs\tand\x0bvertical\x0ctab",
    "emoji 🙂👍🏽👨‍👩‍👧 flags 🇫🇷",
    "CJK 世界 日本語 한국어, Arabic عربى, Devanagari हिन्दी",
    "accents é è ê ñ ü ø, combining e\u0301",
    "symbols <| |> <|notaspecial|> {{ }} {% %} \\ \" '",
    "zero\x00byte and \u200b zero width",
]

MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus_file: Path):
    return train_tokenizer_from_files([corpus_file], vocab_size=400, kind="bpe")


@pytest.fixture(scope="module")
def char(corpus_file: Path):
    return train_tokenizer_from_files([str(corpus_file)], kind="char")


@pytest.fixture(scope="module")
def reloaded(bpe, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    out = save_tokenizer(bpe, tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(out))


def _check_specials(tok) -> None:
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == EOS_TOKEN
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_tokens_and_no_auto_bos_eos(kind: str, bpe, char) -> None:
    tok = bpe if kind == "bpe" else char
    _check_specials(tok)
    assert tok.is_fast
    ids = tok("hello")["input_ids"]
    assert EOS_TOKEN not in tok.convert_ids_to_tokens(ids)
    assert ids == tok.encode("hello", add_special_tokens=False)
    # Role markers and pad/eos are single tokens, never split.
    text = "".join(SPECIAL_TOKENS)
    assert tok.encode(text, add_special_tokens=False) == list(range(len(SPECIAL_TOKENS)))
    # Special-token text inside user content is encoded as the special token (documented).
    assert tok.convert_tokens_to_ids(USER_TOKEN) in tok.encode(f"a{USER_TOKEN}b")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip(bpe, text: str) -> None:
    assert bpe.decode(bpe.encode(text, add_special_tokens=False)) == text


def test_bpe_learns_merges_and_respects_vocab_size(corpus_file: Path) -> None:
    tok = train_tokenizer_from_files([corpus_file], vocab_size=300)
    assert len(tok) == 300  # corpus has far more than 300 - 261 mergeable pairs
    words = tok.encode("First Citizen", add_special_tokens=False)
    assert len(words) < len("First Citizen")
    with pytest.raises(ValueError):
        train_tokenizer([CORPUS], vocab_size=100)
    with pytest.raises(ValueError):
        train_tokenizer([CORPUS], kind="wordpiece")


def test_char_one_token_per_seen_character(char) -> None:
    text = "First Citizen:\nYou are all resolved,  speak!\n\n世界🙂\t"
    ids = char.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert char.convert_ids_to_tokens(ids) == list(text)
    assert char.decode(ids) == text
    # vocab = specials + distinct chars + 256 byte-fallback tokens
    assert len(char) == len(SPECIAL_TOKENS) + len(set(CORPUS)) + 256


@pytest.mark.parametrize("text", ["ç", "Ωmega ∑", "new emoji 🦀 here", "Ü\u0301"])
def test_char_unseen_characters_byte_fallback(char, text: str) -> None:
    ids = char.encode(text, add_special_tokens=False)
    assert char.decode(ids) == text
    tokens = char.convert_ids_to_tokens(ids)
    assert any(t.startswith("<0x") for t in tokens)


def test_char_vocab_size_ignored(corpus_file: Path, char) -> None:
    tok = train_tokenizer_from_files([corpus_file], vocab_size=10, kind="char")
    assert tok.get_vocab() == char.get_vocab()


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_deterministic(tmp_path: Path, corpus_file: Path, kind: str) -> None:
    blobs = []
    for i in range(2):
        tok = train_tokenizer_from_files([corpus_file], vocab_size=350, kind=kind)
        blobs.append((save_tokenizer(tok, tmp_path / str(i)) / "tokenizer.json").read_bytes())
    assert blobs[0] == blobs[1]


def test_texts_and_files_agree(corpus_file: Path) -> None:
    a = train_tokenizer([CORPUS], vocab_size=350)
    b = train_tokenizer(corpus_file, vocab_size=350)  # lone Path = one file
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_reload_is_fast_with_same_ids(bpe, reloaded) -> None:
    from transformers import PreTrainedTokenizerFast

    assert isinstance(reloaded, PreTrainedTokenizerFast) and reloaded.is_fast
    _check_specials(reloaded)
    assert reloaded.get_vocab() == bpe.get_vocab()
    for text in ROUND_TRIP:
        assert reloaded.encode(text, add_special_tokens=False) == bpe.encode(
            text, add_special_tokens=False
        )
        assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text
    batch = reloaded(["a", "a longer one"], padding=True)["input_ids"]
    assert batch[0][-1] == reloaded.pad_token_id  # right padding with the pad id


def test_chat_template_rendering(reloaded) -> None:
    assert reloaded.apply_chat_template(MSGS, tokenize=False) == (
        "<|user|>Hi<|endoftext|><|assistant|>Yo<|endoftext|>"
    )
    prompt = reloaded.apply_chat_template(MSGS[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>Hi<|endoftext|><|assistant|>"
    system = [{"role": "system", "content": "Be brief."}, *MSGS]
    assert reloaded.apply_chat_template(system, tokenize=False).startswith(
        "<|system|>Be brief.<|endoftext|><|user|>"
    )
    with pytest.raises(Exception, match="Unsupported chat role"):
        reloaded.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_prompt_is_prefix_of_prompt_completion(reloaded) -> None:
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": " hello there "}]
    completion = [{"role": "assistant", "content": " general kenobi\n"}]
    p_str = reloaded.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    pc_str = reloaded.apply_chat_template(prompt + completion, tokenize=False)
    assert pc_str.startswith(p_str)
    p_ids = reloaded.apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    pc_ids = reloaded.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert pc_ids[: len(p_ids)] == p_ids


def test_assistant_tokens_mask(reloaded) -> None:
    msgs = [*MSGS, {"role": "user", "content": "More"}, {"role": "assistant", "content": "ok!"}]
    out = reloaded.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    expected = reloaded.encode("Yo" + EOS_TOKEN + "ok!" + EOS_TOKEN, add_special_tokens=False)
    assert masked == expected
    # The assistant marker itself is prompt, not target.
    assistant_id = reloaded.convert_tokens_to_ids(ASSISTANT_TOKEN)
    assert all(m == 0 for i, m in zip(ids, mask) if i == assistant_id)
    # Each masked span ends on EOS (the model learns to stop).
    for pos, m in enumerate(mask):
        if m and (pos + 1 == len(mask) or not mask[pos + 1]):
            assert ids[pos] == reloaded.eos_token_id


def test_char_chat_template(char, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(save_tokenizer(char, tmp_path)))
    out = tok.apply_chat_template(
        MSGS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert tok.convert_ids_to_tokens(out["input_ids"]) == [
        USER_TOKEN, "H", "i", EOS_TOKEN, ASSISTANT_TOKEN, "Y", "o", EOS_TOKEN,
    ]
    assert out["assistant_masks"] == [0, 0, 0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_trl_accepts_chat_template(reloaded) -> None:
    """TRL (importing it takes ~10 s) sees generation markers and a trained stop token."""
    chat_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_utils.has_generation_markers(reloaded.chat_template)
    assert chat_utils.is_chat_template_stop_token_trained(reloaded)


def test_check_fits_model_matches_pad_and_eos_and_accepts_an_eos_list(bpe) -> None:
    from types import SimpleNamespace

    from rlhf.errors import ArtifactError
    from rlhf.tokenizer import check_fits_model

    fits = dict(vocab_size=len(bpe), pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id)
    check_fits_model(bpe, SimpleNamespace(**fits), "m")
    check_fits_model(bpe, SimpleNamespace(**{**fits, "eos_token_id": [7, bpe.eos_token_id]}), "m")  # Llama 3's list
    with pytest.raises(ArtifactError, match=f"m: the tokenizer's eos_token_id is {bpe.eos_token_id} but the model's is \\[7, 8\\]"):
        check_fits_model(bpe, SimpleNamespace(**{**fits, "eos_token_id": [7, 8]}), "m")
    with pytest.raises(ArtifactError, match="the tokenizer's pad_token_id"):
        check_fits_model(bpe, SimpleNamespace(**{**fits, "pad_token_id": bpe.pad_token_id + 1}), "m")
    with pytest.raises(ArtifactError, match="the model's vocabulary is 3"):
        check_fits_model(bpe, SimpleNamespace(**{**fits, "vocab_size": 3}), "m")
