"""The artifact directory: one folder per stage, a manifest written last, a lock per run.

    <run_dir>/<stage>/             save_pretrained layout (config, safetensors, tokenizer files)
    <run_dir>/<stage>/manifest.json stage, status, config, input and output hashes, times, metrics
    <run_dir>/<stage>/metrics.jsonl one JSON object per logged step
    <run_dir>/<stage>/checkpoints/  the training state its build saved (the trainer's checkpoint-N folders)
    <run_dir>/.<stage>.building/    a build in progress, same layout; its checkpoints/ resume an interrupted build
    <run_dir>/.<stage>.old/         a replaced stage folder, there only while a swap is under way

A stage is complete when its manifest says so and every output still has its recorded hash.
Everything is written to a temporary file and renamed, so a crash never leaves a half-written
manifest. Artifacts are read as JSON and safetensors only.

A stage is built as a transaction: `begin_build` gives it `.<stage>.building/` to write into, the
manifest is written there last, and `swap_in` renames the old stage folder aside, the new one in,
and deletes the old. A complete stage therefore stays complete and loadable until its replacement
is complete; a build that fails leaves it exactly as it was. A crash in the middle of a swap leaves
one of the states that `recover_swap` settles on the next run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from rlhf import __version__
from rlhf.data import jsonl_objects
from rlhf.errors import ArtifactError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
"""A stage's TensorBoard event files (`report_to: tensorboard`): logs like metrics.jsonl, not outputs."""
LOCK = ".lock"
MODEL_CARD = "README.md"
"""The stage folder's model card: written before the manifest, but not an output (editing it changes nothing)."""
NOT_OUTPUTS = {MANIFEST, METRICS, MODEL_CARD}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain(value: Any) -> Any:
    """`value` as JSON data (tuples become lists), as a manifest records it."""
    return json.loads(json.dumps(value))


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`.
    On failure (`path` a directory, a full disk, ...) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


CAUSAL_LM = "RlhfForCausalLM"
REWARD_MODEL = "RlhfForSequenceClassification"
GPT2 = "GPT2LMHeadModel"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def check_model_dir(path: str | Path, architecture: str, what: str) -> dict:
    """Refuse `path` unless it is a sound save_pretrained folder of `architecture`; return its config.

    Every command that loads a model asks here first, so a bad folder is one `ArtifactError` naming the
    file and the problem rather than a traceback from transformers: config.json must be a JSON object
    naming `architecture` (e.g. RlhfForCausalLM), every safetensors file's header must read and hold
    floating tensors, tokenizer.json (if any) must be a tokenizer, and a completed stage of a run
    directory must still match its manifest's hashes (checked first, so the error names the stage).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such directory"
        raise ArtifactError(f"{path}: {problem}; expected {what}")
    if not config_path.is_file():
        raise ArtifactError(f"{path}: not a model directory (no config.json); expected {what}")
    config = read_json_object(config_path)
    found = config.get("architectures") or []
    if not isinstance(found, list) or architecture not in found:
        found_text = ", ".join(map(str, found)) if isinstance(found, list) else repr(found)
        raise ArtifactError(f"{path}: expected {what} ({architecture}), found {found_text or 'no architecture'}")
    manifest = complete_manifest(path)
    if manifest:
        problem = verify_outputs(path, manifest)
        if problem:
            stage = manifest.get("stage", path.name)
            raise ArtifactError(f"{problem}; re-run the stage with `rlhf run --from {stage}`")
    for weights in weight_files(path):
        check_safetensors(weights)
    if (path / "tokenizer.json").exists():
        check_tokenizer_file(path / "tokenizer.json")
    return config


def check_tokenizer_file(path: Path) -> None:
    """Refuse a tokenizer.json that is not JSON, or is JSON but not a tokenizer (`tokenizers` names the
    missing or malformed field); reads the file, loads no model."""
    from tokenizers import Tokenizer

    read_json_object(path)
    try:
        Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArtifactError(f"{path}: not a tokenizer that `tokenizers` loads ({first_line})") from None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; errors name the file, the line and the problem."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ArtifactError(f"{path}: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def weight_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards its index names; refuses a folder with neither."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.exists() or not index.is_file():
        if not single.is_file():
            raise ArtifactError(f"{single}: missing (the model's weights); the folder is incomplete")
        return [single]
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ArtifactError(f"{index}: no 'weight_map' object")
    return [model_dir / name for name in sorted(set(weight_map.values()))]


def check_safetensors(path: Path) -> None:
    """Read a safetensors file's header (not its tensors): complete, and every tensor floating."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ArtifactError(f"{path}: missing (the model's weights); the folder is incomplete")
    try:
        with safe_open(path, framework="numpy") as weights:
            dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
    except SafetensorError as error:
        raise ArtifactError(f"{path}: not a readable safetensors file ({error})") from None
    if not dtypes:
        raise ArtifactError(f"{path}: holds no tensors")
    bad = {name: dtype for name, dtype in dtypes.items() if dtype not in FLOAT_DTYPES}
    if bad:
        name, dtype = next(iter(bad.items()))
        raise ArtifactError(f"{path}: tensor {name!r} has dtype {dtype}; expected floating weights")


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: corrupted manifest (not JSON); re-run the stage with --force") from None
    return manifest if isinstance(manifest, dict) else None


def output_files(stage_dir: str | Path) -> dict[str, str]:
    """sha256 of every output file of a stage (checkpoints, manifest, metrics and tracker logs excluded)."""
    stage_dir = Path(stage_dir)
    hashes = {}
    for path in sorted(stage_dir.rglob("*")):
        relative = path.relative_to(stage_dir)
        if path.is_file() and relative.parts[0] not in (CHECKPOINTS, TENSORBOARD_DIR) and path.name not in NOT_OUTPUTS and not path.name.startswith("."):
            hashes[relative.as_posix()] = sha256_file(path)
    return hashes


def verify_outputs(stage_dir: str | Path, manifest: dict) -> str | None:
    """None if every recorded output exists with its hash, else a description of the first problem."""
    stage_dir = Path(stage_dir)
    for name, digest in manifest.get("outputs", {}).items():
        path = stage_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} was modified or corrupted (sha256 differs from the manifest)"
    return None


def write_manifest(stage_dir: str | Path, manifest: dict) -> dict:
    """Complete `manifest` with output hashes and the package version; write it atomically, last."""
    manifest = {**manifest, "status": "complete", "version": __version__, "finished": now()}
    manifest["outputs"] = output_files(stage_dir)
    atomic_write_text(Path(stage_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def complete_manifest(stage_dir: str | Path) -> dict | None:
    """The manifest of `stage_dir` if it marks the stage complete (written last, by `write_manifest`),
    else None: the one test of "is this stage complete?"."""
    manifest = read_manifest(stage_dir)
    return manifest if manifest and manifest.get("status") == "complete" else None


def is_complete(stage_dir: str | Path) -> bool:
    return complete_manifest(stage_dir) is not None


def building_dir(run_dir: str | Path, stage: str) -> Path:
    """Where stage `stage` is being (re)built; hidden, so that nothing reads it as a stage."""
    return Path(run_dir) / f".{stage}.building"


def aside_dir(run_dir: str | Path, stage: str) -> Path:
    """Where a swap puts the stage folder it replaces, until the new one is in place."""
    return Path(run_dir) / f".{stage}.old"


def _sync_dir(folder: Path) -> None:
    """Flush `folder`'s entries (renames) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_build(run_dir: str | Path, stage: str) -> Path:
    """The staging folder of a (re)build of `stage`, holding nothing but an interrupted build's
    checkpoints, metrics and TensorBoard logs (which the stage resumes or discards by their fingerprint).

    A stage folder without a complete manifest (left by an interrupted build of an older version) is
    taken over as the staging folder, so that its checkpoints resume too.
    """
    final, building = Path(run_dir) / stage, building_dir(run_dir, stage)
    if not building.exists() and final.is_dir() and not is_complete(final):
        os.rename(final, building)
    building.mkdir(parents=True, exist_ok=True)
    for path in building.iterdir():
        if path.name in (CHECKPOINTS, METRICS, TENSORBOARD_DIR):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return building


def swap_in(run_dir: str | Path, stage: str) -> None:
    """Replace the stage folder with its complete staging folder: rename the old one aside, the new
    one in, delete the old. Each step is one rename, so every state a crash can leave holds one complete
    stage folder (`recover_swap` settles it)."""
    run_dir = Path(run_dir)
    final, building, aside = run_dir / stage, building_dir(run_dir, stage), aside_dir(run_dir, stage)
    if final.exists():
        os.rename(final, aside)
    os.rename(building, final)
    _sync_dir(run_dir)
    shutil.rmtree(aside, ignore_errors=True)


def recover_swap(run_dir: str | Path, stage: str) -> None:
    """Settle what a crash during `swap_in` (or before it, once the staging manifest was written) left:

        .old and the stage folder      the swap ended: delete .old
        .old, no stage folder          finish the swap with a complete staging folder, else put .old back
        a complete staging folder      its manifest was written, the swap not begun: swap it in
    """
    run_dir = Path(run_dir)
    final, building, aside = run_dir / stage, building_dir(run_dir, stage), aside_dir(run_dir, stage)
    if aside.exists() and final.exists():
        shutil.rmtree(aside)
    if aside.exists():
        os.rename(building if is_complete(building) else aside, final)
        _sync_dir(run_dir)
        shutil.rmtree(aside, ignore_errors=True)
    if is_complete(building):
        swap_in(run_dir, stage)


def nonfinite_weights(stage_dir: str | Path) -> str | None:
    """None if every floating-point tensor of the stage's *.safetensors outputs is finite, else the first
    file and tensor that holds a NaN or inf."""
    import torch
    from safetensors import safe_open

    stage_dir = Path(stage_dir)
    for path in sorted(stage_dir.rglob("*.safetensors")):
        if path.relative_to(stage_dir).parts[0] == CHECKPOINTS:
            continue
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"{path}: tensor {key} holds NaN or inf"
    return None


def append_metrics(stage_dir: str | Path, row: dict) -> None:
    with open(Path(stage_dir) / METRICS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")


def truncate_metrics(stage_dir: str | Path, last_step: int) -> None:
    """Drop logged rows past `last_step` (a resumed run logs those steps again)."""
    path = Path(stage_dir) / METRICS
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(stage_dir: str | Path) -> list[dict]:
    path = Path(stage_dir) / METRICS
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ArtifactError(f"{path}: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
    return jsonl_objects(text, path, ArtifactError)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: `.lock` holds the holder's pid and host.

    A lock left by a dead process on this host is taken over; a live holder makes `acquire` raise.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK

    def holder(self) -> dict | None:
        """Who holds the lock ({} if its file is unreadable), or None if it is free: no lock file, or one
        left by a dead process on this host (stale). Reads only: `rlhf run --dry-run` asks here."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}
        if not isinstance(holder, dict):
            return {}
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(holder.get("pid"), int) and not _process_alive(holder["pid"]):
            return None
        return holder

    def in_use(self, holder: dict) -> str:
        return (
            f"{self.path.parent}: in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}; wait for it or delete {self.path} if that process is gone"
        )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise ArtifactError(self.in_use(holder)) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            return
        raise ArtifactError(f"{self.path}: could not take over a stale lock")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
