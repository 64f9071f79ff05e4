"""The CUDA path, in tests marked `gpu` (skipped where there is no GPU): bf16 and fp16 training steps
of a Trainer stage, torch.compile, PPO with AMP, greedy generation on the GPU equal to the CPU's, and
the MFU benchmark end to end on a small batch; without a GPU, the benchmark's refusal.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_config, randomize_
from pipeline_helpers import PPO_STEPS, clone, write_tiny_rlhf

pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")
gpu = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def rlhf_run(*args) -> str:
    from rlhf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", *map(str, args)])
    assert code == 0, err.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny pipeline run once on the GPU (amp auto: bf16 where the card has it)."""
    folder = tmp_path_factory.mktemp("cuda")
    pipeline = write_tiny_rlhf(folder, report=False)
    rlhf_run(pipeline)
    return SimpleNamespace(pipeline=pipeline, run_dir=folder / "run")


def rerun(tiny, tmp_path: Path, *args) -> Path:
    """`rlhf run` with ARGS on a copy of the GPU run; returns the copy."""
    run_dir = clone(tiny, tmp_path)
    rlhf_run(tiny.pipeline, "--run-dir", run_dir, *args)
    return run_dir


def training_losses(stage_dir: Path) -> list[float]:
    from rlhf.artifacts import read_metrics

    return [row["loss"] for row in read_metrics(stage_dir) if "loss" in row]


@gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_steps_of_a_trainer_stage(tiny, amp, tmp_path) -> None:
    """Pretraining in bf16 or fp16 (with its gradient scaler) on CUDA: finite losses, fp32 weights saved,
    held-out loss close to the default run's."""
    import torch
    from safetensors.torch import load_file

    from rlhf.artifacts import read_manifest

    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    run_dir = rerun(tiny, tmp_path, "--only", "pretrain", "--force", f"stages.pretrain.amp={amp}")
    losses = training_losses(run_dir / "pretrain")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    weights = load_file(str(run_dir / "pretrain" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values()), "the weights stay fp32 under AMP"
    ours, default = (read_manifest(d / "pretrain")["metrics"]["eval_loss"] for d in (run_dir, tiny.run_dir))
    assert abs(ours - default) < 0.05 * default, (ours, default)


@gpu
def test_compile_trains_like_eager(tiny, tmp_path) -> None:
    """`compile: true` (torch.compile through the Trainer) gives the eager run's losses, to AMP's precision."""
    run_dir = rerun(tiny, tmp_path, "--only", "pretrain", "--force", "stages.pretrain.compile=true")
    compiled, eager = training_losses(run_dir / "pretrain"), training_losses(tiny.run_dir / "pretrain")
    assert len(compiled) == len(eager)
    assert all(abs(a - b) < 0.02 * abs(b) for a, b in zip(compiled, eager)), (compiled, eager)


@gpu
def test_ppo_on_cuda_with_amp(tiny) -> None:
    """Every stage on the GPU; PPO's rollouts and updates under autocast: finite, sane metrics, and the
    first update's importance ratios near 1 (sampling and training log-probs agree)."""
    from rlhf.artifacts import read_manifest, read_metrics

    run_dir = tiny.run_dir
    rows = read_metrics(run_dir / "ppo")
    assert len(rows) == PPO_STEPS
    for row in rows:
        for key in ("score", "kl", "policy_loss", "value_loss", "entropy", "approx_kl"):
            assert math.isfinite(row[key]), (key, row)
        assert row["kl"] >= -0.1 and row["nonfinite_steps"] == 0
    assert rows[0]["ratio_max"] < 1.5 and rows[0]["approx_kl"] < 0.01, rows[0]
    assert math.isfinite(read_manifest(run_dir / "ppo")["metrics"]["eval_rm_score"])


@gpu
def test_ppo_fp16_scaler_trains(tiny, tmp_path) -> None:
    """fp16 PPO: the gradient scaler unscales once before clipping; a scaler-skipped step is counted, not fatal."""
    from rlhf.artifacts import read_metrics

    rows = read_metrics(rerun(tiny, tmp_path, "--only", "ppo", "--force", "stages.ppo.amp=fp16") / "ppo")
    assert len(rows) == PPO_STEPS and all(math.isfinite(row["policy_loss"]) for row in rows)
    assert sum(row["nonfinite_steps"] for row in rows) <= 2, "the scaler skips at most its first overflowing steps"


@gpu
def test_greedy_generation_on_cuda_equals_cpu() -> None:
    import torch

    from rlhf.generation import generate, left_pad
    from rlhf.model import RlhfForCausalLM

    torch.manual_seed(0)
    model = randomize_(RlhfForCausalLM(make_config())).eval()  # peaked distributions: no near-ties
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], 0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # full fp32 on the GPU, as on the CPU
    try:
        cpu = generate(model, ids, mask, 12, eos_token_id=-1, pad_token_id=0, temperature=0.0)
        cuda = generate(model.cuda(), ids.cuda(), mask.cuda(), 12, eos_token_id=-1, pad_token_id=0, temperature=0.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(cuda.sequences.cpu(), cpu.sequences)
    torch.testing.assert_close(cuda.logprobs.cpu(), cpu.logprobs, rtol=0, atol=1e-4)


@gpu
@pytest.mark.slow
def test_mfu_benchmark_runs() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "benchmarks/bench_mfu.py", "--batch-size", "2", "--steps", "3", "--warmup", "2"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    fields = dict(item.split("=", 1) for item in result.stdout.strip().splitlines()[-1].split()[1:])
    assert 0 < float(fields["mfu"]) < 1 and float(fields["bf16_tflops"]) > 0, fields


def test_mfu_benchmark_refuses_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    result = subprocess.run([sys.executable, "benchmarks/bench_mfu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "CUDA" in result.stderr, result.stderr
