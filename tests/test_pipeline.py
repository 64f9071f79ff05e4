"""A tiny pipeline (tokenizer -> pretrain -> sft with a judge) end to end on the CPU: artifacts and
manifests, skip logic and fingerprints, --only/--from/--force, and refusals (missing upstream, corrupted
artifact, held lock, bad data) that leave the run untouched. Resuming and non-finite steps:
tests/test_pipeline_resume.py.

One run is made per session (`tiny_sft`, in conftest.py); tests that change a run work on a copy of its directory.
"""

from __future__ import annotations

import math
import os
import socket
import pytest

from rlhf.artifacts import NOT_OUTPUTS, read_manifest, read_metrics, sha256_file, sha256_json, verify_outputs
from rlhf.config import fingerprinted_config, load_pipeline

from pipeline_helpers import assert_same_weights, clone, file_hashes, hold_lock, loss_steps, manifest_bytes, run, weights

STAGES = ("tokenizer", "pretrain", "sft")


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line in {err[-2000:]!r}"
    return lines[0]


# ----------------------------------------------------------------------------- a complete run


def test_run_writes_manifests_metrics_and_models(tiny_sft) -> None:
    run_dir, config = tiny_sft.run_dir, load_pipeline(tiny_sft.pipeline)
    for stage in STAGES:
        assert f"[{stage}] running" in tiny_sft.out and f"[{stage}] done" in tiny_sft.out
    assert not (run_dir / ".lock").exists()
    manifests = {stage: read_manifest(run_dir / stage) for stage in STAGES}
    for stage, manifest in manifests.items():
        assert manifest["status"] == "complete" and manifest["stage"] == stage
        assert len(manifest["fingerprint"]) == 64 and manifest["finished"] and manifest["started"]
        assert manifest["config"] == fingerprinted_config(config.stages[stage])
        assert manifest["seed"] == 0 and manifest["pipeline"] == tiny_sft.pipeline
        outputs = manifest["outputs"]
        assert outputs and verify_outputs(run_dir / stage, manifest) is None
        assert not [name for name in outputs if name.startswith("checkpoints/") or name in NOT_OUTPUTS]
        expected = {p.relative_to(run_dir / stage).as_posix() for p in (run_dir / stage).rglob("*") if p.is_file()}
        expected = {n for n in expected if not n.startswith("checkpoints/") and n not in NOT_OUTPUTS}
        assert set(outputs) == expected
    folder = tiny_sft.folder
    assert manifests["tokenizer"]["inputs"] == {str(folder / "corpus.txt"): sha256_file(folder / "corpus.txt")}
    assert manifests["pretrain"]["inputs"] == {str(folder / "corpus.txt"): sha256_file(folder / "corpus.txt")}
    assert manifests["sft"]["inputs"] == {
        str(folder / "sft.jsonl"): sha256_file(folder / "sft.jsonl"),
        str(folder / "eval.jsonl"): sha256_file(folder / "eval.jsonl"),
    }
    assert manifests["tokenizer"]["upstream"] == {}
    assert manifests["pretrain"]["upstream"] == {"tokenizer": sha256_json(manifests["tokenizer"]["outputs"])}
    assert manifests["sft"]["upstream"] == {"pretrain": sha256_json(manifests["pretrain"]["outputs"])}
    assert manifests["tokenizer"]["metrics"]["vocab_size"] == 320

    for stage, steps in (("pretrain", 6), ("sft", 4)):
        metrics = manifests[stage]["metrics"]
        assert metrics["steps"] == steps
        assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0
        rows = read_metrics(run_dir / stage)
        assert rows and all(isinstance(row["step"], int) for row in rows)
        assert loss_steps(run_dir / stage) == list(range(1, steps + 1)), "log_every 1: one loss row per step"
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert (run_dir / stage / name).is_file(), f"{stage}/{name}"
    for key in ("judge_before", "judge_after"):
        assert 0.0 <= manifests["sft"]["metrics"][key] <= 1.0
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()


def test_sft_output_loads_with_auto_classes(tiny_sft) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.model import RlhfForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_sft.run_dir / "sft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft.run_dir / "sft")
    assert isinstance(model, RlhfForCausalLM)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (1, 32, 96)
    assert model.config.vocab_size == len(tokenizer) == 320
    ids = tokenizer("Sure! 1 + 2 = 3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()
    saved = weights(tiny_sft.run_dir / "sft")["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, saved)


# ----------------------------------------------------------------------------- skip logic


def test_rerun_skips_every_stage_and_changes_nothing(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    before = file_hashes(run_dir)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir)
    assert code == 0, err
    for stage in STAGES:
        assert f"[{stage}] up to date" in out
    assert "running" not in out
    assert file_hashes(run_dir) == before, "a skipped run must not touch manifests (finished times), weights or metrics"


def test_sft_setting_reruns_sft_only(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    kept = {stage: manifest_bytes(run_dir, stage) for stage in ("tokenizer", "pretrain")}
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "stages.sft.lr=3e-4")
    assert code == 0, err
    assert "[tokenizer] up to date" in out and "[pretrain] up to date" in out and "[sft] running" in out
    for stage, content in kept.items():
        assert manifest_bytes(run_dir, stage) == content
    sft = read_manifest(run_dir / "sft")
    assert sft["config"]["lr"] == pytest.approx(3e-4)
    assert sft["fingerprint"] != read_manifest(tiny_sft.run_dir / "sft")["fingerprint"]
    assert sft["outputs"]["model.safetensors"] != read_manifest(tiny_sft.run_dir / "sft")["outputs"]["model.safetensors"]
    # The same override again: everything is up to date.
    code, out, _ = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "stages.sft.lr=3e-4")
    assert code == 0 and "running" not in out and "[sft] up to date" in out


def test_changed_input_file_reruns_its_stage(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join((tiny_sft.folder / "eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, f"stages.sft.eval_prompts={prompts}")
    assert code == 0, err
    assert "[pretrain] up to date" in out and "[sft] running" in out
    assert read_manifest(run_dir / "sft")["inputs"][str(prompts)] == sha256_file(prompts)


def test_pretrain_setting_reruns_pretrain_and_sft(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    tokenizer_manifest = manifest_bytes(run_dir, "tokenizer")
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "[tokenizer] up to date" in out and "[pretrain] running" in out and "[sft] running" in out
    assert manifest_bytes(run_dir, "tokenizer") == tokenizer_manifest
    pretrain, sft = read_manifest(run_dir / "pretrain"), read_manifest(run_dir / "sft")
    assert pretrain["config"]["lr"] == pytest.approx(5e-4)
    assert sft["upstream"]["pretrain"] == sha256_json(pretrain["outputs"])
    assert sft["upstream"] != read_manifest(tiny_sft.run_dir / "sft")["upstream"]


def test_only_runs_one_stage_then_downstream_catches_up(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    sft_manifest = manifest_bytes(run_dir, "sft")
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "[pretrain] running" in out and "[tokenizer]" not in out and "[sft]" not in out
    assert manifest_bytes(run_dir, "sft") == sft_manifest
    # The next full run sees that sft's upstream changed.
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "[tokenizer] up to date" in out and "[pretrain] up to date" in out and "[sft] running" in out


def test_from_reruns_that_stage_and_later_ones(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    kept = {stage: manifest_bytes(run_dir, stage) for stage in ("tokenizer", "pretrain")}
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--from", "sft")
    assert code == 0, err
    assert "[sft] running" in out and "[tokenizer]" not in out and "[pretrain]" not in out
    assert {stage: manifest_bytes(run_dir, stage) for stage in kept} == kept


def test_force_reruns_selected_stages_and_identical_outputs_keep_downstream(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--force", "--only", "tokenizer")
    assert code == 0, err
    assert "[tokenizer] running" in out and "[pretrain]" not in out
    # Tokenizer training is deterministic: same outputs, so pretrain and sft stay up to date.
    assert read_manifest(run_dir / "tokenizer")["outputs"] == read_manifest(tiny_sft.run_dir / "tokenizer")["outputs"]
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir)
    assert code == 0 and "running" not in out


def test_force_reruns_everything(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--force")
    assert code == 0, err
    for stage in STAGES:
        assert f"[{stage}] running" in out
    assert "up to date" not in out
    # A completed stage's checkpoints are not "resumed" (that would train nothing): it trains again.
    assert "resuming from" not in out
    for stage in ("pretrain", "sft"):
        assert loss_steps(run_dir / stage) == loss_steps(tiny_sft.run_dir / stage)
    # Same config, same seed: the same weights.
    assert_same_weights(run_dir / "sft", tiny_sft.run_dir / "sft")


# ----------------------------------------------------------------------------- refusals


def test_only_sft_on_empty_run_dir_names_missing_upstream(tiny_sft, tmp_path, capsys) -> None:
    run_dir = tmp_path / "empty"
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "sft")
    assert code == 2
    line = one_line_error(err)
    assert "'pretrain'" in line
    assert not [p for p in run_dir.rglob("*")], "nothing is written"


def test_corrupted_artifact_stops_before_training(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    path = run_dir / "pretrain" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    before = file_hashes(run_dir)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir)
    assert code == 2
    line = one_line_error(err)
    assert "stage 'pretrain'" in line and "model.safetensors" in line and "--from pretrain" in line
    assert "running" not in out
    assert file_hashes(run_dir) == before
    # The suggested command repairs it (same config and seed: the same weights again).
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--from", "pretrain")
    assert code == 0, err
    assert "[pretrain] running" in out and "[sft] running" in out
    assert verify_outputs(run_dir / "pretrain", read_manifest(run_dir / "pretrain")) is None
    assert_same_weights(run_dir / "pretrain", tiny_sft.run_dir / "pretrain")


def test_lock_held_by_live_process_refuses(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    hold_lock(run_dir, os.getpid())
    before = file_hashes(run_dir)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--force")
    assert code == 2
    line = one_line_error(err)
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line
    assert "running" not in out
    assert file_hashes(run_dir) == before, "the holder's lock and the artifacts are left alone"


@pytest.mark.parametrize(
    "bad_line, where",
    [
        ('{"messages": [{"role": "user", "content": "Hi"}, \n', "line 7: invalid JSON"),
        ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]}\n', "row 7"),
        ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hi"}]}\n', "row 7"),
    ],
    ids=["json", "last-role", "role"],
)
def test_bad_sft_data_leaves_run_dir_unchanged(tiny_sft, tmp_path, capsys, bad_line, where) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    lines = (tiny_sft.folder / "sft.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:12]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:6] + [bad_line] + lines[6:]), encoding="utf-8")
    before = file_hashes(run_dir)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, f"stages.sft.data={bad}")
    assert code == 2
    line = one_line_error(err)
    assert str(bad) in line and where in line
    assert file_hashes(run_dir) == before
    code, out, _ = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir)
    assert code == 0 and "running" not in out, "the previous sft result is still complete"


def test_missing_data_file_is_an_error(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    before = file_hashes(run_dir)
    missing = tmp_path / "nope.jsonl"
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, f"stages.sft.data={missing}")
    assert code == 2 and str(missing) in one_line_error(err)
    assert file_hashes(run_dir) == before


def test_sft_max_length_beyond_model_context_is_a_user_error(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    before = file_hashes(run_dir)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "stages.sft.max_length=128")
    assert code == 2
    line = one_line_error(err)
    assert "max_length" in line and "96" in line
    assert file_hashes(run_dir) == before
