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


def test_new_shape_settings_at_their_defaults_leave_recorded_fingerprints_alone() -> None:
    """Runs recorded before the llama layout existed stay up to date; choosing it changes the fingerprint."""
    from rlhf.config import ModelShape, fingerprinted_config

    recorded = fingerprinted_config(PretrainConfig(data=["a.txt"]))
    assert {"layout", "n_kv_head", "rope_theta"}.isdisjoint(recorded["model"]) and "max_seconds" not in recorded
    llama = fingerprinted_config(PretrainConfig(data=["a.txt"], model=ModelShape(layout="llama", n_kv_head=2)))
    assert llama["model"]["layout"] == "llama" and llama["model"]["n_kv_head"] == 2


@pytest.mark.parametrize("changes, problem", [
    ({"layout": "mamba"}, "layout: must be one of gpt2, llama"),
    ({"layout": "llama", "n_kv_head": 3}, "n_kv_head: must divide n_head (4), got 3"),
    ({"n_kv_head": 2}, "n_kv_head: only the llama layout"),
    ({"layout": "llama", "rope_theta": 0.0}, "rope_theta: must be positive"),
    ({"activation": "relu"}, "activation: must be one of gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, got 'relu'"),
    ({"layout": "llama", "activation": "gelu"}, "activation: the llama layout's MLP is SwiGLU"),
])  # fmt: skip
def test_layout_settings_are_checked(changes, problem) -> None:
    from rlhf.config import ModelShape

    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        ModelShape(**changes)


@pytest.mark.slow
def test_pretraining_builds_the_llama_layout_and_sft_trains_it(tmp_path, capsys) -> None:
    import json

    from pipeline_helpers import run, write_tiny_rlhf

    pipeline = write_tiny_rlhf(tmp_path, report=False)
    code, out, err = run(capsys, pipeline, "--only", "tokenizer", "stages.pretrain.model.layout=llama",
                         "stages.pretrain.model.n_kv_head=1")  # fmt: skip
    assert code == 0, err[-2000:]
    for stage in ("pretrain", "sft"):
        code, out, err = run(capsys, pipeline, "--only", stage, "stages.pretrain.model.layout=llama", "stages.pretrain.model.n_kv_head=1")
        assert code == 0, err[-2000:]
    config = json.loads((tmp_path / "run" / "sft" / "config.json").read_text())
    assert (config["layout"], config["n_kv_head"], config["n_head"]) == ("llama", 1, 2)
