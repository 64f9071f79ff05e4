"""The pretrain stage's corpus rows: wrapped blocks of one stream, or one document a row."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rlhf.config import PretrainConfig
from rlhf.stages.pretrain import blocks, document_rows, split_rows, token_stream


@pytest.fixture(scope="module")
def tokenizer(tiny_rlhf):
    return AutoTokenizer.from_pretrained(tiny_rlhf.run_dir / "tokenizer")


def test_document_rows_start_each_document_at_position_zero(tokenizer) -> None:
    documents = ["What is 3 + 4? 3 + 4 = 7.", "Have a nice day.", "Here are 2 fruits: apple, pear."]
    rows = document_rows(tokenizer, documents, size=1000)
    assert len(rows) == 3
    for row, document in zip(rows, documents):
        assert row == tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_document_rows_cut_long_documents(tokenizer) -> None:
    ids = tokenizer("apple pear plum " * 20, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = document_rows(tokenizer, ["apple pear plum " * 20], size=7)
    assert [len(r) for r in rows[:-1]] == [7] * (len(rows) - 1) and 0 < len(rows[-1]) <= 7
    assert sum(rows, []) == ids


def test_split_rows_holds_out_the_tail(tokenizer) -> None:
    documents = [f"{a} + {a} = {2 * a}." for a in range(10)]
    config = PretrainConfig(data=["corpus.txt"], packing="documents", eval_fraction=0.2)
    train, held, tokens = split_rows(config, tokenizer, documents, size=64)
    assert (len(train), len(held)) == (8, 2)
    assert held == document_rows(tokenizer, documents[-2:], 64) and tokens == sum(map(len, train + held))
    wrapped = PretrainConfig(data=["corpus.txt"], eval_fraction=0.2)
    train, held, tokens = split_rows(wrapped, tokenizer, documents, size=8)
    stream = token_stream(tokenizer, documents)
    assert tokens == len(stream) and train == blocks(stream[: -max(8, int(len(stream) * 0.2))], 8)


@pytest.mark.parametrize("key, value", [("packing", "bfd"), ("txt_documents", "paragraphs"), ("packing", "")])
def test_packing_settings_are_checked(key, value) -> None:
    with pytest.raises(ValueError, match=key):
        PretrainConfig(data=["corpus.txt"], **{key: value})
