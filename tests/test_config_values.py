"""Every number in a pipeline is finite and in range when the config is built, generated over every
numeric field of every stage config (nested settings included) rather than listed by hand; and the
plug-ins ('module:function' judges and reward functions) are called once on a sample when loaded."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.config import MAX_FLOAT, MAX_INT, PipelineConfig, load_pipeline
from rlhf.errors import ConfigError
from rlhf.responses import load_function
from rlhf.stages import STAGES

REQUIRED = {
    "tokenizer": {"data": ["a.txt"]}, "pretrain": {"data": ["a.txt"]}, "sft": {"data": "a.jsonl"},
    "reward": {"data": "a.jsonl"}, "dpo": {"data": "a.jsonl"}, "ppo": {"prompts": "p.jsonl"},
    "grpo": {"prompts": "p.jsonl"}, "rloo": {"prompts": "p.jsonl"}, "reinforce_pp": {"prompts": "p.jsonl"}, "report": {"eval_prompts": "e.jsonl"},
}  # fmt: skip
"""The least each stage needs to build: a numeric field set on top of it is the only thing wrong."""


def _plain(hint: typing.Any) -> typing.Any:
    """`LoraSettings | None` -> LoraSettings; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [option for option in typing.get_args(hint) if option is not type(None)]
    return hint


def numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, int or float) of every numeric field of `cls`, nested dataclasses and list[int] included."""
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        hint = _plain(hint)
        if dataclasses.is_dataclass(hint):
            found += numeric_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float):
            found.append((f"{prefix}{name}[0]", typing.get_args(hint)[0]))
        elif hint in (int, float):
            found.append((f"{prefix}{name}", hint))
    return found


FIELDS = [(f"stages.{stage}.{key}", kind) for stage, registered in STAGES.items() for key, kind in numeric_fields(registered.config)]
FIELDS += [(key, kind) for key, kind in numeric_fields(PipelineConfig)]


def pipeline_with(tmp_path: Path, key: str, value: typing.Any) -> Path:
    """A pipeline of the stage that `key` belongs to (or of the tokenizer), with `key` set to `value`."""
    parts = key.replace("[0]", "").split(".")
    stage = parts[1] if parts[0] == "stages" else "tokenizer"
    tree = {"run_dir": str(tmp_path / "run"), "stages": {stage: dict(REQUIRED[stage])}}
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = [value] if key.endswith("[0]") else value
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_generated_fields_reach_into_nested_settings() -> None:
    keys = {key for key, _ in FIELDS}
    assert {"stages.sft.lr", "stages.pretrain.model.dropout", "stages.ppo.lora.dropout", "stages.report.best_of[0]", "seed"} <= keys
    assert len(keys) > 60


BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge-float": 1e300, "huge-int": 10**30,
              "string": "four", "list": [1], "bool": True,
              # YAML reads these spellings (and command-line overrides give them) as strings that parse as floats
              "inf-text": "inf", "nan-text": "nan", "huge-text": "1e300"}  # fmt: skip


@pytest.mark.parametrize("key, kind", FIELDS, ids=[key for key, _ in FIELDS])
def test_every_numeric_field_refuses_non_finite_huge_and_wrong_type(tmp_path, key, kind) -> None:
    for name, value in BAD_VALUES.items():
        message = config_error(pipeline_with(tmp_path, key, value))
        assert f"{tmp_path / 'pipe.yaml'}: {key}: " in message, f"{name}: {message}"


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("stages.ppo.vf_coef", -5, "must be >= 0"),
        ("stages.sft.lora.dropout", 5, "must be in [0, 1)"),
        ("stages.sft.lora.dropout", 1, "must be in [0, 1)"),
        ("stages.ppo.lora.alpha", 0, "must be positive"),
        ("stages.sft.lora.target_modules", ["attn"], "'attn' matches no layer (the model has c_attn, c_proj, c_fc)"),
        ("stages.sft.lora.target_modules", [], "name at least one layer"),
        ("stages.reward.norm_max_new_tokens", 0, "must be positive"),
        ("stages.sft.max_new_tokens", 0, "must be positive"),
        ("stages.tokenizer.vocab_size", 2_000_000, "must be in [261, 1000000]"),
        ("stages.tokenizer.exclude_last_rows", -1, "must be >= 0"),
        ("seed", 2**64, "out of range"),
        ("seed", -1, "must be >= 0"),
        ("run_dir", "", "give a directory"),
        ("run_dir", "  ", "give a directory"),
    ],
)
def test_field_ranges_name_the_key(tmp_path, key, value, words) -> None:
    message = config_error(pipeline_with(tmp_path, key, value))
    assert f": {key}: " in message and words in message, message


def _hypothesis(test):
    return settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])(test)


@_hypothesis
@given(field=st.sampled_from([key for key, kind in FIELDS if kind is float]), value=st.floats())
def test_any_float_builds_finite_or_is_refused_naming_the_key(tmp_path, field, value) -> None:
    path = pipeline_with(tmp_path, field, value)
    try:
        load_pipeline(path)
    except ConfigError as error:
        assert f"{path}: {field}" in str(error) or f"{path}: stages." in str(error), str(error)
        assert not (math.isfinite(value) and abs(value) <= MAX_FLOAT) or "out of range" not in str(error)
    else:
        assert math.isfinite(value) and abs(value) <= MAX_FLOAT


@_hypothesis
@given(field=st.sampled_from([key for key, kind in FIELDS if kind is int]), value=st.integers(-(2**70), 2**70))
def test_any_integer_builds_in_range_or_is_refused_naming_the_key(tmp_path, field, value) -> None:
    path = pipeline_with(tmp_path, field, value)
    try:
        load_pipeline(path)
    except ConfigError as error:
        assert f"{path}: {field}" in str(error) or f"{path}: stages." in str(error), str(error)
    else:
        assert abs(value) <= MAX_INT


# ----------------------------------------------------------------------------- the pipeline file itself


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "the pipeline file is empty"),
        ("seed: 0\n", "stages: no stage to run"),
        ("stages: {}\n", "stages: no stage to run"),
        ("stages: []\n", "stages: no stage to run"),
        ("stages: [sft]\n", "stages: expected a mapping"),
        ("seed: 0\nstages:\n  sft: {data: a.jsonl}\nseed: 1\n", "line 4: key 'seed' is given twice"),
        ("stages:\n  sft:\n    data: a.jsonl\n    lr: 0.1\n    lr: 0.2\n", "line 5: key 'lr' is given twice"),
    ],
)
def test_silent_pipeline_files_are_errors(tmp_path, text, words) -> None:
    path = tmp_path / "pipe.yaml"
    path.write_text(text, encoding="utf-8")
    message = config_error(path)
    assert message.startswith(f"{path}: ") and words in message, message


def test_a_merged_key_may_be_overridden(tmp_path) -> None:
    path = tmp_path / "pipe.yaml"
    path.write_text("common: &common {lr: 0.1, data: a.jsonl}\nstages:\n  sft: {<<: *common, lr: 0.2}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="common: unknown key"):  # the loader got past the merge
        load_pipeline(path)


def test_empty_run_dir_flag_is_an_error(tmp_path) -> None:
    path = pipeline_with(tmp_path, "seed", 0)
    with pytest.raises(ConfigError, match="--run-dir: give a directory"):
        load_pipeline(path, run_dir="")


def test_an_error_about_an_overridden_key_names_the_override(tmp_path) -> None:
    path = pipeline_with(tmp_path, "stages.sft.lr", 0.1)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, ["stages.sft.lr=.inf"])
    assert str(info.value).startswith("override 'stages.sft.lr=.inf': stages.sft.lr: inf is out of range")
    with pytest.raises(ConfigError) as info:  # the file's own mistake still names the file
        load_pipeline(pipeline_with(tmp_path, "stages.sft.lr", -1.0), ["stages.sft.batch_size=4"])
    assert str(info.value).startswith(f"{path}: stages.sft.lr: must be positive")


# ----------------------------------------------------------------------------- plug-ins


def good_judge(prompts, responses):
    return [0.5] * len(responses)


def one_argument(prompts):
    return [0.0] * len(prompts)


def too_few(prompts, responses):
    return [0.0]


def not_finite(prompts, responses):
    return [math.nan] * len(responses)


def strings(prompts, responses):
    return ["0.5"] * len(responses)


def raises(prompts, responses):
    raise KeyError("score")


PROMPTS = ["What is 1 + 2?", [{"role": "user", "content": "Name two fruits."}], "Third?"]


def test_a_fitting_plug_in_loads() -> None:
    assert load_function(f"{__name__}:good_judge", "judge", probe=PROMPTS) is good_judge


@pytest.mark.parametrize(
    "name, words",
    [
        ("one_argument", "failed when called with 2 prompts and 2 responses (TypeError"),
        ("too_few", "returned 1 scores for 2 responses"),
        ("not_finite", "returned a NaN or infinite score"),
        ("strings", "must return a list of numbers"),
        ("raises", "failed when called with 2 prompts and 2 responses (KeyError"),
    ],
)
def test_a_plug_in_that_does_not_fit_is_refused_when_loaded(name, words) -> None:
    reference = f"{__name__}:{name}"
    with pytest.raises(ConfigError) as info:
        load_function(reference, "reward_functions[0]", probe=PROMPTS)
    assert str(info.value).startswith(f"reward_functions[0]: {reference!r}: ") and words in str(info.value), str(info.value)
