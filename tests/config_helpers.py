"""Helpers shared by the tests of pipeline YAML parsing (tests/test_config*.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rlhf.config import load_pipeline
from rlhf.errors import ConfigError

MINIMAL = """
run_dir: runs/x
seed: 3
stages:
  tokenizer: {data: [corpus.txt], vocab_size: 300}
  pretrain:
    data: [corpus.txt]
    model: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}
    max_steps: 10
  sft: {data: sft.jsonl, lr: 1.0e-3}
"""


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"errors are one line: {message!r}"
    return message
