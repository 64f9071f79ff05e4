"""Shared tiny fixtures: configs and models small enough for a 2-core CPU."""

from __future__ import annotations

import os
import sys

import pytest

# One intra-op thread: these models are too small to gain from more, and on a shared 2-core
# machine OpenMP's spinning threads make every tiny matmul ~15x slower under load. Set before
# torch is imported (subprocesses inherit it); an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = dict(vocab_size=96, n_positions=48, n_embd=32, n_layer=2, n_head=4)


def make_config(**overrides):
    from rlhf.model import RlhfConfig

    return RlhfConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_config():
    """A fresh tiny `RlhfConfig` (vocab 96, context 48, 2 layers, 4 heads, width 32)."""
    return make_config()


@pytest.fixture
def tiny_lm(tiny_config):
    """A seeded, randomly initialised `RlhfForCausalLM` in eval mode."""
    import torch

    from rlhf.model import RlhfForCausalLM

    torch.manual_seed(0)
    return RlhfForCausalLM(tiny_config).eval()


def randomize_(model, scale: float = 0.3, seed: int = 0):
    """Add seeded noise to every parameter (LayerNorms included), in place; return `model`.

    The default init (std 0.02, LayerNorm 1/0) gives near-uniform logits, under which a
    swapped or mis-transposed weight can hide inside a 1e-4 tolerance; noise makes it show.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one parameter, perturbed once
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def tiny_ppo_models(seed: int = 0):
    """RLModels of tiny randomised float32 models: the policy, an identical reference, a reward
    model and a value model; a stand-in tokenizer (pad 0, EOS 1)."""
    import copy
    from types import SimpleNamespace

    import torch

    from rlhf.model import RlhfForCausalLM, RlhfForSequenceClassification
    from rlhf.rl_models import RLModels

    torch.manual_seed(seed)
    config = make_config(pad_token_id=0, eos_token_id=1)
    policy = randomize_(RlhfForCausalLM(config), seed=seed).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    reward = randomize_(RlhfForSequenceClassification(config), seed=seed + 1).eval().requires_grad_(False)
    value = randomize_(RlhfForSequenceClassification(config), seed=seed + 2).eval()
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    return RLModels(policy=policy, value=value, reward=reward, reference=reference, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_rlhf(tmp_path_factory):
    """One finished tiny pipeline (tokenizer -> pretrain -> sft -> reward -> ppo -> report) for the
    whole session; tests that change a run work on a copy (`pipeline_helpers.clone`)."""
    from pipeline_helpers import run_once, write_tiny_rlhf

    folder = tmp_path_factory.mktemp("tiny_rlhf")
    return run_once(write_tiny_rlhf(folder), folder)


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory):
    """One finished tiny tokenizer -> pretrain -> sft pipeline (tests/fixtures/tiny.yaml on data subsets) for
    the whole session; tests that change a run work on a copy (`pipeline_helpers.clone`)."""
    from pipeline_helpers import run_once, write_tiny_sft

    folder = tmp_path_factory.mktemp("tiny_sft")
    return run_once(write_tiny_sft(folder), folder)


@pytest.fixture(scope="session")
def tiny_dpo(tmp_path_factory):
    """The tiny pipeline's first stages, then DPO from its SFT policy (`pipeline_helpers.write_tiny_dpo`), run once."""
    from pipeline_helpers import run_once, write_tiny_dpo

    folder = tmp_path_factory.mktemp("tiny_dpo")
    return run_once(write_tiny_dpo(folder), folder)


@pytest.fixture(scope="session")
def tiny_critic_free(tiny_rlhf, tmp_path_factory):
    """The three critic-free stages run once, uninterrupted, on a copy of the session's tiny run
    (`pipeline_helpers.write_tiny_critic_free`: PPO and the report dropped)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from pipeline_helpers import clone, write_tiny_critic_free
    from rlhf.cli import main

    pipeline = write_tiny_critic_free(tiny_rlhf.folder)
    run_dir = clone(tiny_rlhf, tmp_path_factory.mktemp("critic_free"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", str(pipeline), "--run-dir", str(run_dir)])
    assert code == 0, err.getvalue()[-3000:]
    return SimpleNamespace(pipeline=str(pipeline), run_dir=run_dir, out=out.getvalue(), sft=tiny_rlhf.run_dir / "sft")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, saying so, where there is none."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
