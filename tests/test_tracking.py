"""rlhf.tracking and `report_to`: the setting, the hyperparameters, and real TensorBoard and Trackio logs
read back (no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from rlhf import tracking
from rlhf.config import fingerprinted_config, load_pipeline
from rlhf.errors import ConfigError

from pipeline_helpers import clone, one_line_error, run, write_yaml


def test_hyperparameters_are_flat_and_of_types_every_tracker_takes() -> None:
    config = {"lr": 1e-3, "lora": {"r": 8, "target_modules": ["c_attn"]}, "judge": None, "compile": False}
    assert tracking.hyperparameters(config) == {"lr": 1e-3, "lora.r": 8, "lora.target_modules": "['c_attn']", "judge": "None",
                                                "compile": False}  # fmt: skip


def test_only_finite_numbers_are_logged_and_the_step_is_the_axis() -> None:
    row = {"step": 3, "time": 1.5, "loss": 0.5, "nan": math.nan, "flag": True, "name": "x", "episodes": 64}
    assert tracking.scalars(row) == {"loss": 0.5, "episodes": 64}


def test_a_tracker_that_is_not_installed_is_refused_naming_its_extra(monkeypatch) -> None:
    monkeypatch.setitem(tracking.PACKAGES, "wandb", "a_module_that_is_not_installed")
    with pytest.raises(ConfigError, match=r"p.yaml: stages.sft: report_to: wandb is not installed; .*pip install \"rlhf\[wandb\]\""):
        tracking.check_installed(["wandb"], "p.yaml: stages.sft")


def minimal_pipeline(tmp_path: Path, **top) -> Path:
    stages = {"tokenizer": {"data": ["c.txt"]}, "sft": {"data": "s.jsonl"}, "ppo": {"prompts": "p.jsonl", "report_to": []}}
    return write_yaml(tmp_path / "p.yaml", {**top, "stages": stages})


def test_a_pipelines_report_to_is_every_training_stages_unless_it_names_its_own(tmp_path) -> None:
    config = load_pipeline(minimal_pipeline(tmp_path, report_to="tensorboard"))
    assert config.stages["sft"].report_to == ["tensorboard"]
    assert config.stages["ppo"].report_to == []  # its own (none) wins
    assert not hasattr(config.stages["tokenizer"], "report_to")  # nothing to report
    overridden = load_pipeline(minimal_pipeline(tmp_path), ["stages.sft.report_to=[tensorboard, trackio]"])
    assert overridden.stages["sft"].report_to == ["tensorboard", "trackio"]


@pytest.mark.parametrize(
    "value, problem",
    [("tensorbord", "unknown tracker 'tensorbord'"), (["trackio", "trackio"], "a tracker is named twice"),
     (3, "expected a string")],
)  # fmt: skip
def test_a_bad_report_to_is_a_one_line_error_naming_the_key(tmp_path, value, problem) -> None:
    stages = {"sft": {"data": "s.jsonl", "report_to": value}}
    with pytest.raises(ConfigError, match=f"stages.sft.report_to.*{problem}"):
        load_pipeline(write_yaml(tmp_path / "p.yaml", {"stages": stages}))


def test_report_to_is_not_fingerprinted(tmp_path) -> None:
    quiet = load_pipeline(minimal_pipeline(tmp_path))
    tracked = load_pipeline(minimal_pipeline(tmp_path, report_to=["tensorboard", "trackio"]))
    assert fingerprinted_config(quiet.stages["sft"]) == fingerprinted_config(tracked.stages["sft"])


def scalar_steps(folder: Path) -> dict[str, list[int]]:
    """Tag -> logged steps of the TensorBoard event files directly in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_report_to_tensorboard_writes_every_training_stages_curves(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    tree = yaml.safe_load(Path(tiny_rlhf.pipeline).read_text(encoding="utf-8"))
    tree["run_dir"], tree["report_to"] = str(run_dir), "tensorboard"
    del tree["stages"]["report"]
    pipeline = write_yaml(tmp_path / "tracked.yaml", tree)
    code, out, err = run(capsys, pipeline, "--from", "pretrain")
    assert code == 0, err
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert f"[{stage}] curves to tensorboard (tensorboard --logdir {run_dir})" in out, stage
    for stage, tag, steps in [("pretrain", "loss", 4), ("sft", "loss", 3), ("reward", "loss", 3), ("ppo", "kl", 4)]:
        logged = scalar_steps(run_dir / stage / tracking.TENSORBOARD_DIR)
        assert logged[tag] == list(range(1, steps + 1)), (stage, logged.get(tag))
        # the resolved config went along as hyperparameters
        assert list((run_dir / stage / tracking.TENSORBOARD_DIR).rglob("hparams.yml")), stage
    hparams = next((run_dir / "ppo" / tracking.TENSORBOARD_DIR).rglob("hparams.yml")).read_text(encoding="utf-8")
    assert "kl_coef" in hparams and "stage: ppo" in hparams
    # the logs are not outputs: the manifest does not list them, and the next run skips every stage
    assert not any(name.startswith("tensorboard") for name in json.loads((run_dir / "ppo" / "manifest.json").read_text())["outputs"])
    code, out, _ = run(capsys, pipeline)
    assert code == 0 and out.count("up to date, skipped") == 5


@pytest.mark.slow
def test_report_to_trackio_logs_the_stage_to_its_local_store(tiny_sft, tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run_dir = clone(tiny_sft, tmp_path)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "sft", "--force", "stages.sft.report_to=trackio")
    assert code == 0, err
    assert "* Created new run" not in out and "Run finished" not in out  # trackio's banners stay off the console
    assert f"[sft] curves to trackio (trackio show --project {tracking.project_name(run_dir)})" in out

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(tracking.project_name(run_dir), "sft")
    steps = [row["step"] for row in logs if "loss" in row]
    assert steps and steps == sorted(steps)
    assert SQLiteStorage.get_run_config(tracking.project_name(run_dir), "sft")["lr"] == pytest.approx(1e-3)


def test_a_missing_tracker_stops_the_run_before_anything_is_written(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(tracking.PACKAGES, "mlflow", "a_module_that_is_not_installed")
    (tmp_path / "c.txt").write_text("some text\n" * 50, encoding="utf-8")
    pipeline = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "report_to": "mlflow",
                                                "stages": {"tokenizer": {"data": [str(tmp_path / "c.txt")]},
                                                           "pretrain": {"data": [str(tmp_path / "c.txt")]}}})  # fmt: skip
    code, _, err = run(capsys, pipeline)
    assert code == 2
    assert "stages.pretrain: report_to: mlflow is not installed" in one_line_error(err)
    assert not (tmp_path / "run").exists()
