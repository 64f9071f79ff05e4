"""The reward and PPO stages end to end on the CPU, in a tiny pipeline (tokenizer -> pretrain -> sft
-> reward -> ppo): the reward model's held-out accuracy and stored normalisation, PPO's logged
columns and saved models, resuming PPO from its checkpoint along the same curve (after SIGTERM and
SIGKILL). The RL driver's other behaviours, through the same stage, are in test_rl_driver.py.

One run is shared by the session (`tiny_rlhf` in conftest); tests that change a run work on a copy
of its directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.artifacts import building_dir, read_manifest, read_metrics, verify_outputs
from rlhf.cli import main

from pipeline_helpers import PPO_STEPS, ROLLOUT, at_rl_update, clone, max_weight_diff, run, run_killed

# Tiny policies give noisy k1 estimates; the stage's negative-KL warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "pretrain", "sft", "reward", "ppo")
WEIGHT_ATOL = 1e-5  # a resumed run must reproduce the uninterrupted one's weights to float32 rounding
METRIC_ATOL = 1e-5
PPO_COLUMNS = (
    "step", "score", "rm_score", "kl", "beta", "entropy", "response_length", "stopped", "policy_loss", "value_loss",
    "clipfrac", "value_clipfrac", "approx_kl", "explained_variance", "time_generate", "time_score", "time_update", "judge",
)  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_rlhf):
    """The session's tiny pipeline run (`write_tiny_rlhf`, with the report stage)."""
    return tiny_rlhf


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- reward stage


def test_all_five_stages_complete(base) -> None:
    for stage in STAGES:
        assert f"[{stage}] running" in base.out and f"[{stage}] done" in base.out
        manifest = read_manifest(base.run_dir / stage)
        assert manifest["status"] == "complete" and verify_outputs(base.run_dir / stage, manifest) is None
    assert read_manifest(base.run_dir / "ppo")["upstream"].keys() == {"sft", "reward"}
    assert read_manifest(base.run_dir / "reward")["upstream"].keys() == {"sft"}


def test_reward_metrics_and_stored_normalisation(base) -> None:
    from transformers import AutoModelForSequenceClassification

    from rlhf.model import RlhfForSequenceClassification

    metrics = read_manifest(base.run_dir / "reward")["metrics"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_pairs"] == 8 and metrics["train_pairs"] == 40
    assert metrics["steps"] == 3 and math.isfinite(metrics["eval_margin"])
    stored = json.loads((base.run_dir / "reward" / "config.json").read_text(encoding="utf-8"))
    assert stored.get("reward_mean", 0.0) == 0.0 and stored.get("reward_std", 1.0) == 1.0, "folded into the head"
    assert stored["folded_reward_mean"] == pytest.approx(metrics["reward_mean"])
    assert stored["folded_reward_std"] == pytest.approx(metrics["reward_std"])
    assert math.isfinite(metrics["reward_mean"]) and metrics["reward_std"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(base.run_dir / "reward")
    assert isinstance(model, RlhfForSequenceClassification) and model.config.num_labels == 1
    assert model.config.folded_reward_std == pytest.approx(metrics["reward_std"])
    assert "held-out pairwise accuracy" in base.out


def test_reward_model_head_outputs_normalised_scores(base) -> None:
    """The saved reward model scores the init policy's normalisation samples (re-drawn here as the stage
    drew them) with mean 0 and std 1 straight from its head, and RewardScorer does not normalise again."""
    import statistics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import load_pipeline
    from rlhf.responses import sample_responses
    from rlhf.scoring import RewardScorer
    from rlhf.stages.reward import read_inputs

    config = load_pipeline(base.pipeline).stages["reward"]
    prompts = [pair["prompt"] for pair in read_inputs(config)[0]]
    random.Random(0).shuffle(prompts)  # the pipeline's seed
    prompts = prompts[: config.norm_prompts]
    policy = AutoModelForCausalLM.from_pretrained(base.run_dir / config.init)
    tokenizer = AutoTokenizer.from_pretrained(base.run_dir / config.init)
    responses = sample_responses(policy, tokenizer, prompts, config.norm_max_new_tokens, temperature=1.0, seed=0)
    scorer = RewardScorer(base.run_dir / "reward", device="cpu")
    raw = scorer.score(prompts, responses, normalised=False)
    assert statistics.fmean(raw) == pytest.approx(0.0, abs=1e-5) and statistics.pstdev(raw) == pytest.approx(1.0, abs=1e-5)
    assert scorer.score(prompts, responses) == raw


def test_reward_accuracy_rescored_from_the_saved_model(base) -> None:
    """The manifest's accuracy is what RewardScorer gives on the last 8 rows (the held-out split)."""
    from rlhf.data import preference_pairs, read_rows
    from rlhf.scoring import RewardScorer

    data = base.folder / "preferences.jsonl"
    pairs, _ = preference_pairs(data, read_rows(data)[-8:])
    scorer = RewardScorer(base.run_dir / "reward", device="cpu")
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs], normalised=False)
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs], normalised=False)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert read_manifest(base.run_dir / "reward")["metrics"]["eval_accuracy"] == pytest.approx(accuracy)


def test_reward_killed_at_a_random_step_resumes_to_the_same_model(base, tmp_path, capsys) -> None:
    """SIGKILL at the end of a random reward step (1-2 of 3; a checkpoint every step) loses at most that
    step: the same command ends with the uninterrupted run's weights and normalisation (atol 1e-5)."""
    step = random.randint(1, 2)
    run_dir = clone(base, tmp_path)
    for stage in ("reward", "ppo"):
        shutil.rmtree(run_dir / stage)
    run_killed(base.pipeline, "--run-dir", run_dir, "--only", "reward", step=step)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "reward")
    assert code == 0, err[-3000:]
    resumed = f"resuming from {building_dir(run_dir, 'reward') / 'checkpoints' / f'checkpoint-{step - 1}'}"
    assert (resumed in out) if step > 1 else ("resuming from" not in out), f"killed at step {step}"
    diff = max_weight_diff(run_dir / "reward" / "model.safetensors", base.run_dir / "reward" / "model.safetensors")
    assert diff <= WEIGHT_ATOL, f"killed at step {step}: max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"
    again, original = (read_manifest(folder / "reward")["metrics"] for folder in (run_dir, base.run_dir))
    for key in ("reward_mean", "reward_std", "eval_accuracy"):
        assert again[key] == pytest.approx(original[key], abs=METRIC_ATOL), f"killed at step {step}: {key}"


# ----------------------------------------------------------------------------- ppo stage


def test_ppo_logs_every_iteration(base) -> None:
    rows = read_metrics(base.run_dir / "ppo")
    assert [row["step"] for row in rows] == list(range(1, PPO_STEPS + 1))
    for row in rows:
        missing = [key for key in PPO_COLUMNS if key not in row]
        assert not missing, f"step {row['step']}: missing {missing}"
        for key in PPO_COLUMNS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), f"step {row['step']}: {key}={row[key]!r}"
        assert row["episodes"] == row["step"] * ROLLOUT
        assert row["beta"] == pytest.approx(0.05), "default fixed kl_coef"
        assert 0 < row["response_length"] <= 8 and 0 <= row["stopped"] <= 1 and 0 <= row["judge"] <= 1
        assert 0 <= row["clipfrac"] <= 1 and 0 <= row["value_clipfrac"] <= 1
    assert abs(rows[0]["kl"]) < 1e-5, "iteration 1 samples from the untouched policy: KL to the reference is 0"


def test_ppo_normalises_scores_under_the_sft_policys_ppo_samples(base) -> None:
    """Measured once before training, on 32 responses sampled as rollouts are: printed, in the first
    metrics row and the stage's metrics, and kept in every checkpoint for a resumed run."""
    rows = read_metrics(base.run_dir / "ppo")
    metrics = read_manifest(base.run_dir / "ppo")["metrics"]
    figures = {key: rows[0][key] for key in ("score_norm_mean", "score_norm_std", "score_norm_samples")}
    assert 2 <= figures["score_norm_samples"] <= 32 and figures["score_norm_std"] > 0
    assert {key: metrics[key] for key in figures} == figures
    assert not any(key in row for row in rows[1:] for key in figures), "logged once, in the first row"
    assert f"[ppo] scores normalised over {figures['score_norm_samples']} of 32 SFT-policy responses" in base.out
    state = json.loads((base.run_dir / "ppo" / "checkpoints" / "step-2" / "state.json").read_text())
    saved = state["score_normalisation"]
    assert (saved["mean"], saved["std"], saved["samples"], saved["responses"]) == (*figures.values(), 32)


def test_ppo_saves_policy_value_and_evaluation(base) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.model import RlhfForCausalLM, RlhfForSequenceClassification

    ppo = base.run_dir / "ppo"
    policy = AutoModelForCausalLM.from_pretrained(ppo)
    assert isinstance(policy, RlhfForCausalLM)
    assert (ppo / "tokenizer.json").is_file()
    assert (ppo / "value").is_dir()
    value = AutoModelForSequenceClassification.from_pretrained(ppo / "value")
    assert isinstance(value, RlhfForSequenceClassification)
    sft = weights(base.run_dir / "sft" / "model.safetensors")
    assert any(not torch.equal(p, sft[name]) for name, p in weights(ppo / "model.safetensors").items()), "PPO changed the policy"
    manifest = read_manifest(ppo)
    assert "value/model.safetensors" in manifest["outputs"]
    assert not [name for name in manifest["outputs"] if name.startswith("checkpoints/")]
    metrics = manifest["metrics"]
    for key in ("eval_judge", "eval_judge_sft", "eval_kl", "eval_rm_score", "eval_rm_score_sft"):
        assert isinstance(metrics.get(key), float), f"{key}: {metrics.get(key)!r}"
    assert 0 <= metrics["eval_judge"] <= 1 and 0 <= metrics["eval_judge_sft"] <= 1
    assert metrics["eval_kl_sft"] == pytest.approx(0.0, abs=1e-5), "the SFT policy's KL to itself"
    assert metrics["iterations"] == PPO_STEPS and metrics["episodes"] == PPO_STEPS * ROLLOUT
    assert (ppo / "checkpoints" / "step-2").is_dir() and not (ppo / "checkpoints" / "step-4").exists()


def interrupted_copy(base, tmp_path: Path) -> Path:
    """A copy of the run as if PPO had been stopped after its step-2 checkpoint (in the layout of an older
    version, which built in the stage folder: the next build takes that folder over as its staging folder)."""
    run_dir = clone(base, tmp_path)
    ppo = run_dir / "ppo"
    (ppo / "manifest.json").unlink()
    (ppo / "model.safetensors").unlink()
    shutil.rmtree(ppo / "checkpoints" / "step-4", ignore_errors=True)
    assert (ppo / "checkpoints" / "step-2" / "state.json").is_file()
    return run_dir


@pytest.fixture(scope="module")
def resumed(base, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resumed")
    run_dir = interrupted_copy(base, tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", base.pipeline, "--run-dir", str(run_dir)])
    assert code == 0, err.getvalue()[-3000:]
    return SimpleNamespace(run_dir=run_dir, out=out.getvalue())


def test_ppo_resumes_from_checkpoint_along_the_same_curve(base, resumed) -> None:
    out = resumed.out
    assert "resuming from" in out and "step-2" in out, out[-2000:]
    for stage in ("tokenizer", "pretrain", "sft", "reward"):
        assert f"[{stage}] up to date" in out
    assert read_manifest(resumed.run_dir / "ppo")["status"] == "complete"
    diff = max_weight_diff(resumed.run_dir / "ppo" / "model.safetensors", base.run_dir / "ppo" / "model.safetensors")
    assert diff <= WEIGHT_ATOL, f"resumed policy differs from the uninterrupted run's: max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"
    diff = max_weight_diff(resumed.run_dir / "ppo" / "value" / "model.safetensors", base.run_dir / "ppo" / "value" / "model.safetensors")
    assert diff <= WEIGHT_ATOL, f"resumed value model differs: max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"
    original, again = read_metrics(base.run_dir / "ppo"), read_metrics(resumed.run_dir / "ppo")
    assert [row["step"] for row in again] == list(range(1, PPO_STEPS + 1)), "steps 3-4 logged once, after resuming"
    assert again[:2] == original[:2], "rows before the checkpoint are kept as they were"
    for new, old in zip(again[2:], original[2:]):
        for key in ("score", "rm_score", "kl", "beta", "judge", "response_length", "policy_loss", "value_loss", "lr"):
            assert new[key] == pytest.approx(old[key], abs=METRIC_ATOL), f"step {new['step']} {key}: {new[key]} vs {old[key]} (atol {METRIC_ATOL})"


def test_sigterm_saves_a_checkpoint_after_the_iteration_and_resumes(base, tmp_path, capsys, monkeypatch) -> None:
    """SIGTERM during iteration 3 (checkpoints every 2): step-3 is saved, the run exits 130 and the same
    command ends with the uninterrupted run's policy (atol 1e-5)."""
    import signal

    run_dir = interrupted_copy(base, tmp_path)
    shutil.rmtree(run_dir / "ppo" / "checkpoints" / "step-2")
    with monkeypatch.context() as patch:
        at_rl_update(patch, 3, lambda: signal.raise_signal(signal.SIGTERM))
        code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo")
    checkpoint = building_dir(run_dir, "ppo") / "checkpoints" / "step-3"
    assert code == 130 and f"[ppo] stopped by SIGTERM; saved {checkpoint}" in err, err[-3000:]
    assert (checkpoint / "state.json").is_file() and read_manifest(run_dir / "ppo") is None
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo")
    assert code == 0 and f"resuming from {checkpoint}" in out, err[-3000:]
    diff = max_weight_diff(run_dir / "ppo" / "model.safetensors", base.run_dir / "ppo" / "model.safetensors")
    assert diff <= WEIGHT_ATOL, f"max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"


def test_ppo_killed_at_a_random_iteration_resumes_to_the_same_models(base, tmp_path, capsys) -> None:
    """SIGKILL during the update of a random PPO iteration (1-4; checkpoints every 2) loses at most the
    iterations since the last checkpoint: the same command ends with the uninterrupted run's policy and
    value model (atol 1e-5)."""
    step = random.randint(1, PPO_STEPS)
    run_dir = clone(base, tmp_path)
    shutil.rmtree(run_dir / "ppo")
    run_killed(base.pipeline, "--run-dir", run_dir, "--only", "ppo", step=step, event="rl_update")
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo")
    assert code == 0, err[-3000:]
    resumed = f"resuming from {building_dir(run_dir, 'ppo') / 'checkpoints' / 'step-2'}"
    assert (resumed in out) if step > 2 else ("resuming from" not in out), f"killed in iteration {step}"
    for model in ("model.safetensors", "value/model.safetensors"):
        diff = max_weight_diff(run_dir / "ppo" / model, base.run_dir / "ppo" / model)
        assert diff <= WEIGHT_ATOL, f"killed in iteration {step}: {model} max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"


def test_resumed_eval_metrics_equal_the_uninterrupted_run(base, resumed) -> None:
    original = read_manifest(base.run_dir / "ppo")["metrics"]
    again = read_manifest(resumed.run_dir / "ppo")["metrics"]
    for key in ("eval_judge", "eval_kl", "eval_rm_score", "beta", "iterations"):
        assert again[key] == pytest.approx(original[key], abs=METRIC_ATOL), key
    for key in ("score_norm_mean", "score_norm_std", "score_norm_samples"):
        assert again[key] == original[key], f"{key}: the checkpoint's figures, not measured again"
    assert "scores normalised over" not in resumed.out


def test_resumed_manifest_keeps_the_sft_baseline(base, resumed) -> None:
    original = read_manifest(base.run_dir / "ppo")["metrics"]
    again = read_manifest(resumed.run_dir / "ppo")["metrics"]
    baseline = sorted(key for key in original if key.endswith("_sft"))
    assert baseline, "the uninterrupted run reports the SFT baseline"
    assert {key: again.get(key) for key in baseline} == pytest.approx({key: original[key] for key in baseline}, abs=METRIC_ATOL)
