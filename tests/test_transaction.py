"""The stage transaction: a stage is rebuilt in `.<stage>.building/` and swapped in only once complete.

For every stage of the tiny pipeline, a rebuild that fails late (after the recipe wrote all its
outputs) leaves the complete stage byte for byte as it was, loadable and skipped by the next run;
weights holding a NaN are never marked complete; and every state a crash in the middle of a swap can
leave is settled by the next run into one complete stage (each state alone: tests/test_artifacts.py).

The runs work on copies (`clone`) of the session's tiny pipeline (`tiny_rlhf` in conftest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf.artifacts import aside_dir, building_dir, read_manifest, sha256_file, verify_outputs
from rlhf.errors import DataError, TrainingDiverged
from rlhf.stages import STAGES, stage_module

from pipeline_helpers import CRITIC_FREE, clone, run

# Tiny policies give noisy k1 estimates; the PPO stage's negative-KL warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (manifest, metrics and checkpoints included)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_loads(stage_dir: Path) -> None:
    """The stage's outputs load: its tokenizer, and its models with the Auto classes."""
    import rlhf  # noqa: F401  (registers the in-house architectures with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    manifest = read_manifest(stage_dir)
    assert manifest["status"] == "complete" and verify_outputs(stage_dir, manifest) is None
    if (stage_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(stage_dir)
    for config in stage_dir.rglob("config.json"):
        if config.relative_to(stage_dir).parts[0] == "checkpoints":
            continue
        architecture = json.loads(config.read_text())["architectures"][0]
        auto = AutoModelForSequenceClassification if "SequenceClassification" in architecture else AutoModelForCausalLM
        auto.from_pretrained(config.parent)


def fail(error: BaseException):
    def raise_it():
        raise error

    return raise_it


# Each stage's rebuild fails a different way, after its recipe has written every output: (how the
# rebuild is asked for, the failure, the CLI's exit code or None for an uncaught traceback).
FAILURES = {
    "tokenizer": (("--force",), RuntimeError("a traceback"), None),
    "pretrain": (("stages.pretrain.lr=5e-4",), KeyboardInterrupt(), 130),
    "sft": (("stages.sft.lr=5e-4",), DataError("a library rejected a value"), 2),
    "reward": (("--force",), TrainingDiverged("NaN"), 1),
    "ppo": (("--force",), TypeError("a plug-in with a wrong signature"), None),
    "dpo": (("stages.dpo.beta=0.2",), RuntimeError("a traceback"), None),
    "grpo": (("stages.grpo.lr=5e-4",), KeyboardInterrupt(), 130),
    "rloo": (("--force",), TrainingDiverged("NaN"), 1),
    "reinforce_pp": (("--force",), DataError("a library rejected a value"), 2),
    "report": (("--force",), KeyboardInterrupt(), 130),
}
assert set(FAILURES) == set(STAGES), "every registered stage is tested"


@pytest.mark.parametrize("stage", STAGES)
def test_a_rebuild_that_fails_late_keeps_the_complete_stage(tiny_rlhf, request, tmp_path, capsys, monkeypatch, stage) -> None:
    if stage in CRITIC_FREE or stage == "dpo":  # not in the tiny pipeline: in pipelines of their own
        tiny_rlhf = request.getfixturevalue("tiny_dpo" if stage == "dpo" else "tiny_critic_free")
    run_dir = clone(tiny_rlhf, tmp_path)
    before = hashes(run_dir / stage)
    how, error, exit_code = FAILURES[stage]
    module = stage_module(stage)
    real = module.run

    def run_then_fail(ctx):
        real(ctx)
        assert list(ctx.out_dir.iterdir()), "the recipe wrote its outputs into the staging folder"
        fail(error)()

    with monkeypatch.context() as patch:
        patch.setattr(module, "run", run_then_fail)
        args = (tiny_rlhf.pipeline, "--run-dir", run_dir, "--only", stage, *how)
        if exit_code is None:
            with pytest.raises(type(error)):
                run(capsys, *args)
            capsys.readouterr()
        else:
            code, out, err = run(capsys, *args)
            assert code == exit_code, err[-3000:]
    assert hashes(run_dir / stage) == before, "the complete stage is byte for byte as it was"
    assert_loads(run_dir / stage)
    assert not aside_dir(run_dir, stage).exists()

    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir)
    assert code == 0, err[-3000:]
    assert f"[{stage}] up to date" in out and "running" not in out, out
    assert hashes(run_dir / stage) == before


def test_nonfinite_final_weights_are_not_marked_complete(tiny_rlhf, tmp_path, capsys, monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    run_dir = clone(tiny_rlhf, tmp_path)
    before = hashes(run_dir / "sft")
    module = stage_module("sft")
    real = module.run

    def run_then_poison(ctx):
        metrics = real(ctx)
        path = ctx.out_dir / "model.safetensors"
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name][0] = float("nan")
        save_file(tensors, str(path), metadata={"format": "pt"})
        return metrics

    with monkeypatch.context() as patch:
        patch.setattr(module, "run", run_then_poison)
        code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--only", "sft", "--force")
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NaN or inf" in lines[0] and "model.safetensors" in lines[0], err[-2000:]
    assert read_manifest(building_dir(run_dir, "sft")) is None, "weights with a NaN never look complete"
    assert hashes(run_dir / "sft") == before
    assert_loads(run_dir / "sft")


def test_a_crash_between_the_renames_of_a_swap_is_finished_by_the_next_run(tiny_rlhf, tmp_path, capsys, monkeypatch) -> None:
    """Killed after the old tokenizer folder was renamed aside, before the new one was renamed in:
    the next run swaps the complete new one in and skips it."""
    run_dir = clone(tiny_rlhf, tmp_path)
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == building_dir(run_dir, "tokenizer"):
            raise KeyboardInterrupt  # the process dies here
        real_rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", rename)
        code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--only", "tokenizer", "--force")
    assert code == 130
    assert not (run_dir / "tokenizer").exists() and aside_dir(run_dir, "tokenizer").is_dir()
    new = hashes(building_dir(run_dir, "tokenizer"))
    assert read_manifest(building_dir(run_dir, "tokenizer"))["status"] == "complete"

    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir)
    assert code == 0, err[-3000:]
    assert "running" not in out, out
    assert hashes(run_dir / "tokenizer") == new
    assert not aside_dir(run_dir, "tokenizer").exists() and not building_dir(run_dir, "tokenizer").exists()
    assert_loads(run_dir / "tokenizer")
