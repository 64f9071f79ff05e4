"""The reward and PPO stages end to end on the CPU, in a tiny pipeline (tokenizer -> pretrain -> sft
-> reward -> ppo): the reward model's held-out accuracy and stored normalisation, PPO's logged
columns and saved models, resuming PPO from its checkpoint along the same curve, the KL
controller (fixed 0 as in demo_no_kl, adaptive toward a target), and a score from the reward
functions alone (reward_model_weight 0, as in demo_gold_reward).

One run is shared by the session (`tiny_rlhf` in conftest); tests that change a run work on a copy
of its directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf.artifacts import building_dir, read_manifest, read_metrics, verify_outputs
from rlhf.cli import main

from pipeline_helpers import PPO_STEPS, ROLLOUT, at_rl_update, clone, run, run_killed

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


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[name] - wb[name]).abs().max().item() for name in wa)


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
    assert f"ppo: scores normalised over {figures['score_norm_samples']} of 32 SFT-policy responses" in base.out
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
    assert code == 130 and f"ppo: stopped by SIGTERM; saved {checkpoint}" in err, err[-3000:]
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


def test_checkpoint_keeps_the_fp16_gradient_scaler(tmp_path) -> None:
    """Under fp16 the gradient scaler's scale and growth tracker are resumed, not restarted at 65536."""
    import torch

    from conftest import tiny_ppo_models
    from rlhf.ppo_math import FixedKLController
    from rlhf.rl_training import load_checkpoint, save_checkpoint

    CHECKPOINT_FILES = ("policy.safetensors", "value.safetensors", "optimizer.pt", "state.json")

    models = tiny_ppo_models()
    optimizer = torch.optim.AdamW(list(models.policy.parameters()) + list(models.value.parameters()))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    state = {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 3}
    scaler.load_state_dict(state)
    save_checkpoint(tmp_path / "step-1", models, optimizer, schedule, scaler, FixedKLController(0.1), 1, None)
    assert all((tmp_path / "step-1" / name).is_file() for name in CHECKPOINT_FILES)
    resumed = torch.amp.GradScaler("cpu")
    assert resumed.state_dict() != state
    step, _ = load_checkpoint(tmp_path / "step-1", models, optimizer, schedule, resumed, FixedKLController(0.0))
    assert step == 1 and resumed.state_dict() == state
    # Without fp16 there is no scaler to save or restore.
    save_checkpoint(tmp_path / "step-2", models, optimizer, schedule, None, FixedKLController(0.1), 2, None)
    assert "scaler" not in torch.load(tmp_path / "step-2" / "optimizer.pt", weights_only=True)
    assert load_checkpoint(tmp_path / "step-2", models, optimizer, schedule, None, FixedKLController(0.0))[0] == 2


def reference_prompt_order(n_prompts: int, chunk: int, batch: int, seed: int) -> list[int]:
    """The stream as first written (one permutation rebuilt per position): resumed runs depend on it."""
    indices = []
    for position in range(chunk * batch, (chunk + 1) * batch):
        epoch, offset = divmod(position, n_prompts)
        permutation = list(range(n_prompts))
        random.Random(seed * 7919 + epoch).shuffle(permutation)
        indices.append(permutation[offset])
    return indices


def test_prompt_order_is_unchanged_and_shuffles_each_pass_once_per_call(monkeypatch) -> None:
    import rlhf.rl_driver as stage

    for n, chunk, batch, seed in ((13, 0, 4, 3), (13, 3, 4, 3), (5, 2, 12, 0), (7, 11, 7, 9), (100, 1, 64, 1)):
        assert stage.prompt_order(n, chunk, batch, seed) == reference_prompt_order(n, chunk, batch, seed)
    shuffles = []

    class CountingRandom(random.Random):
        def shuffle(self, x):
            shuffles.append(len(x))
            return super().shuffle(x)

    monkeypatch.setattr(stage.random, "Random", CountingRandom)
    order = stage.prompt_order(100_000, 3, 64, 0)  # one pass: one shuffle, not one per batch position
    assert len(order) == 64 and shuffles == [100_000]
    shuffles.clear()
    assert len(stage.prompt_order(10, 1, 12, 0)) == 12 and shuffles == [10, 10], "positions 12-23: passes 1 and 2"


# ----------------------------------------------------------------------------- KL controller


def test_kl_coef_0_and_target_0_keep_beta_at_0(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo",
                         "stages.ppo.kl_coef=0", "stages.ppo.kl_target=0", "stages.ppo.steps=3")  # fmt: skip
    assert code == 0, err[-3000:]
    assert "resuming from" not in out, "a checkpoint of another config is not resumed"
    rows = read_metrics(run_dir / "ppo")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["beta"] for row in rows] == [0.0, 0.0, 0.0]
    for row in rows:
        assert row["reward"] == pytest.approx(row["score"], abs=1e-6), "no KL penalty: reward is the score"
    assert read_manifest(run_dir / "ppo")["metrics"]["beta"] == 0.0


def test_adaptive_kl_moves_beta_toward_target(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    target, horizon = 0.5, 40
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo",
                         f"stages.ppo.kl_target={target}", f"stages.ppo.kl_horizon={horizon}")  # fmt: skip
    assert code == 0, err[-3000:]
    rows = read_metrics(run_dir / "ppo")
    betas = [row["beta"] for row in rows]
    assert betas[0] == pytest.approx(0.05), "starts at kl_coef"
    assert len(set(betas)) == len(betas), f"beta changes every iteration: {betas}"
    # Each iteration's beta follows from the previous one and its KL (Ziegler et al.'s controller).
    expected = [betas[0]]
    for row in rows:
        error = min(max(row["kl"] / target - 1.0, -0.2), 0.2)
        expected.append(expected[-1] * (1.0 + error * ROLLOUT / horizon))
    assert betas == pytest.approx(expected[:-1], rel=1e-9)
    assert read_manifest(run_dir / "ppo")["metrics"]["beta"] == pytest.approx(expected[-1], rel=1e-9)


# ----------------------------------------------------------------------------- the score


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_score_is_the_weighted_reward_model_plus_the_reward_functions(base, monkeypatch, weight) -> None:
    """The rollout's score on stopped responses: reward_model_weight x the normalised reward-model score + each
    reward function (weight 0, as in demo_gold_reward: the functions alone, the reward model only logged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import rlhf.responses
    from rlhf.config import PPOConfig
    from rlhf.ppo import PPO
    from rlhf.responses import encode_prompts
    from rlhf.rl_models import RLModels, normalised_scores

    real = rlhf.responses.generate

    def stopping(*args, **kwargs):  # tiny policies rarely stop in 8 tokens; the reward model counts only where they do
        sample = real(*args, **kwargs)
        sample.stopped = torch.ones_like(sample.stopped)
        return sample

    monkeypatch.setattr(rlhf.responses, "generate", stopping)
    sft, reward_dir = base.run_dir / "sft", base.run_dir / "reward"
    tokenizer = AutoTokenizer.from_pretrained(sft)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    models = RLModels(policy=AutoModelForCausalLM.from_pretrained(sft).eval(), value=reward, reward=reward,
                       reference=AutoModelForCausalLM.from_pretrained(sft).eval(), tokenizer=tokenizer)  # fmt: skip
    texts = ["What is 2 + 3?", "List 2 fruits.", "What is 7 - 4?", "List 3 colours."]
    given = []

    def words(prompts, responses):  # a programmatic reward that differs between responses
        given.append([i / 10 + len(r) / 100 for i, r in enumerate(responses)])
        return given[-1]

    config = PPOConfig(prompts="unused", max_new_tokens=8, reward_model_weight=weight, reward_functions=["tests:words"])
    rollout, stats = PPO(models, config, reward_functions=[words]).rollout_step(
        encode_prompts(tokenizer, texts), texts, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        rm = normalised_scores(reward, rollout.query_responses, rollout.attention_mask)
    assert rm.abs().min() > 1e-3 and len(set(given[0])) > 1, "both terms are visible"
    assert rollout.scores.tolist() == pytest.approx((weight * rm + torch.tensor(given[0])).tolist(), abs=1e-5)
    assert stats["rm_score"] == pytest.approx(rm.mean().item(), abs=1e-5), "the reward model is logged at any weight"


def test_lora_policy_uses_the_adapter_free_model_as_reference(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo",
                         "stages.ppo.lora.r=4", "stages.ppo.steps=2", "stages.ppo.lr=1e-2")  # fmt: skip
    assert code == 0, err[-3000:]
    rows = read_metrics(run_dir / "ppo")
    # LoRA's B starts at zero, so at the first rollout the policy IS the reference: KL exactly 0.
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl"] != pytest.approx(0.0, abs=1e-6), "after an update the adapters move the policy"
    # The adapters are merged: the saved policy is a plain model with the base's parameter names.
    saved = weights(run_dir / "ppo" / "model.safetensors")
    assert not any("lora" in name for name in saved)
    assert set(saved) == set(weights(base.run_dir / "ppo" / "model.safetensors"))


def test_nan_losses_are_skipped_then_the_stage_stops(base, tmp_path, capsys, monkeypatch) -> None:
    import rlhf.ppo

    real = rlhf.ppo.policy_loss_clipped

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(rlhf.ppo, "policy_loss_clipped", nan_loss)
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo", "--force",
                         "stages.ppo.max_nonfinite_iterations=2")  # fmt: skip
    assert code == 1
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ppo: 2 iterations in a row had only NaN/inf") and "iteration 2" in message
    assert not (building_dir(run_dir, "ppo") / "manifest.json").exists(), "a diverged build never looks complete"
    assert read_manifest(run_dir / "ppo") == read_manifest(base.run_dir / "ppo"), "the complete stage is kept"
    rows = read_metrics(building_dir(run_dir, "ppo"))
    assert len(rows) == 1, "iteration 1 is logged; iteration 2 stops the stage"
    assert rows[0]["nonfinite_steps"] > 0 and math.isnan(rows[0]["policy_loss"]), "every update of iteration 1 was skipped"


def test_prompts_longer_than_the_room_left_are_counted(base, tmp_path, capsys) -> None:
    """A prompt that does not fit before max_new_tokens keeps its end, and the run says how many were cut."""
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo",
                         "stages.ppo.max_new_tokens=88", "stages.ppo.steps=1", "stages.ppo.norm_prompts=0")  # fmt: skip
    assert code == 0, err[-3000:]
    assert re.search(r"ppo: \d+ of 16 prompts are longer than 8 tokens \(the context 96 less max_new_tokens 88\)", out), out[-3000:]
