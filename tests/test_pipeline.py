"""A tiny pipeline (tokenizer -> pretrain -> sft with a judge) end to end on the CPU: artifacts and
manifests, skip logic and fingerprints, --only/--from/--force, resuming an interrupted stage, and
refusals (missing upstream, corrupted artifact, held lock, bad data) that leave the run untouched.

One run is made per module (`base`); tests that change a run work on a copy of its directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
from pathlib import Path

import pytest
import yaml

from rlhf.artifacts import building_dir, read_manifest, read_metrics, sha256_file, sha256_json, verify_outputs
from rlhf.config import load_pipeline, stage_config_dict

from pipeline_helpers import add_trainer_callback, at_step, clone, hold_lock, run, run_killed, run_once, write_subsets, write_yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny.yaml"
STAGES = ("tokenizer", "pretrain", "sft")
ATOL = 1e-6


def write_pipeline(folder: Path) -> Path:
    """The fixture pipeline with its data cut to small subsets of data_samples/ inside `folder`."""
    write_subsets(folder, {"corpus.txt": 400, "sft.jsonl": 40, "eval.jsonl": 8})
    tree = yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))
    tree["run_dir"] = str(folder / "run")
    stages = tree["stages"]
    stages["tokenizer"]["data"] = [str(folder / "corpus.txt")]
    stages["pretrain"]["data"] = [str(folder / "corpus.txt")]
    stages["sft"]["data"] = str(folder / "sft.jsonl")
    stages["sft"]["eval_prompts"] = str(folder / "eval.jsonl")
    return write_yaml(folder / "tiny.yaml", tree)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    return run_once(write_pipeline(folder), folder)


def snapshot(run_dir: Path) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): sha256_file(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def manifest_bytes(run_dir: Path, stage: str) -> bytes:
    return (run_dir / stage / "manifest.json").read_bytes()


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line in {err[-2000:]!r}"
    return lines[0]


def weights(stage_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(stage_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name] - wb[name]).abs().max().item()
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=ATOL), f"{name}: max |diff| {diff:.3g} > atol {ATOL}"


def loss_steps(stage_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(stage_dir) if "loss" in row]


# ----------------------------------------------------------------------------- a complete run


def test_run_writes_manifests_metrics_and_models(base) -> None:
    run_dir, config = base.run_dir, load_pipeline(base.pipeline)
    for stage in STAGES:
        assert f"[{stage}] running" in base.out and f"[{stage}] done" in base.out
    assert not (run_dir / ".lock").exists()
    manifests = {stage: read_manifest(run_dir / stage) for stage in STAGES}
    for stage, manifest in manifests.items():
        assert manifest["status"] == "complete" and manifest["stage"] == stage
        assert len(manifest["fingerprint"]) == 64 and manifest["finished"] and manifest["started"]
        assert manifest["config"] == stage_config_dict(config.stages[stage])
        assert manifest["seed"] == 0 and manifest["pipeline"] == base.pipeline
        outputs = manifest["outputs"]
        assert outputs and verify_outputs(run_dir / stage, manifest) is None
        assert not [name for name in outputs if name.startswith("checkpoints/") or name in ("metrics.jsonl", "manifest.json")]
        expected = {p.relative_to(run_dir / stage).as_posix() for p in (run_dir / stage).rglob("*") if p.is_file()}
        expected = {n for n in expected if not n.startswith("checkpoints/") and n not in ("metrics.jsonl", "manifest.json")}
        assert set(outputs) == expected
    folder = base.folder
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


def test_sft_output_loads_with_auto_classes(base) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.model import RlhfForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.run_dir / "sft")
    tokenizer = AutoTokenizer.from_pretrained(base.run_dir / "sft")
    assert isinstance(model, RlhfForCausalLM)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (1, 32, 96)
    assert model.config.vocab_size == len(tokenizer) == 320
    ids = tokenizer("Sure! 1 + 2 = 3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()
    saved = weights(base.run_dir / "sft")["transformer.wte.weight"]
    assert torch.equal(model.transformer.wte.weight, saved)


# ----------------------------------------------------------------------------- skip logic


def test_rerun_skips_every_stage_and_changes_nothing(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir)
    assert code == 0, err
    for stage in STAGES:
        assert f"[{stage}] up to date" in out
    assert "running" not in out
    assert snapshot(run_dir) == before, "a skipped run must not touch manifests (finished times), weights or metrics"


def test_sft_setting_reruns_sft_only(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    kept = {stage: manifest_bytes(run_dir, stage) for stage in ("tokenizer", "pretrain")}
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "stages.sft.lr=3e-4")
    assert code == 0, err
    assert "[tokenizer] up to date" in out and "[pretrain] up to date" in out and "[sft] running" in out
    for stage, content in kept.items():
        assert manifest_bytes(run_dir, stage) == content
    sft = read_manifest(run_dir / "sft")
    assert sft["config"]["lr"] == pytest.approx(3e-4)
    assert sft["fingerprint"] != read_manifest(base.run_dir / "sft")["fingerprint"]
    assert sft["outputs"]["model.safetensors"] != read_manifest(base.run_dir / "sft")["outputs"]["model.safetensors"]
    # The same override again: everything is up to date.
    code, out, _ = run(capsys, base.pipeline, "--run-dir", run_dir, "stages.sft.lr=3e-4")
    assert code == 0 and "running" not in out and "[sft] up to date" in out


def test_changed_input_file_reruns_its_stage(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join((base.folder / "eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, f"stages.sft.eval_prompts={prompts}")
    assert code == 0, err
    assert "[pretrain] up to date" in out and "[sft] running" in out
    assert read_manifest(run_dir / "sft")["inputs"][str(prompts)] == sha256_file(prompts)


def test_pretrain_setting_reruns_pretrain_and_sft(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    tokenizer_manifest = manifest_bytes(run_dir, "tokenizer")
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "[tokenizer] up to date" in out and "[pretrain] running" in out and "[sft] running" in out
    assert manifest_bytes(run_dir, "tokenizer") == tokenizer_manifest
    pretrain, sft = read_manifest(run_dir / "pretrain"), read_manifest(run_dir / "sft")
    assert pretrain["config"]["lr"] == pytest.approx(5e-4)
    assert sft["upstream"]["pretrain"] == sha256_json(pretrain["outputs"])
    assert sft["upstream"] != read_manifest(base.run_dir / "sft")["upstream"]


def test_only_runs_one_stage_then_downstream_catches_up(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    sft_manifest = manifest_bytes(run_dir, "sft")
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain", "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "[pretrain] running" in out and "[tokenizer]" not in out and "[sft]" not in out
    assert manifest_bytes(run_dir, "sft") == sft_manifest
    # The next full run sees that sft's upstream changed.
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "[tokenizer] up to date" in out and "[pretrain] up to date" in out and "[sft] running" in out


def test_from_reruns_that_stage_and_later_ones(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    kept = {stage: manifest_bytes(run_dir, stage) for stage in ("tokenizer", "pretrain")}
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--from", "sft")
    assert code == 0, err
    assert "[sft] running" in out and "[tokenizer]" not in out and "[pretrain]" not in out
    assert {stage: manifest_bytes(run_dir, stage) for stage in kept} == kept


def test_force_reruns_selected_stages_and_identical_outputs_keep_downstream(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--force", "--only", "tokenizer")
    assert code == 0, err
    assert "[tokenizer] running" in out and "[pretrain]" not in out
    # Tokenizer training is deterministic: same outputs, so pretrain and sft stay up to date.
    assert read_manifest(run_dir / "tokenizer")["outputs"] == read_manifest(base.run_dir / "tokenizer")["outputs"]
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir)
    assert code == 0 and "running" not in out


def test_force_reruns_everything(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--force")
    assert code == 0, err
    for stage in STAGES:
        assert f"[{stage}] running" in out
    assert "up to date" not in out
    # A completed stage's checkpoints are not "resumed" (that would train nothing): it trains again.
    assert "resuming from" not in out
    for stage in ("pretrain", "sft"):
        assert loss_steps(run_dir / stage) == loss_steps(base.run_dir / stage)
    # Same config, same seed: the same weights.
    assert_same_weights(run_dir / "sft", base.run_dir / "sft")


# ----------------------------------------------------------------------------- resume


def check_resumed(base, run_dir: Path, out: str, checkpoint: str = "checkpoint-3") -> None:
    assert "resuming from" in out and checkpoint in out, out
    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 6
    assert manifest["fingerprint"] == read_manifest(base.run_dir / "pretrain")["fingerprint"]
    assert_same_weights(run_dir / "pretrain", base.run_dir / "pretrain")
    assert loss_steps(run_dir / "pretrain") == [1, 2, 3, 4, 5, 6], "steps 4-6 are logged once, after resuming"


def test_ctrl_c_keeps_checkpoint_and_same_command_resumes(base, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base.run_dir / "tokenizer", run_dir / "tokenizer")

    def ctrl_c():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        at_step(patch, "on_save", 3, ctrl_c)
        code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 130 and "interrupted" in err
    assert not (run_dir / ".lock").exists(), "the lock is released on Ctrl-C"
    assert read_manifest(run_dir / "pretrain") is None and read_manifest(building_dir(run_dir, "pretrain")) is None
    checkpoints = building_dir(run_dir, "pretrain") / "checkpoints"
    assert (checkpoints / "checkpoint-3").is_dir() and not (checkpoints / "checkpoint-6").exists()

    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(base, run_dir, out)


def test_sigkill_after_checkpoint_resumes_and_takes_over_the_stale_lock(base, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base.run_dir / "tokenizer", run_dir / "tokenizer")
    run_killed(base.pipeline, "--run-dir", run_dir, "--only", "pretrain", step=3, event="on_save")
    holder = json.loads((run_dir / ".lock").read_text(encoding="utf-8"))
    assert holder["pid"] != os.getpid() and holder["host"] == socket.gethostname(), "the killed run left its lock"
    assert read_manifest(run_dir / "pretrain") is None
    assert (building_dir(run_dir, "pretrain") / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()

    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(base, run_dir, out)
    assert not (run_dir / ".lock").exists()


def test_resume_from_kept_checkpoint_after_outputs_deleted(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    stage = run_dir / "pretrain"
    (stage / "manifest.json").unlink()
    (stage / "model.safetensors").unlink()
    shutil.rmtree(stage / "checkpoints" / "checkpoint-6")
    assert (stage / "checkpoints" / "checkpoint-3").is_dir() and (stage / "checkpoints" / "fingerprint").is_file()
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(base, run_dir, out)


def test_half_written_last_checkpoint_is_not_resumed(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    stage = run_dir / "pretrain"
    (stage / "manifest.json").unlink()
    (stage / "model.safetensors").unlink()
    # The Trainer writes a checkpoint's weights first and trainer_state.json last.
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (stage / "checkpoints" / "checkpoint-6" / name).unlink(missing_ok=True)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(base, run_dir, out)


def test_checkpoints_of_another_config_are_not_resumed(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    (run_dir / "pretrain" / "model.safetensors").unlink()
    (run_dir / "pretrain" / "manifest.json").unlink()
    shutil.rmtree(run_dir / "pretrain" / "checkpoints" / "checkpoint-6")
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain", "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "resuming from" not in out
    assert loss_steps(run_dir / "pretrain") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_the_same_command_resumes(base, tmp_path, capsys, monkeypatch, signum) -> None:
    """Ctrl-C or SIGTERM at step 4, between the checkpoints of steps 3 and 6: checkpoint-4 is saved, the
    run exits 130, and the same command ends with the uninterrupted run's weights (atol 1e-6)."""
    run_dir = tmp_path / "run"
    shutil.copytree(base.run_dir / "tokenizer", run_dir / "tokenizer")
    with monkeypatch.context() as patch:
        at_step(patch, "on_step_end", 4, lambda: signal.raise_signal(signum))
        code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    name = signal.Signals(signum).name
    checkpoint = building_dir(run_dir, "pretrain") / "checkpoints" / "checkpoint-4"
    assert code == 130, err[-3000:]
    assert f"{name} received" in err and f"pretrain: stopped by {name}; saved {checkpoint}" in err
    assert err.strip().splitlines()[-1].startswith("interrupted; "), "the CLI's last word says how to resume"
    assert (checkpoint / "trainer_state.json").is_file() and not (checkpoint.parent / "checkpoint-5").exists()
    assert read_manifest(run_dir / "pretrain") is None and not (run_dir / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the stage's handler is removed again"

    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(base, run_dir, out, checkpoint="checkpoint-4")


def test_sft_killed_at_a_random_step_resumes_to_the_same_weights(base, tmp_path, capsys) -> None:
    """SIGKILL at the end of a random SFT step (1-3 of 4; checkpoints every 2) loses at most the steps
    since the last checkpoint: the same command ends with the uninterrupted run's weights (atol 1e-6)."""
    step = random.randint(1, 3)
    run_dir = clone(base, tmp_path)
    shutil.rmtree(run_dir / "sft")
    run_killed(base.pipeline, "--run-dir", run_dir, "--only", "sft", step=step)
    assert read_manifest(run_dir / "sft") is None
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "sft")
    assert code == 0, err
    last = step - 1 if step > 2 else None  # the kill comes before step's own checkpoint
    assert (f"resuming from {building_dir(run_dir, 'sft') / 'checkpoints' / f'checkpoint-{last}'}" in out) if last else ("resuming from" not in out), f"killed at step {step}"
    assert_same_weights(run_dir / "sft", base.run_dir / "sft")
    assert loss_steps(run_dir / "sft") == [1, 2, 3, 4], f"killed at step {step}: every step logged once"


# ----------------------------------------------------------------------------- NaN and inf


def poison(monkeypatch, steps: set[int], where: str, seen: dict) -> None:
    """Make the loss ('loss': NaN final activations) or one weight's gradient ('gradient') of these optimizer
    steps NaN in every Trainer of this process; record each step's weights and AdamW moments in `seen[step]`."""
    from transformers import TrainerCallback

    nan = float("nan")

    class Poison(TrainerCallback):
        active = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if where == "loss":
                final_norm = model.get_submodule("transformer.ln_f")
                final_norm.register_forward_hook(lambda module, inputs, out: out * nan if self.active else out)
            else:
                weight = model.get_parameter("transformer.h.0.mlp.c_fc.weight")
                weight.register_hook(lambda grad: grad * nan if self.active else grad)

        def on_step_begin(self, args, state, control, **kwargs):
            self.active = state.global_step + 1 in steps

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters() if p in optimizer.state]
            seen[state.global_step] = ({n: p.detach().clone() for n, p in model.named_parameters()}, moments)

    add_trainer_callback(monkeypatch, Poison())


def same_state(a, b) -> bool:
    import torch

    (weights_a, moments_a), (weights_b, moments_b) = a, b
    return all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a) and all(map(torch.equal, moments_a, moments_b))


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_steps_are_skipped_and_counted(base, tmp_path, capsys, monkeypatch, where) -> None:
    run_dir = clone(base, tmp_path)
    seen: dict = {}
    poison(monkeypatch, {2, 4}, where, seen)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain", "--force")
    assert code == 0, err[-3000:]
    assert same_state(seen[2], seen[1]) and same_state(seen[4], seen[3]), "a skipped step changes no weight or moment"
    assert not same_state(seen[3], seen[2]) and not same_state(seen[5], seen[4]), "the steps between train"
    skipped = [row for row in read_metrics(run_dir / "pretrain") if "nonfinite_steps" in row]
    assert [(row["step"], row["nonfinite_steps"], row["nonfinite_in_a_row"]) for row in skipped] == [(2, 1, 1), (4, 1, 1)]
    assert read_manifest(run_dir / "pretrain")["metrics"]["steps"] == 6


def test_nonfinite_steps_in_a_row_stop_the_stage_with_the_last_checkpoint_intact(base, tmp_path, capsys, monkeypatch) -> None:
    run_dir = clone(base, tmp_path)
    complete = snapshot(run_dir / "pretrain")
    setting = "stages.pretrain.max_nonfinite_steps=2"
    with monkeypatch.context() as patch:
        poison(patch, {4, 5, 6}, "loss", {})
        code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain", "--force", setting)
    checkpoints = building_dir(run_dir, "pretrain") / "checkpoints"
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: pretrain: 2 optimizer steps in a row had NaN/inf losses or gradients (step 5)"), message
    assert f"Last good checkpoint: {checkpoints / 'checkpoint-3'}" in message
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3"], "nothing saved after the bad steps"
    assert read_manifest(building_dir(run_dir, "pretrain")) is None, "a diverged build never looks complete"
    assert snapshot(run_dir / "pretrain") == complete, "the complete stage it was to replace is untouched"
    rows = read_metrics(building_dir(run_dir, "pretrain"))
    assert [(row["step"], row["nonfinite_in_a_row"]) for row in rows if "nonfinite_steps" in row] == [(4, 1), (5, 2)]
    # The checkpoint is good: without the fault the same command resumes from it to the usual weights.
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "pretrain", setting)
    assert code == 0, err[-3000:]
    assert f"resuming from {checkpoints / 'checkpoint-3'}" in out
    assert_same_weights(run_dir / "pretrain", base.run_dir / "pretrain")


# ----------------------------------------------------------------------------- refusals


def test_only_sft_on_empty_run_dir_names_missing_upstream(base, tmp_path, capsys) -> None:
    run_dir = tmp_path / "empty"
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "sft")
    assert code == 2
    line = one_line_error(err)
    assert "'pretrain'" in line
    assert not [p for p in run_dir.rglob("*")], "nothing is written"


def test_corrupted_artifact_stops_before_training(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    path = run_dir / "pretrain" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    before = snapshot(run_dir)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir)
    assert code == 2
    line = one_line_error(err)
    assert "stage 'pretrain'" in line and "model.safetensors" in line and "--from pretrain" in line
    assert "running" not in out
    assert snapshot(run_dir) == before
    # The suggested command repairs it (same config and seed: the same weights again).
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--from", "pretrain")
    assert code == 0, err
    assert "[pretrain] running" in out and "[sft] running" in out
    assert verify_outputs(run_dir / "pretrain", read_manifest(run_dir / "pretrain")) is None
    assert_same_weights(run_dir / "pretrain", base.run_dir / "pretrain")


def test_lock_held_by_live_process_refuses(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    hold_lock(run_dir, os.getpid())
    before = snapshot(run_dir)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--force")
    assert code == 2
    line = one_line_error(err)
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line
    assert "running" not in out
    assert snapshot(run_dir) == before, "the holder's lock and the artifacts are left alone"


@pytest.mark.parametrize(
    "bad_line, where",
    [
        ('{"messages": [{"role": "user", "content": "Hi"}, \n', "line 7: invalid JSON"),
        ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]}\n', "row 7"),
        ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hi"}]}\n', "row 7"),
    ],
    ids=["json", "last-role", "role"],
)
def test_bad_sft_data_leaves_run_dir_unchanged(base, tmp_path, capsys, bad_line, where) -> None:
    run_dir = clone(base, tmp_path)
    lines = (base.folder / "sft.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:12]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:6] + [bad_line] + lines[6:]), encoding="utf-8")
    before = snapshot(run_dir)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, f"stages.sft.data={bad}")
    assert code == 2
    line = one_line_error(err)
    assert str(bad) in line and where in line
    assert snapshot(run_dir) == before
    code, out, _ = run(capsys, base.pipeline, "--run-dir", run_dir)
    assert code == 0 and "running" not in out, "the previous sft result is still complete"


def test_missing_data_file_is_an_error(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    before = snapshot(run_dir)
    missing = tmp_path / "nope.jsonl"
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, f"stages.sft.data={missing}")
    assert code == 2 and str(missing) in one_line_error(err)
    assert snapshot(run_dir) == before


def test_sft_max_length_beyond_model_context_is_a_user_error(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "stages.sft.max_length=128")
    assert code == 2
    line = one_line_error(err)
    assert "max_length" in line and "96" in line
    assert snapshot(run_dir) == before
