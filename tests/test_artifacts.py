"""The artifact directory: atomic writes, manifests with output hashes, verification, metrics
files, the per-run lock, and the stage transaction's swap, crash recovery and NaN check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from rlhf.artifacts import (
    RunLock,
    append_metrics,
    aside_dir,
    atomic_write_text,
    building_dir,
    nonfinite_weights,
    read_manifest,
    read_metrics,
    recover_swap,
    sha256_file,
    swap_in,
    truncate_metrics,
    verify_outputs,
    write_manifest,
)
from rlhf.errors import ArtifactError, UserError


def test_atomic_write_text_leaves_no_temporary_file(tmp_path) -> None:
    path = tmp_path / "sub" / "dir" / "file.json"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]


def test_atomic_write_text_keeps_old_content_when_writing_fails(tmp_path, monkeypatch) -> None:
    path = tmp_path / "manifest.json"
    atomic_write_text(path, "old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "old", "a failed write must not replace the file"


def make_stage(stage_dir):
    (stage_dir / "sub").mkdir(parents=True)
    (stage_dir / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (stage_dir / "config.json").write_text('{"a": 1}', encoding="utf-8")
    (stage_dir / "sub" / "nested.txt").write_text("nested", encoding="utf-8")
    (stage_dir / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (stage_dir / "checkpoints" / "checkpoint-3" / "model.safetensors").write_bytes(b"ckpt")
    (stage_dir / "checkpoints" / "fingerprint").write_text("f", encoding="utf-8")
    (stage_dir / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    (stage_dir / ".lock").write_text("{}", encoding="utf-8")


def test_write_manifest_records_output_hashes_only(tmp_path) -> None:
    stage = tmp_path / "pretrain"
    make_stage(stage)
    manifest = write_manifest(stage, {"stage": "pretrain", "fingerprint": "abc", "metrics": {"eval_loss": 1.5}})
    assert manifest["status"] == "complete"
    assert manifest["finished"] and manifest["version"]
    assert manifest["outputs"] == {
        "config.json": sha256_file(stage / "config.json"),
        "model.safetensors": sha256_file(stage / "model.safetensors"),
        "sub/nested.txt": sha256_file(stage / "sub" / "nested.txt"),
    }, "checkpoints, metrics.jsonl, the manifest itself and dotfiles are not outputs"
    on_disk = read_manifest(stage)
    assert on_disk == manifest
    assert on_disk["metrics"] == {"eval_loss": 1.5} and on_disk["fingerprint"] == "abc"
    # Rewriting does not make the manifest an output of itself.
    assert "manifest.json" not in write_manifest(stage, {"stage": "pretrain"})["outputs"]
    assert not [p for p in stage.iterdir() if ".tmp" in p.name]


def test_sha256_file_matches_hashlib(tmp_path) -> None:
    import hashlib

    path = tmp_path / "big.bin"
    data = os.urandom((1 << 20) + 17)  # more than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_verify_outputs_detects_flipped_byte_and_missing_file(tmp_path) -> None:
    stage = tmp_path / "sft"
    make_stage(stage)
    manifest = write_manifest(stage, {"stage": "sft"})
    assert verify_outputs(stage, manifest) is None
    # Checkpoints and metrics may change freely.
    (stage / "metrics.jsonl").write_text("", encoding="utf-8")
    (stage / "checkpoints" / "fingerprint").write_text("g", encoding="utf-8")
    assert verify_outputs(stage, manifest) is None

    weights = stage / "model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[100] ^= 0x01
    weights.write_bytes(bytes(flipped))
    problem = verify_outputs(stage, manifest)
    assert problem and str(weights) in problem and "modified" in problem
    weights.write_bytes(original)
    assert verify_outputs(stage, manifest) is None

    (stage / "sub" / "nested.txt").unlink()
    problem = verify_outputs(stage, manifest)
    assert problem and str(stage / "sub" / "nested.txt") in problem and "missing" in problem


def test_read_manifest_missing_and_corrupted(tmp_path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"status": "compl', encoding="utf-8")
    with pytest.raises(ArtifactError) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_metrics_append_read_truncate(tmp_path) -> None:
    for step in range(1, 6):
        append_metrics(tmp_path, {"step": step, "loss": 1.0 / step})
    append_metrics(tmp_path, {"step": 5, "eval_loss": 0.5})
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 5]
    truncate_metrics(tmp_path, 3)
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[2]["loss"] == pytest.approx(1 / 3)
    assert read_metrics(tmp_path / "nowhere") == []
    truncate_metrics(tmp_path / "nowhere", 3)  # no file: nothing to do


# ----------------------------------------------------------------------------- RunLock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_exclusive_within_a_process(tmp_path) -> None:
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        holder = json.loads((tmp_path / "run" / ".lock").read_text(encoding="utf-8"))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ArtifactError) as info:
            RunLock(tmp_path / "run").acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert str(tmp_path / "run") in message
    finally:
        lock.release()
    assert not (tmp_path / "run" / ".lock").exists()
    with RunLock(tmp_path / "run"):  # free again
        assert (tmp_path / "run" / ".lock").is_file()
    assert not (tmp_path / "run" / ".lock").exists()


def test_lock_released_when_the_body_raises(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with RunLock(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / ".lock").exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path) -> None:
    pid = dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}), encoding="utf-8")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text(encoding="utf-8"))["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_lock_of_a_live_process_is_refused(tmp_path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "x"}), encoding="utf-8")
        with pytest.raises(ArtifactError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / ".lock").read_text(encoding="utf-8"))["pid"] == sleeper.pid, "the holder's lock is kept"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_from_another_host_is_not_taken_over(tmp_path) -> None:
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": "some-other-host", "since": "x"}), encoding="utf-8")
    with pytest.raises(ArtifactError, match="some-other-host"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").exists()


def test_unreadable_lock_is_refused_with_a_hint(tmp_path) -> None:
    (tmp_path / ".lock").write_text("", encoding="utf-8")  # e.g. killed between create and write
    with pytest.raises(ArtifactError) as info:
        RunLock(tmp_path).acquire()
    assert str(tmp_path / ".lock") in str(info.value)


def test_artifact_error_is_a_user_error() -> None:
    assert issubclass(ArtifactError, UserError)


# ----------------------------------------------------------------------------- the stage transaction


def hashes(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def complete_stage(folder, content: str) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_text(content)
    write_manifest(folder, {"stage": "s"})
    return hashes(folder)


def test_recover_swap_settles_every_state_a_crash_can_leave(tmp_path) -> None:
    final, building, aside = tmp_path / "s", building_dir(tmp_path, "s"), aside_dir(tmp_path, "s")

    old = complete_stage(final, "old")  # nothing to do
    recover_swap(tmp_path, "s")
    assert hashes(final) == old

    new = complete_stage(building, "new")  # the manifest was written, the swap not begun
    recover_swap(tmp_path, "s")
    assert hashes(final) == new and not building.exists() and not aside.exists()

    final.rename(aside)  # the old one renamed aside, the new one's build not complete: put the old back
    building.mkdir()
    (building / "checkpoints").mkdir()
    recover_swap(tmp_path, "s")
    assert hashes(final) == new and not aside.exists() and (building / "checkpoints").is_dir()

    final.rename(aside)  # the old one renamed aside, the new one complete: finish the swap
    newer = complete_stage(tmp_path / "newer", "newer")
    os.rmdir(building / "checkpoints")
    os.rmdir(building)
    (tmp_path / "newer").rename(building)
    recover_swap(tmp_path, "s")
    assert hashes(final) == newer and not aside.exists() and not building.exists()

    aside.mkdir()  # the swap ended, deleting the old one did not
    (aside / "half-deleted").write_text("x")
    recover_swap(tmp_path, "s")
    assert hashes(final) == newer and not aside.exists()


def test_swap_in_replaces_the_stage_folder_and_leaves_nothing_aside(tmp_path) -> None:
    complete_stage(tmp_path / "s", "old")
    new = complete_stage(building_dir(tmp_path, "s"), "new")
    swap_in(tmp_path, "s")
    assert hashes(tmp_path / "s") == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_nonfinite_weights_names_the_file_and_tensor(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3), "steps": torch.arange(3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    save_file({"a": torch.full((2,), float("nan"))}, str(tmp_path / "checkpoints" / "checkpoint-1" / "model.safetensors"))
    assert nonfinite_weights(tmp_path) is None, "checkpoints are not outputs"
    (tmp_path / "value").mkdir()
    save_file({"b": torch.tensor([0.0, float("inf")])}, str(tmp_path / "value" / "model.safetensors"))
    assert nonfinite_weights(tmp_path) == f"{tmp_path / 'value' / 'model.safetensors'}: tensor b holds NaN or inf"
