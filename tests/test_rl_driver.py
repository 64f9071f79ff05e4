"""The RL driver (rlhf/rl_driver.py, rlhf/rl_training.py) through the PPO stage of the tiny pipeline:
checkpoints keep fp16's gradient scaler, the prompt stream, the KL controller (fixed 0 as in
demo_no_kl, adaptive toward a target), the score (reward model weighted, plus reward functions as in
demo_gold_reward), LoRA's reference, NaN updates skipped then the stage stopped, over-long prompts counted.
"""

from __future__ import annotations

import math
import random
import re

import pytest

from rlhf.artifacts import building_dir, read_manifest, read_metrics

from pipeline_helpers import ROLLOUT, clone, run
from test_reward_ppo_stages import base, weights  # noqa: F401  (base: the session's tiny run)

pytestmark = pytest.mark.filterwarnings("ignore:ppo iteration .* negative mean KL:UserWarning")


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
    step, _, seconds = load_checkpoint(tmp_path / "step-1", models, optimizer, schedule, resumed, FixedKLController(0.0))
    assert step == 1 and resumed.state_dict() == state and seconds == 0.0
    # Without fp16 there is no scaler to save or restore.
    save_checkpoint(tmp_path / "step-2", models, optimizer, schedule, None, FixedKLController(0.1), 2, None, seconds=12.5)
    assert "scaler" not in torch.load(tmp_path / "step-2" / "optimizer.pt", weights_only=True)
    resumed_state = load_checkpoint(tmp_path / "step-2", models, optimizer, schedule, None, FixedKLController(0.0))
    assert resumed_state.step == 2 and resumed_state.seconds == 12.5, "the training seconds travel with the checkpoint"


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
    assert re.search(r"\[ppo\] \d+ of 16 prompts are longer than 8 tokens \(the context 96 less max_new_tokens 88\)", out), out[-3000:]


def test_gradient_checkpointing_recomputes_and_trains_to_the_same_policy(base, tmp_path, capsys, monkeypatch) -> None:
    """With gradient_checkpointing the update's forwards are checkpointed (every block, every micro-batch)
    and the run ends with the same policy as without (dropout is off: recomputing changes nothing)."""
    import transformers.modeling_utils

    from test_reward_ppo_stages import max_weight_diff

    real, calls = transformers.modeling_utils.checkpoint, []

    def counting(*args, **kwargs):
        calls.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)  # what the checkpointed blocks call
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "ppo", "stages.ppo.gradient_checkpointing=true")
    assert code == 0, err[-3000:]
    assert calls, "the blocks were checkpointed"
    assert max_weight_diff(run_dir / "ppo" / "model.safetensors", base.run_dir / "ppo" / "model.safetensors") <= 1e-5
