"""Reading a pipeline YAML: syntax errors and non-UTF-8 files named with file and line, and `key.path=value`
overrides (parsed as YAML; a bad one named as the override, not the file)."""

from __future__ import annotations

import pytest

from rlhf.config import LoraSettings, apply_override, load_pipeline
from rlhf.errors import ConfigError

from config_helpers import MINIMAL, config_error, write


# ----------------------------------------------------------------------------- YAML syntax


@pytest.mark.parametrize("text", ["run_dir: x\nstages:\n  sft: {data: a\n  pretrain: 3\n", "run_dir: x\nseed: 0\n  stages: 1\n"])
def test_yaml_syntax_error_names_file(tmp_path, text) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert str(path) in message and "YAML" in message


def test_yaml_syntax_error_names_line(tmp_path) -> None:
    message = config_error(write(tmp_path, "run_dir: x\nseed: 0\n  stages: 1\n"))
    assert "line 3" in message


def test_non_utf8_yaml_names_file(tmp_path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run_dir: caf\xe9\n")
    assert str(path) in config_error(path)


# ----------------------------------------------------------------------------- overrides


def test_apply_override_parses_yaml_values_and_creates_keys() -> None:
    tree = {"stages": {"sft": {"lr": 1e-3}}}
    apply_override(tree, "stages.sft.lr=3e-4", "p.yaml")
    apply_override(tree, "stages.pretrain.model.n_layer=3", "p.yaml")  # creates pretrain and model
    apply_override(tree, "stages.tokenizer.data=[a.txt, b.txt]", "p.yaml")
    apply_override(tree, "seed=7", "p.yaml")
    apply_override(tree, "stages.sft.judge=mod:fn=x", "p.yaml")  # only the first '=' splits
    apply_override(tree, "stages.sft.eval_prompts=", "p.yaml")  # empty value: empty string
    assert tree == {
        "stages": {
            "sft": {"lr": "3e-4", "judge": "mod:fn=x", "eval_prompts": ""},
            "pretrain": {"model": {"n_layer": 3}},
            "tokenizer": {"data": ["a.txt", "b.txt"]},
        },
        "seed": 7,
    }


@pytest.mark.parametrize("assignment", ["stages.sft.lr", "=3", "", "stages.sft.lr.x=1"])
def test_bad_override_syntax(assignment) -> None:
    with pytest.raises(ConfigError) as info:
        apply_override({"stages": {"sft": {"lr": 1e-3}}}, assignment, "p.yaml")
    assert repr(assignment) in str(info.value)


def test_overrides_through_load_pipeline(tmp_path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_pipeline(
        path,
        ["stages.sft.lr=3e-4", "stages.pretrain.model.n_layer=3", "stages.sft.lora.r=4", "run_dir=elsewhere", "seed=11"],
    )
    assert config.stages["sft"].lr == pytest.approx(3e-4)
    assert config.stages["pretrain"].model.n_layer == 3
    assert config.stages["pretrain"].model.n_embd == 32, "a nested override keeps the mapping's other keys"
    assert config.stages["sft"].lora == LoraSettings(r=4)
    assert (config.run_dir, config.seed) == ("elsewhere", 11)
    # Overrides do not touch the file.
    assert load_pipeline(path).stages["sft"].lr == pytest.approx(1e-3)


def test_override_adds_a_stage(tmp_path) -> None:
    path = write(tmp_path, "stages:\n  tokenizer: {data: [a.txt]}\n")
    config = load_pipeline(path, ["stages.pretrain.data=[a.txt]", "stages.pretrain.max_steps=5"])
    assert list(config.stages) == ["tokenizer", "pretrain"] and config.stages["pretrain"].max_steps == 5


@pytest.mark.parametrize(
    "override, words",
    [
        ("stages.sft.lrr=1", ["stages.sft.lrr", "did you mean 'lr'"]),
        ("stages.sft.lr=-1", ["stages.sft.lr", "positive"]),
        ("stages.pretrain.max_steps=1e3", ["stages.pretrain.max_steps", "expected an integer"]),
        ("stages.sft.lr.peak=1", ["not a mapping"]),
        ("stages.sfft.lr=1", ["stages.sfft", "did you mean 'sft'"]),
    ],
)
def test_bad_override_value_names_the_override_and_key(tmp_path, override, words) -> None:
    path = write(tmp_path, MINIMAL)
    message = config_error(path, ["stages.sft.lr=2e-3", override])
    assert message.startswith(f"override {override!r}: "), message  # the override, not the YAML file, is wrong
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
