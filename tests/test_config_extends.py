"""`extends:` in pipeline YAMLs: a file starts from another (path relative to itself), nested
mappings merge key by key, anything else replaces; cycles are ConfigErrors."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from rlhf.config import deep_merge, load_pipeline, read_tree
from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BASE = """
run_dir: runs/base
seed: 3
stages:
  tokenizer: {data: [corpus.txt], vocab_size: 300}
  pretrain:
    data: [corpus.txt]
    model: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}
    max_steps: 10
    lr: 1.0e-3
  sft: {data: sft.jsonl, lr: 1.0e-3}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [1, 2], "c": 1}
    changes = {"a": {"y": {"q": 3}, "z": 4}, "b": [3], "c": {"now": "a mapping"}}
    merged = deep_merge(base, changes)
    assert merged == {"a": {"x": 1, "y": {"p": 1, "q": 3}, "z": 4}, "b": [3], "c": {"now": "a mapping"}}
    assert base == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [1, 2], "c": 1}, "the inputs are not modified"


def test_child_overrides_a_nested_key_and_keeps_its_siblings(tmp_path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", """
        extends: base.yaml
        run_dir: runs/child
        stages:
          pretrain:
            model: {n_layer: 1}
            lr: 5.0e-4
          sft: {max_steps: 2}
    """)  # fmt: skip
    config, base = load_pipeline(child), load_pipeline(tmp_path / "base.yaml")
    assert config.run_dir == "runs/child" and config.seed == 3, "top-level keys: child wins, others inherited"
    assert list(config.stages) == ["tokenizer", "pretrain", "sft"]
    pretrain = config.stages["pretrain"]
    assert pretrain.model.n_layer == 1
    assert (pretrain.model.n_head, pretrain.model.n_embd, pretrain.model.n_positions) == (2, 32, 64), "siblings kept"
    assert pretrain.lr == pytest.approx(5e-4) and pretrain.max_steps == 10 and pretrain.data == ["corpus.txt"]
    assert config.stages["sft"].max_steps == 2 and config.stages["sft"].data == "sft.jsonl"
    assert config.stages["tokenizer"] == base.stages["tokenizer"]
    assert config.source == str(child)
    assert "extends" not in read_tree(child)


def test_chain_of_three_and_path_relative_to_the_extending_file(tmp_path) -> None:
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "sub/middle.yaml", "extends: ../base.yaml\nstages: {pretrain: {max_steps: 4}, sft: {lr: 2.0e-3}}\n")
    leaf = write(tmp_path, "sub/deeper/leaf.yaml", "extends: ../middle.yaml\nstages: {sft: {lr: 3.0e-3}}\n")
    config = load_pipeline(leaf)
    assert config.stages["pretrain"].max_steps == 4 and config.stages["sft"].lr == pytest.approx(3e-3)
    assert config.run_dir == "runs/base"


def test_overrides_apply_after_extends(tmp_path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nstages: {sft: {lr: 2.0e-3}}\n")
    config = load_pipeline(child, ["stages.sft.lr=4e-3", "stages.pretrain.model.n_layer=3"])
    assert config.stages["sft"].lr == pytest.approx(4e-3)
    assert config.stages["pretrain"].model.n_layer == 3 and config.stages["pretrain"].model.n_embd == 32


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "\n" not in message, f"errors are one line: {message!r}"
    return message


def test_file_extending_itself(tmp_path) -> None:
    path = write(tmp_path, "self.yaml", "extends: self.yaml\nseed: 1\n")
    message = config_error(path)
    assert "self.yaml" in message and "includes itself" in message


def test_cycle_through_other_files(tmp_path) -> None:
    write(tmp_path, "a.yaml", "extends: b.yaml\nseed: 1\n")
    write(tmp_path, "b.yaml", "extends: sub/c.yaml\nseed: 2\n")
    write(tmp_path, "sub/c.yaml", "extends: ../a.yaml\nseed: 3\n")
    message = config_error(tmp_path / "a.yaml")
    assert "includes itself" in message and "a.yaml" in message


def test_missing_or_malformed_parent(tmp_path) -> None:
    child = write(tmp_path, "child.yaml", "extends: nope.yaml\n")
    assert "nope.yaml" in config_error(child) and "not found" in config_error(child)
    child = write(tmp_path, "child2.yaml", "extends: [base.yaml]\n")
    assert "extends" in config_error(child)
    write(tmp_path, "broken.yaml", "stages: [\n")
    child = write(tmp_path, "child3.yaml", "extends: broken.yaml\n")
    assert "broken.yaml" in config_error(child)


def test_demo_no_kl_is_the_demo_without_kl() -> None:
    demo, no_kl = load_pipeline(ROOT / "pipelines" / "demo.yaml"), load_pipeline(ROOT / "pipelines" / "demo_no_kl.yaml")
    assert no_kl.run_dir == "runs/demo_no_kl" and no_kl.seed == demo.seed
    assert list(no_kl.stages) == list(demo.stages) == ["tokenizer", "pretrain", "sft", "reward", "ppo", "report"]
    ppo = no_kl.stages["ppo"]
    assert ppo.kl_coef == 0.0 and ppo.kl_target == 0.0
    for name in ("tokenizer", "pretrain", "sft", "reward", "report"):
        assert no_kl.stages[name] == demo.stages[name], f"stage {name} is the demo's"
    changed = {f.name for f in dataclasses.fields(ppo) if getattr(ppo, f.name) != getattr(demo.stages["ppo"], f.name)}
    assert changed == {"kl_coef", "kl_target"}, "only the KL settings differ from the demo's PPO stage"


def test_demo_gold_reward_is_the_demo_rewarded_by_the_gold_judge_alone() -> None:
    demo, gold = load_pipeline(ROOT / "pipelines" / "demo.yaml"), load_pipeline(ROOT / "pipelines" / "demo_gold_reward.yaml")
    assert gold.run_dir == "runs/demo_gold_reward" and gold.seed == demo.seed
    assert list(gold.stages) == list(demo.stages)
    ppo = gold.stages["ppo"]
    assert ppo.reward_model_weight == 0.0 and ppo.reward_functions == ["rlhf.demo_task:gold_judge"]
    for name in ("tokenizer", "pretrain", "sft", "reward", "report"):
        assert gold.stages[name] == demo.stages[name], f"stage {name} is the demo's"
    changed = {f.name for f in dataclasses.fields(ppo) if getattr(ppo, f.name) != getattr(demo.stages["ppo"], f.name)}
    assert changed == {"reward_model_weight", "reward_functions"}, "only PPO's reward differs from the demo's"
