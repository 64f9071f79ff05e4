"""`rlhf status` (rlhf/status.py): each stage's status on run directories built by hand (manifests written
with `write_manifest` over fake output files, no training), against a pipeline file too; that it writes
nothing; that bad input is one `error:` line; and that it imports neither torch nor transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf.artifacts import building_dir, write_manifest
from rlhf.checkpoints import FINGERPRINT
from rlhf.cli import main
from rlhf.config import load_pipeline
from rlhf.pipeline import fingerprint
from rlhf.status import format_status, run_status

from cli_helpers import one_line_error
from pipeline_helpers import hold_lock, snapshot, write_tiny_rlhf, write_tiny_sft

ROOT = Path(__file__).resolve().parents[1]
SFT_METRICS = {"eval_loss": 0.25, "eval_accuracy": 0.9, "judge_before": 0.2, "judge_after": 0.8, "steps": 40, "examples": 64}


def make_stage(run_dir: Path, name: str, metrics: dict | None = None, **facts) -> Path:
    """A complete stage folder: two fake output files and the manifest a run would write over them."""
    folder = run_dir / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"n_layer": 1}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"weights of " + name.encode())
    manifest = {"stage": name, "started": "2026-01-02T03:04:05+00:00", "seconds": 12.5, "metrics": metrics or {},
                "pipeline": "pipelines/demo.yaml", **facts}  # fmt: skip
    write_manifest(folder, manifest)
    return folder


def make_checkpoints(staging: Path, *names: str, complete: bool = True, stamp: str | None = None) -> None:
    """Checkpoint folders under `staging`/checkpoints, complete (with their marker file) or not."""
    for name in names:
        folder = staging / "checkpoints" / name
        folder.mkdir(parents=True)
        if complete:
            marker = "trainer_state.json" if name.startswith("checkpoint-") else "state.json"
            (folder / marker).write_text("{}", encoding="utf-8")
    if stamp is not None:
        (staging / "checkpoints" / FINGERPRINT).write_text(stamp, encoding="utf-8")


def rows(run_dir: Path, pipeline: str | None = None) -> dict[str, object]:
    return {row.stage: row for row in run_status(run_dir, pipeline).stages}


def test_complete_stages_are_listed_in_registry_order_with_times_and_headline_metrics(tmp_path) -> None:
    run_dir = tmp_path / "run"
    make_stage(run_dir, "sft", SFT_METRICS)
    make_stage(run_dir, "pretrain", {"eval_loss": 1.5, "steps": 10})
    status = run_status(run_dir)
    assert [row.stage for row in status.stages] == ["pretrain", "sft"], "registry order, found stages only"
    sft = status.stages[1]
    assert (sft.status, sft.reason) == ("complete", "2 outputs match their recorded sha256")
    assert sft.started == "2026-01-02T03:04:05+00:00" and sft.seconds == 12.5 and sft.finished
    assert list(sft.metrics) == ["eval_loss", "eval_accuracy", "judge_before", "judge_after", "steps"], "not 'examples'"
    assert sft.next is None, "without a pipeline file, no guess at what the run would do"
    table = format_status(status)
    assert "eval_loss=0.25 eval_accuracy=0.9" in table and "12.5 s" in table
    assert "recorded pipeline: pipelines/demo.yaml" in table


def test_table_columns_are_aligned(tmp_path) -> None:
    run_dir = tmp_path / "run"
    make_stage(run_dir, "tokenizer", {"vocab_size": 300})
    make_stage(run_dir, "reward", {"eval_accuracy": 0.75})
    lines = format_status(run_status(run_dir)).splitlines()
    header = lines[1]
    for line in lines[2:4]:
        for column in ("status", "finished", "took", "headline metrics"):
            start = header.index(column)
            assert line[start - 2 : start] == "  " and line[start] != " ", (column, line)


def test_modified_output_and_unreadable_manifest_are_corrupted_naming_the_file(tmp_path) -> None:
    run_dir = tmp_path / "run"
    (make_stage(run_dir, "sft") / "model.safetensors").write_bytes(b"flipped bits")
    (make_stage(run_dir, "reward") / "manifest.json").write_text("{not json", encoding="utf-8")
    (make_stage(run_dir, "pretrain") / "config.json").unlink()
    found = rows(run_dir)
    assert found["sft"].status == "corrupted" and "sft/model.safetensors was modified or corrupted" in found["sft"].reason
    assert found["reward"].status == "corrupted" and "reward/manifest.json is unreadable" in found["reward"].reason
    assert found["pretrain"].status == "corrupted" and "pretrain/config.json is missing" in found["pretrain"].reason
    table = format_status(run_status(run_dir)).splitlines()
    why = [line for line in table[table.index("why:") + 1 :] if line.startswith("  ")]
    assert [line.split(":")[0].strip() for line in why] == ["pretrain", "sft", "reward"], "each stage not simply complete, in order"
    assert "sft/model.safetensors was modified or corrupted" in why[1]


def test_interrupted_builds_are_partial_with_their_last_complete_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "run"
    make_checkpoints(building_dir(run_dir, "sft"), "checkpoint-10", "checkpoint-20")
    make_checkpoints(building_dir(run_dir, "sft"), "checkpoint-30", complete=False)  # killed while saving
    make_checkpoints(building_dir(run_dir, "ppo"), "step-4", "step-12")
    (run_dir / "reward").mkdir()  # a folder an older version built in place, without a manifest
    found = rows(run_dir)
    assert found["sft"].status == "partial" and found["sft"].reason == "an interrupted build in .sft.building/, last complete checkpoint checkpoint-20"
    assert found["ppo"].reason.endswith("last complete checkpoint step-12")
    assert found["reward"].status == "partial" and found["reward"].reason == "an interrupted build in reward/, no complete checkpoint"


def test_complete_stage_notes_an_interrupted_rebuild_and_a_held_lock_says_a_run_is_in_progress(tmp_path) -> None:
    run_dir = tmp_path / "run"
    make_stage(run_dir, "sft")
    make_checkpoints(building_dir(run_dir, "sft"), "checkpoint-5")
    make_checkpoints(building_dir(run_dir, "reward"), "checkpoint-2")
    sft = rows(run_dir)["sft"]
    assert sft.status == "complete" and sft.notes == ["an interrupted rebuild in .sft.building/, last complete checkpoint checkpoint-5"]
    hold_lock(run_dir, os.getpid())
    status = run_status(run_dir)
    assert f"in use by pid {os.getpid()}" in status.lock
    found = {row.stage: row for row in status.stages}
    assert found["reward"].reason == "a build in progress in .reward.building/, last complete checkpoint checkpoint-2"
    assert found["sft"].status == "complete" and found["sft"].notes[0].startswith("being rebuilt (a run holds the lock)")
    assert f"lock: {run_dir}: in use by pid {os.getpid()}" in format_status(status)


def test_a_swap_cut_short_is_named(tmp_path) -> None:
    run_dir = tmp_path / "run"
    make_stage(run_dir, "report")
    os.rename(run_dir / "report", run_dir / ".report.old")
    report = rows(run_dir)["report"]
    assert report.status == "partial" and "only .report.old/ is left" in report.reason


def test_against_a_pipeline_every_stage_in_run_order_with_stale_and_what_the_run_would_do(tmp_path) -> None:
    pipeline = str(write_tiny_sft(tmp_path))
    run_dir = tmp_path / "elsewhere"  # the command line's RUN_DIR wins over the file's run_dir
    config = load_pipeline(pipeline, [], run_dir=str(run_dir))
    run_dir.mkdir()
    stage_fingerprint, facts = fingerprint(config, "tokenizer", run_dir)
    make_stage(run_dir, "tokenizer", {"vocab_size": 320}, fingerprint=stage_fingerprint, **facts)
    stage_fingerprint, facts = fingerprint(config, "pretrain", run_dir)
    make_stage(run_dir, "pretrain", fingerprint=stage_fingerprint, **facts)
    sft_fingerprint = fingerprint(config, "sft", run_dir)[0]
    make_checkpoints(building_dir(run_dir, "sft"), "checkpoint-2", "checkpoint-4", stamp=sft_fingerprint)
    before = snapshot(tmp_path)

    status = run_status(run_dir, pipeline)
    found = {row.stage: row for row in status.stages}
    assert list(found) == ["tokenizer", "pretrain", "sft"]
    assert [(row.status, row.next) for row in found.values()] == [
        ("complete", "skip"), ("complete", "skip"), ("partial", "resume from checkpoint step 4 in .sft.building/")
    ]
    assert status.stop is None and status.lock is None
    assert "next" in format_status(status).splitlines()[1]
    assert snapshot(tmp_path) == before, "status writes nothing"

    # pretrain recorded under another lr: stale, in the dry run's words; sft then runs after it, not resumed
    changed = load_pipeline(pipeline, ["stages.pretrain.lr=0.5"], run_dir=str(run_dir))
    stage_fingerprint, facts = fingerprint(changed, "pretrain", run_dir)
    shutil.rmtree(run_dir / "pretrain")
    make_stage(run_dir, "pretrain", fingerprint=stage_fingerprint, **facts)
    found = rows(run_dir, pipeline)
    assert (found["pretrain"].status, found["pretrain"].reason, found["pretrain"].next) == ("stale", "config changed: lr 0.5 -> 0.001", "run")
    assert (found["sft"].status, found["sft"].next) == ("partial", "run")

    (run_dir / "tokenizer" / "model.safetensors").write_bytes(b"changed")
    status = run_status(run_dir, pipeline)
    assert status.stages[0].status == "corrupted" and "stage 'tokenizer'" in status.stop
    assert "rlhf run would stop: stage 'tokenizer'" in format_status(status)


def test_pipeline_stages_not_in_the_run_directory_are_not_run_and_others_are_listed_after(tmp_path) -> None:
    pipeline = str(write_tiny_sft(tmp_path))
    make_stage(tmp_path / "run", "dpo")
    found = rows(tmp_path / "run", pipeline)
    assert {name: (row.status, row.reason, row.next) for name, row in found.items()} == {
        **{name: ("not run", "never ran", "run") for name in ("tokenizer", "pretrain", "sft")},
        "dpo": ("complete", "2 outputs match their recorded sha256", "none (not in the pipeline)"),
    }


def test_cli_prints_the_table_or_json_and_writes_nothing(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    make_stage(run_dir, "sft", SFT_METRICS)
    before = snapshot(tmp_path)
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[:2] == ["sft", "complete"]
    assert main(["status", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"][0]["metrics"]["judge_after"] == 0.8 and report["lock"] is None
    assert snapshot(tmp_path) == before and not (run_dir / ".lock").exists()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    (tmp_path / "bad.yaml").write_text("stages: [\n", encoding="utf-8")
    (tmp_path / "run").mkdir()
    before = snapshot(tmp_path)
    cases = [([str(tmp_path / "missing")], "no such run directory"), ([str(tmp_path / "file")], "not a directory"),
             ([str(tmp_path / "run"), str(tmp_path / "bad.yaml")], "bad.yaml"),
             ([str(tmp_path / "run"), str(tmp_path / "nope.yaml")], "nope.yaml")]  # fmt: skip
    for argv, words in cases:
        assert main(["status", *argv]) == 2, argv
        assert words in one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_status_imports_neither_torch_nor_transformers(tmp_path) -> None:
    """As the console script runs it (argv[0] 'rlhf'), against a pipeline with every kind of stage (the RL
    ones included): the 2-second promise rests on this, checked without timing anything."""
    pipeline = write_tiny_rlhf(tmp_path)
    run_dir = tmp_path / "run"
    make_stage(run_dir, "tokenizer")
    probe = (
        "import json, sys\nsys.argv[0] = 'rlhf'\nimport rlhf.cli\n"
        f"codes = [rlhf.cli.main(['status', {str(run_dir)!r}]), rlhf.cli.main(['status', {str(run_dir)!r}, {str(pipeline)!r}])]\n"
        "print(json.dumps({'codes': codes, 'heavy': sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules)}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0, 0], "heavy": []}, result.stdout


def test_a_complete_stage_whose_upstream_reruns_is_stale_saying_so(tmp_path) -> None:
    pipeline = str(write_tiny_sft(tmp_path))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    changed = load_pipeline(pipeline, ["stages.tokenizer.vocab_size=400"])
    stage_fingerprint, facts = fingerprint(changed, "tokenizer", run_dir)
    make_stage(run_dir, "tokenizer", fingerprint=stage_fingerprint, **facts)
    stage_fingerprint, facts = fingerprint(changed, "pretrain", run_dir)  # pretrain's own settings are unchanged
    make_stage(run_dir, "pretrain", fingerprint=stage_fingerprint, **facts)
    found = rows(run_dir, pipeline)
    assert found["tokenizer"].reason == "config changed: vocab_size 400 -> 320"
    assert found["pretrain"].status == "stale" and found["pretrain"].next == "run"
    assert found["pretrain"].reason.startswith("upstream tokenizer runs first (tokenizer: config changed: vocab_size 400 -> 320)")


def test_without_a_pipeline_a_stage_built_on_other_upstream_outputs_is_stale(tmp_path) -> None:
    from rlhf.artifacts import read_manifest, sha256_json

    run_dir = tmp_path / "run"
    make_stage(run_dir, "tokenizer")
    recorded = {"tokenizer": sha256_json(read_manifest(run_dir / "tokenizer")["outputs"])}
    make_stage(run_dir, "pretrain", upstream=recorded)
    make_stage(run_dir, "sft", upstream={"pretrain": "0" * 64})  # built on outputs pretrain no longer has
    make_stage(run_dir, "reward", upstream={"sft": sha256_json(read_manifest(run_dir / "sft")["outputs"]), "ppo": "1" * 64})
    found = rows(run_dir)
    assert found["tokenizer"].status == "complete" and found["pretrain"].status == "complete"
    assert found["sft"].status == "stale" and found["sft"].reason.startswith("upstream stage 'pretrain' changed after it ran")
    assert found["reward"].status == "stale" and found["reward"].reason == "upstream stage 'ppo' is no longer complete in the run directory"

    shutil.rmtree(run_dir / "tokenizer")  # the stage pretrain was built on is gone
    assert rows(run_dir)["pretrain"].status == "stale"
