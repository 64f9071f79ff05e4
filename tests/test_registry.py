"""The stage registry (`rlhf.stages`): every registered stage is complete (config class, recipe module with
the four functions); the run order is derived from what each stage reads, whatever order the YAML lists
them in; a cycle is a ConfigError; `stage: false` drops an inherited stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf.config import build, load_pipeline
from rlhf.errors import ConfigError
from rlhf.stages import POLICY_STAGES, STAGES, headline_metrics, stage_module, stage_order

from pipeline_helpers import run, write_tiny_rlhf, write_yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("name", STAGES)
def test_every_registered_stage_has_a_recipe_and_a_config(name) -> None:
    module = stage_module(name)
    for function in ("upstream", "inputs", "read_inputs", "run"):
        assert callable(getattr(module, function, None)), f"{STAGES[name].module} has no {function}()"
    try:
        config = build(STAGES[name].config, {}, f"stages.{name}")
    except ConfigError:
        return  # a required setting (a data file): fine, said in the stage's terms
    assert all(parent in STAGES for parent in module.upstream(config)), "upstream names registered stages"


def test_policy_stages_are_the_registered_policies() -> None:
    assert set(POLICY_STAGES) == {"pretrain", "sft", "dpo", "ppo", "grpo", "rloo", "reinforce_pp"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_pipelines_run_in_registry_order(path: Path) -> None:
    config = load_pipeline(path)
    assert stage_order(config) == [name for name in STAGES if name in config.stages]


def scrambled(tmp_path: Path, **changes) -> Path:
    """The tiny RLHF pipeline with its stages listed in reverse order (plus `changes` to the stages)."""
    tree = yaml.safe_load(write_tiny_rlhf(tmp_path).read_text())
    tree["stages"] = {**dict(reversed(tree["stages"].items())), **changes}
    return write_yaml(tmp_path / "scrambled.yaml", tree)


def test_a_scrambled_pipeline_runs_its_stages_in_dependency_order(tmp_path, capsys, monkeypatch) -> None:
    """Every recipe replaced by one that checks its upstream stages are complete: the run goes through the
    real pipeline (checks, manifests, swaps) in the derived order."""
    pipeline = scrambled(tmp_path)
    assert list(load_pipeline(pipeline).stages)[0] == "report", "the file lists report first"
    ran = []

    def stand_in(ctx):
        for parent in stage_module(ctx.name).upstream(ctx.config):
            ctx.upstream(parent)  # raises unless the parent completed before
        (ctx.begin() / "done.txt").write_text(ctx.name)
        ran.append(ctx.name)
        return {}

    for name in STAGES:
        monkeypatch.setattr(stage_module(name), "run", stand_in)
    code, out, err = run(capsys, pipeline)
    assert code == 0, err
    assert ran == [name for name in STAGES if name in load_pipeline(pipeline).stages], out


def test_a_cycle_is_a_config_error_naming_its_stages(tmp_path, monkeypatch) -> None:
    config = load_pipeline(write_tiny_rlhf(tmp_path))
    monkeypatch.setattr(stage_module("tokenizer"), "upstream", lambda config: ("sft",))
    with pytest.raises(ConfigError, match=r"stages: tokenizer -> sft -> pretrain -> tokenizer: each reads the next, in a cycle"):
        stage_order(config)


def test_false_drops_an_inherited_stage(tmp_path, capsys) -> None:
    write_tiny_rlhf(tmp_path, report=False)
    child = write_yaml(tmp_path / "no_ppo.yaml", {"extends": "tiny_rlhf.yaml", "stages": {"ppo": False, "report": False}})
    config = load_pipeline(child)
    assert list(config.stages) == ["tokenizer", "pretrain", "sft", "reward"], "report: false, never inherited, is just absent"
    code, out, err = run(capsys, child, "--dry-run")
    assert code == 0, err
    plan = out.split("\nplan for ", 1)[1].split("\n\n", 1)[0]
    assert [line.strip().split(":")[0] for line in plan.splitlines()[1:]] == ["tokenizer", "pretrain", "sft", "reward"]
    assert "ppo" not in out.split("\nresolved config:", 1)[1].split("\nplan for ", 1)[0]


@pytest.mark.parametrize("value", [True, 0, "off", []])
def test_a_stage_that_is_neither_a_mapping_nor_false_is_an_error(tmp_path, value) -> None:
    write_tiny_rlhf(tmp_path)
    child = write_yaml(tmp_path / "child.yaml", {"extends": "tiny_rlhf.yaml", "stages": {"ppo": value}})
    with pytest.raises(ConfigError, match=r"stages\.ppo: expected a mapping"):
        load_pipeline(child)


def test_false_for_an_unknown_stage_is_still_an_unknown_stage(tmp_path) -> None:
    pipeline = write_yaml(tmp_path / "p.yaml", {"stages": {"tokenizer": {"data": ["a.txt"]}, "ppoo": False}})
    with pytest.raises(ConfigError, match=r"stages\.ppoo: unknown stage \(did you mean 'ppo'\?\)"):
        load_pipeline(pipeline)


def test_the_report_compares_policy_stages_of_the_registry(tmp_path) -> None:
    pipeline = write_yaml(tmp_path / "p.yaml", {"stages": {"report": {"eval_prompts": "e.jsonl", "policies": ["sft", "reward"]}}})
    with pytest.raises(ConfigError, match=f"'reward' is not a policy stage \\({', '.join(POLICY_STAGES)}\\)"):
        load_pipeline(pipeline)


def test_headline_metrics_keep_the_registry_order_and_drop_what_is_missing() -> None:
    metrics = {"steps": 7, "eval_accuracy": 0.9, "eval_loss": None, "train_seconds": 3.0}
    assert list(headline_metrics("sft", metrics)) == ["eval_accuracy", "steps"]
    assert headline_metrics("ppo", None) == {}
    report = {"sft_judge": 0.7, "ppo_win_rate": 0.6, "ppo_kl": 0.3}
    assert headline_metrics("report", report) == {"sft_judge": 0.7}

