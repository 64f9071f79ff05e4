"""The tiny tokenizer -> pretrain -> sft pipeline interrupted (Ctrl-C, SIGTERM, SIGKILL, a half-written
checkpoint) and resumed to the same weights; and NaN or inf steps skipped, counted, and stopping the
stage with its last checkpoint intact.

One run is made per session (`tiny_sft`, in conftest.py); tests that change a run work on a copy of its directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
from pathlib import Path

import pytest

from rlhf.artifacts import building_dir, read_manifest, read_metrics

from pipeline_helpers import (
    add_trainer_callback, assert_same_weights, at_step, clone, file_hashes, loss_steps, run, run_killed,
)  # fmt: skip


# ----------------------------------------------------------------------------- resume


def check_resumed(tiny_sft, run_dir: Path, out: str, checkpoint: str = "checkpoint-3") -> None:
    assert "resuming from" in out and checkpoint in out, out
    manifest = read_manifest(run_dir / "pretrain")
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 6
    assert manifest["fingerprint"] == read_manifest(tiny_sft.run_dir / "pretrain")["fingerprint"]
    assert_same_weights(run_dir / "pretrain", tiny_sft.run_dir / "pretrain")
    assert loss_steps(run_dir / "pretrain") == [1, 2, 3, 4, 5, 6], "steps 4-6 are logged once, after resuming"


def test_ctrl_c_keeps_checkpoint_and_same_command_resumes(tiny_sft, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_sft.run_dir / "tokenizer", run_dir / "tokenizer")

    def ctrl_c():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        at_step(patch, "on_save", 3, ctrl_c)
        code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 130 and "interrupted" in err
    assert not (run_dir / ".lock").exists(), "the lock is released on Ctrl-C"
    assert read_manifest(run_dir / "pretrain") is None and read_manifest(building_dir(run_dir, "pretrain")) is None
    checkpoints = building_dir(run_dir, "pretrain") / "checkpoints"
    assert (checkpoints / "checkpoint-3").is_dir() and not (checkpoints / "checkpoint-6").exists()

    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(tiny_sft, run_dir, out)


def test_sigkill_after_checkpoint_resumes_and_takes_over_the_stale_lock(tiny_sft, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_sft.run_dir / "tokenizer", run_dir / "tokenizer")
    run_killed(tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", step=3, event="on_save")
    holder = json.loads((run_dir / ".lock").read_text(encoding="utf-8"))
    assert holder["pid"] != os.getpid() and holder["host"] == socket.gethostname(), "the killed run left its lock"
    assert read_manifest(run_dir / "pretrain") is None
    assert (building_dir(run_dir, "pretrain") / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()

    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(tiny_sft, run_dir, out)
    assert not (run_dir / ".lock").exists()


def test_resume_from_kept_checkpoint_after_outputs_deleted(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    stage = run_dir / "pretrain"
    (stage / "manifest.json").unlink()
    (stage / "model.safetensors").unlink()
    shutil.rmtree(stage / "checkpoints" / "checkpoint-6")
    assert (stage / "checkpoints" / "checkpoint-3").is_dir() and (stage / "checkpoints" / "fingerprint").is_file()
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(tiny_sft, run_dir, out)


def test_half_written_last_checkpoint_is_not_resumed(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    stage = run_dir / "pretrain"
    (stage / "manifest.json").unlink()
    (stage / "model.safetensors").unlink()
    # The Trainer writes a checkpoint's weights first and trainer_state.json last.
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (stage / "checkpoints" / "checkpoint-6" / name).unlink(missing_ok=True)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(tiny_sft, run_dir, out)


def test_checkpoints_of_another_config_are_not_resumed(tiny_sft, tmp_path, capsys) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    (run_dir / "pretrain" / "model.safetensors").unlink()
    (run_dir / "pretrain" / "manifest.json").unlink()
    shutil.rmtree(run_dir / "pretrain" / "checkpoints" / "checkpoint-6")
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", "stages.pretrain.lr=5e-4")
    assert code == 0, err
    assert "resuming from" not in out
    assert loss_steps(run_dir / "pretrain") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_the_same_command_resumes(tiny_sft, tmp_path, capsys, monkeypatch, signum) -> None:
    """Ctrl-C or SIGTERM at step 4, between the checkpoints of steps 3 and 6: checkpoint-4 is saved, the
    run exits 130, and the same command ends with the uninterrupted run's weights (atol 1e-6)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_sft.run_dir / "tokenizer", run_dir / "tokenizer")
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a shell's background job
    with monkeypatch.context() as patch:
        at_step(patch, "on_step_end", 4, lambda: signal.raise_signal(signum))
        code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    name = signal.Signals(signum).name
    checkpoint = building_dir(run_dir, "pretrain") / "checkpoints" / "checkpoint-4"
    assert code == 130, err[-3000:]
    assert f"{name} received" in err and f"[pretrain] stopped by {name}; saved {checkpoint}" in err
    assert err.strip().splitlines()[-1].startswith("interrupted; "), "the CLI's last word says how to resume"
    assert (checkpoint / "trainer_state.json").is_file() and not (checkpoint.parent / "checkpoint-5").exists()
    assert read_manifest(run_dir / "pretrain") is None and not (run_dir / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is before, "the stage's handler is removed again, the one before it back"

    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain")
    assert code == 0, err
    check_resumed(tiny_sft, run_dir, out, checkpoint="checkpoint-4")


def test_sft_killed_at_a_random_step_resumes_to_the_same_weights(tiny_sft, tmp_path, capsys) -> None:
    """SIGKILL at the end of a random SFT step (1-3 of 4; checkpoints every 2) loses at most the steps
    since the last checkpoint: the same command ends with the uninterrupted run's weights (atol 1e-6)."""
    step = random.randint(1, 3)
    run_dir = clone(tiny_sft, tmp_path)
    shutil.rmtree(run_dir / "sft")
    run_killed(tiny_sft.pipeline, "--run-dir", run_dir, "--only", "sft", step=step)
    assert read_manifest(run_dir / "sft") is None
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "sft")
    assert code == 0, err
    last = step - 1 if step > 2 else None  # the kill comes before step's own checkpoint
    assert (f"resuming from {building_dir(run_dir, 'sft') / 'checkpoints' / f'checkpoint-{last}'}" in out) if last else ("resuming from" not in out), f"killed at step {step}"
    assert_same_weights(run_dir / "sft", tiny_sft.run_dir / "sft")
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
def test_nonfinite_steps_are_skipped_and_counted(tiny_sft, tmp_path, capsys, monkeypatch, where) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    seen: dict = {}
    poison(monkeypatch, {2, 4}, where, seen)
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", "--force")
    assert code == 0, err[-3000:]
    assert same_state(seen[2], seen[1]) and same_state(seen[4], seen[3]), "a skipped step changes no weight or moment"
    assert not same_state(seen[3], seen[2]) and not same_state(seen[5], seen[4]), "the steps between train"
    skipped = [row for row in read_metrics(run_dir / "pretrain") if "nonfinite_steps" in row]
    assert [(row["step"], row["nonfinite_steps"], row["nonfinite_in_a_row"]) for row in skipped] == [(2, 1, 1), (4, 1, 1)]
    assert read_manifest(run_dir / "pretrain")["metrics"]["steps"] == 6


def test_nonfinite_steps_in_a_row_stop_the_stage_with_the_last_checkpoint_intact(tiny_sft, tmp_path, capsys, monkeypatch) -> None:
    run_dir = clone(tiny_sft, tmp_path)
    complete = file_hashes(run_dir / "pretrain")
    setting = "stages.pretrain.max_nonfinite_steps=2"
    with monkeypatch.context() as patch:
        poison(patch, {4, 5, 6}, "loss", {})
        code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", "--force", setting)
    checkpoints = building_dir(run_dir, "pretrain") / "checkpoints"
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: pretrain: 2 optimizer steps in a row had NaN/inf losses or gradients (step 5)"), message
    assert f"Last good checkpoint: {checkpoints / 'checkpoint-3'}" in message
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3"], "nothing saved after the bad steps"
    assert read_manifest(building_dir(run_dir, "pretrain")) is None, "a diverged build never looks complete"
    assert file_hashes(run_dir / "pretrain") == complete, "the complete stage it was to replace is untouched"
    rows = read_metrics(building_dir(run_dir, "pretrain"))
    assert [(row["step"], row["nonfinite_in_a_row"]) for row in rows if "nonfinite_steps" in row] == [(4, 1), (5, 2)]
    # The checkpoint is good: without the fault the same command resumes from it to the usual weights.
    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", setting)
    assert code == 0, err[-3000:]
    assert f"resuming from {checkpoints / 'checkpoint-3'}" in out
    assert_same_weights(run_dir / "pretrain", tiny_sft.run_dir / "pretrain")


def test_max_seconds_counts_the_training_time_before_a_resume(tiny_sft, tmp_path, capsys, monkeypatch) -> None:
    """The budget's seconds travel in the checkpoint (trainer_state.json): a resumed run whose checkpoint
    had all but used them up stops after its first step."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_sft.run_dir / "tokenizer", run_dir / "tokenizer")
    budget = "stages.pretrain.max_seconds=1000"

    def ctrl_c():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        at_step(patch, "on_save", 3, ctrl_c)
        code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", budget)
    assert code == 130, err[-3000:]
    state_file = building_dir(run_dir, "pretrain") / "checkpoints" / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    spent = state["stateful_callbacks"]["TimeBudget"]["attributes"]["spent_before"]
    assert 0 < spent < 1000, "the seconds trained up to the checkpoint"
    state["stateful_callbacks"]["TimeBudget"]["attributes"]["spent_before"] = 1000 - 1e-3  # as if it had run long
    state_file.write_text(json.dumps(state))

    code, out, err = run(capsys, tiny_sft.pipeline, "--run-dir", run_dir, "--only", "pretrain", budget)
    assert code == 0, err[-3000:]
    assert "resuming from" in out and "max_seconds 1000 reached; stopped after step 4" in out
    assert read_manifest(run_dir / "pretrain")["metrics"]["steps"] == 4
