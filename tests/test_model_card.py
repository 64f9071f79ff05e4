"""The stage folders' model cards (`rlhf.model_card`): Hugging Face metadata that parses back, lineage
through the stages, determinism, and a finished tiny run whose every folder has one."""

from __future__ import annotations

import shlex

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from pipeline_helpers import clone, run
from rlhf.artifacts import MODEL_CARD, read_manifest
from rlhf.model_card import command_line, render_card

PIPELINE = "pipelines/demo.yaml"


def manifest(stage: str, upstream: tuple[str, ...] = (), **extra) -> dict:
    """A manifest as `run_pipeline` hands it to `finish_stage` (before `write_manifest` completes it)."""
    return {
        "stage": stage, "fingerprint": "f" * 64, "config": {"lr": 1e-3, "betas": (0.9, 0.95)}, "seed": 7,
        "inputs": {f"data/{stage}.jsonl": "a" * 64}, "upstream": {parent: "b" * 64 for parent in upstream},
        "started": "2026-01-01T00:00:00+00:00", "seconds": 12.3, "metrics": {}, "pipeline": PIPELINE, **extra,
    }  # fmt: skip


def card_data(stage: str, record: dict) -> dict:
    return ModelCard(render_card(stage, record, "rlhf run pipelines/demo.yaml")).data.to_dict()


@pytest.mark.parametrize(
    "stage, upstream, base",
    [("sft", ("pretrain",), "pretrain"), ("reward", ("sft",), "sft"), ("dpo", ("sft",), "sft"),
     ("ppo", ("sft", "reward"), "sft"), ("ppo", ("reward", "sft"), "sft"), ("grpo", ("sft", "reward"), "sft")],
)  # fmt: skip
def test_base_model_is_the_upstream_policy_the_stage_started_from(stage, upstream, base) -> None:
    data = card_data(stage, manifest(stage, upstream))
    assert data["base_model"] == base
    assert data["library_name"] == "transformers"
    assert data["tags"][:2] == ["rlhf", stage]
    validate_repo_id(data["base_model"])  # a well-formed hub id, which a path like ../sft is not


def test_an_init_folder_is_the_base_model_and_not_a_dataset() -> None:
    record = manifest("sft", config={"init": "models/gpt2"}, inputs={"data/sft.jsonl": "a", "models/gpt2": "b"})
    data = card_data("sft", record)
    assert data["base_model"] == "models/gpt2"
    assert data["datasets"] == ["sft.jsonl"]


def test_tokenizer_and_pretrain_have_no_base_model() -> None:
    tokenizer = card_data("tokenizer", manifest("tokenizer"))
    pretrain = card_data("pretrain", manifest("pretrain", ("tokenizer",)))
    assert "base_model" not in tokenizer and "base_model" not in pretrain
    assert tokenizer["library_name"] == pretrain["library_name"] == "transformers"
    assert tokenizer["tags"] == ["rlhf", "tokenizer"] and pretrain["tags"] == ["rlhf", "pretrain", "text-generation"]


def test_report_is_not_a_model() -> None:
    data = card_data("report", manifest("report", ("sft", "ppo", "reward"), metrics={"ppo_judge": 0.8, "sft_win_rate": 0.4}))
    assert "library_name" not in data and "base_model" not in data
    assert data["metrics"] == ["ppo_judge"], "the report's headline: each policy's judge score"


def test_reward_is_tagged_as_a_reward_model() -> None:
    assert {"reward-model", "text-classification"} <= set(card_data("reward", manifest("reward", ("sft",)))["tags"])


def test_card_body_holds_headline_metrics_config_and_command() -> None:
    record = manifest("sft", ("pretrain",), metrics={"eval_loss": 1.2345678, "steps": 3, "train_runtime": 9.9})
    text = render_card("sft", record, "rlhf run pipelines/demo.yaml --only sft")
    data = ModelCard(text).data.to_dict()
    assert data["metrics"] == ["eval_loss", "steps"]  # headline metrics only, in the registry's order
    assert data["datasets"] == ["sft.jsonl"]
    assert "| eval_loss | 1.235 |" in text and "| steps | 3 |" in text and "train_runtime" not in text
    assert "lr: 0.001\nbetas:\n- 0.9\n- 0.95\n" in text
    assert "```bash\nrlhf run pipelines/demo.yaml --only sft\n```" in text


def test_card_is_deterministic_without_times() -> None:
    record = manifest("ppo", ("sft", "reward"), metrics={"eval_kl": 0.1})
    later = {**record, "started": "2026-06-01T12:00:00+00:00", "seconds": 99.0}
    assert render_card("ppo", record, "rlhf run x") == render_card("ppo", later, "rlhf run x")
    assert "2026" not in render_card("ppo", record, "rlhf run x")


@pytest.mark.parametrize(
    "argv, expected",
    [(["/venv/bin/rlhf", "run", "my pipe.yaml", "--from", "sft"], "rlhf run 'my pipe.yaml' --from sft"),
     (["/src/rlhf/__main__.py", "run", "p.yaml"], "rlhf run p.yaml"),
     (["/venv/bin/pytest", "-q"], "rlhf run pipelines/demo.yaml --only ppo")],
)  # fmt: skip
def test_command_line(argv, expected) -> None:
    assert command_line(PIPELINE, "ppo", argv) == expected
    assert shlex.split(expected)[0] == "rlhf"


def test_every_stage_of_a_finished_run_has_a_card_with_its_lineage(tiny_rlhf) -> None:
    chain = {"tokenizer": None, "pretrain": None, "sft": "pretrain", "reward": "sft", "ppo": "sft", "report": None}
    for stage, base in chain.items():
        text = (tiny_rlhf.run_dir / stage / MODEL_CARD).read_text(encoding="utf-8")
        data = ModelCard(text).data.to_dict()
        assert data.get("base_model") == base, stage
        assert data.get("library_name") == (None if stage == "report" else "transformers"), stage
        assert f"rlhf run {tiny_rlhf.pipeline} --only {stage}" in text
        assert MODEL_CARD not in read_manifest(tiny_rlhf.run_dir / stage)["outputs"]


def test_editing_a_card_leaves_the_stage_up_to_date(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    card = run_dir / "sft" / MODEL_CARD
    card.write_text(card.read_text(encoding="utf-8") + "\nEdited by hand.\n", encoding="utf-8")
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir)
    assert code == 0, err
    assert "[sft] up to date" in out and "running" not in out
    assert card.read_text(encoding="utf-8").endswith("Edited by hand.\n")
