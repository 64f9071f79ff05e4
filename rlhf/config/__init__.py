"""Typed configuration: one dataclass per stage, parsed from a pipeline YAML.

A pipeline file looks like:

    run_dir: runs/demo          # where every stage writes (overridable with --run-dir)
    seed: 0
    stages:
      tokenizer: {data: [data_samples/corpus.txt], vocab_size: 2048}
      pretrain: {data: [data_samples/corpus.txt], model: {n_layer: 4}, max_steps: 300}
      sft: {data: data_samples/sft.jsonl, lr: 1e-3}

The stages a pipeline may name, and the config class each parses into, are those of the registry
`rlhf.stages.STAGES`; a stage absent from `stages` is not run. They run in an order derived from what
each reads (`rlhf.stages.stage_order`), not in the order the file lists them. A pipeline that
`extends:` another drops a stage it inherits by setting it to `false`:

    extends: demo.yaml
    stages: {ppo: false}        # demo's stages without PPO (`false` for a stage not inherited: no effect)

Every
field is documented once, below its declaration. Unknown keys, keys given twice, wrong types and invalid
values are `ConfigError`s naming the file (or the override) and the key. Every number is checked as it
is read, for every field at once (`_convert`: finite, at most MAX_INT or MAX_FLOAT in magnitude), then
against its own range in its dataclass's `__post_init__`. Relative paths resolve against the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.data import decode_utf8
from rlhf.errors import ConfigError

from rlhf.config.base import (  # noqa: F401  (the settings every stage shares)
    LAYOUTS, LORA_TARGETS, LR_SCHEDULES, MAX_FLOAT, MAX_INT, MAX_VOCAB, NOT_FINGERPRINTED, OMIT_DEFAULT, TRACKERS, LoraSettings, ModelShape, OptimizationConfig, TrainingConfig, _check, check_trackers,
)
from rlhf.config.dpo import DPO_LOSS_TYPES, DPOStageConfig  # noqa: F401
from rlhf.config.rl import CriticFreeConfig, GRPOConfig, PPOConfig, ReinforcePPConfig, RLConfig, RLOOConfig  # noqa: F401
from rlhf.config.stages import (  # noqa: F401
    PACKINGS, REWARD_INIT_STAGES, SFT_INIT_STAGES, TXT_DOCUMENTS, PretrainConfig, ReportConfig, RewardConfig, SFTConfig,
    TokenizerConfig,
)


@dataclass
class PipelineConfig:
    run_dir: str = "runs/demo"
    """Artifact directory shared by all stages."""
    seed: int = 0
    """Seed for every stage (data order, initialisation, sampling)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers for every training stage that does not name its own `report_to`."""
    stages: dict[str, Any] = field(default_factory=dict)
    """Stage name -> its config (the class `rlhf.stages.STAGES` registers for it); see `rlhf.stages.stage_order`
    for the order they run in."""
    source: str = ""
    """The YAML file this came from (set by the loader, not by the file)."""

    def __post_init__(self):
        _check(self.run_dir.strip() != "", "run_dir: give a directory (an empty one would write into the current directory)")
        _check(self.seed >= 0, f"seed: must be >= 0, got {self.seed}")
        check_trackers(self.report_to)


# ----------------------------------------------------------------------------- parsing


def _join(where: str, key: Any) -> str:
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and inner is str:
            value = [value]  # a single file where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{where}: {value} is out of range (at most {MAX_INT} in magnitude)")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string, and so are overrides; range-checked below
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value) or abs(value) > MAX_FLOAT:
            raise ConfigError(f"{where}: {value!r} is out of range (a finite number at most {MAX_FLOAT:g} in magnitude)")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    return value


def build(cls: type, data: Any, where: str):
    """Instantiate dataclass `cls` from a mapping; `where` prefixes every error ('file: key.path')."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    kwargs = {key: _convert(hints[key], value, _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:
        # "lr: must be positive" from __post_init__ becomes "file: stages.sft.lr: must be positive"
        key, sep, problem = str(error).partition(": ")
        if sep and key in known:
            raise ConfigError(f"{_join(where, key)}: {problem}") from None
        raise ConfigError(f"{where}: {error}") from None


def apply_override(tree: dict, assignment: str, source: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML) inside the nested mapping `tree`."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected key.path=value")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a mapping in {source}")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML") from None


def deep_merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the plain loader keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base loader says so
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in the same mapping")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_tree(path: Path, seen: tuple = ()) -> dict:
    """A pipeline YAML as a mapping; `extends: other.yaml` (relative to this file) starts from another."""
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        tree = yaml.load(decode_utf8(path.read_bytes(), path, ConfigError), Loader=UniqueKeyLoader)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: {where}not valid YAML: {problem}") from None
    if tree is None:
        raise ConfigError(f"{path}: the pipeline file is empty; give at least `stages:`")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file name")
    parent_path = path.parent / parent
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path}: extends: {parent} includes itself")
    return deep_merge(read_tree(parent_path, seen + (path.resolve(),)), tree)


def load_pipeline(path: str | Path, overrides: list[str] = (), run_dir: str | None = None) -> PipelineConfig:
    """Parse a pipeline YAML (plus `key.path=value` overrides) into typed configs."""
    path = Path(path)
    tree = read_tree(path)
    for assignment in overrides:
        apply_override(tree, assignment, str(path))
    try:
        config = build_pipeline(tree, path)
    except ConfigError as error:
        raise blame_override(error, path, overrides) from None
    if run_dir is not None:
        if not run_dir.strip():
            raise ConfigError("--run-dir: give a directory (an empty one would write into the current directory)")
        config.run_dir = run_dir
    return config


def build_pipeline(tree: dict, path: Path) -> PipelineConfig:
    from rlhf.stages import STAGES  # the registry imports the config classes: imported here, not at the top

    stages_tree = tree.pop("stages", None)
    if stages_tree and not isinstance(stages_tree, dict):
        raise ConfigError(f"{path}: stages: expected a mapping of stage name to settings")
    for name in stages_tree or {}:
        if name not in STAGES:
            close = difflib.get_close_matches(str(name), list(STAGES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(STAGES)})"
            raise ConfigError(f"{path}: stages.{name}: unknown stage{hint}")
    # `ppo: false` drops a stage (one inherited through `extends:`, or none: then it was absent anyway)
    kept = {name: settings for name, settings in (stages_tree or {}).items() if settings is not False}
    if not kept:  # absent, empty, {} / [] or every stage dropped: a run that would do nothing
        raise ConfigError(f"{path}: stages: no stage to run; name at least one of {', '.join(STAGES)}")
    config = build(PipelineConfig, tree, str(path) + ":")
    for name, settings in kept.items():
        has_trackers = "report_to" in {spec.name for spec in dataclasses.fields(STAGES[name].config)}
        if config.report_to and has_trackers and (settings is None or (isinstance(settings, dict) and "report_to" not in settings)):
            settings = {**(settings or {}), "report_to": list(config.report_to)}  # the pipeline's default
        config.stages[name] = build(STAGES[name].config, settings, f"{path}: stages.{name}")
    config.source = str(path)
    return config


def blame_override(error: ConfigError, path: Path, overrides: list[str]) -> ConfigError:
    """An error about a key that a command-line override set names the override, not the YAML file."""
    prefix = f"{path}: "
    message = str(error)
    if not message.startswith(prefix):
        return error
    problem = message[len(prefix) :]
    blamed = re.match(r"[\w.\[\]]+", problem)  # the key path the error names: stages.sft.lr, stages.sfft
    for assignment in reversed(overrides):  # the last override of a key is the one that counts
        key = assignment.partition("=")[0]
        if blamed and (key == blamed[0] or key.startswith(blamed[0] + ".") or blamed[0].startswith(key + ".")):
            return ConfigError(f"override {assignment!r}: {problem}")
    return error


def stage_config_dict(stage_config: Any) -> dict:
    """A stage config as plain data (the resolved config that `rlhf run --dry-run` prints)."""
    return dataclasses.asdict(stage_config)


def fingerprinted_config(stage_config: Any) -> dict:
    """A stage config as its manifest records it and its fingerprint hashes: `stage_config_dict` less each
    field added after runs were recorded (metadata `OMIT_DEFAULT`, at any depth) that holds its default,
    so that those runs stay up to date and a value other than the default still changes the fingerprint,
    and less each setting of where results are reported (metadata `NOT_FINGERPRINTED`)."""
    return _without_new_defaults(stage_config, stage_config_dict(stage_config))


def _without_new_defaults(config: Any, data: dict) -> dict:
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if spec.metadata.get(NOT_FINGERPRINTED) or (spec.metadata.get(OMIT_DEFAULT) and value == spec.default):
            del data[spec.name]
        elif dataclasses.is_dataclass(value):
            data[spec.name] = _without_new_defaults(value, data[spec.name])
    return data
