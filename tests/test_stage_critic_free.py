"""The `grpo`, `rloo` and `reinforce_pp` stages (rlhf/stages/critic_free.py) on the tiny pipeline: each
trains from SFT and saves a loadable policy, logs its curve, evaluates before and after, resumes after
SIGKILL to the uninterrupted run's weights, trains LoRA adapters, refuses bad settings with one line,
and runs data-parallel under torchrun."""

from __future__ import annotations

import random
import shutil

import pytest

from pipeline_helpers import CRITIC_FREE, PPO_STEPS, ROLLOUT, clone, one_line_error, run, run_killed, snapshot, write_tiny_critic_free
from rlhf.artifacts import building_dir, read_manifest, read_metrics
from test_reward_ppo_stages import WEIGHT_ATOL, max_weight_diff

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def trained(tiny_critic_free):
    return tiny_critic_free


@pytest.mark.slow
@pytest.mark.parametrize("stage", CRITIC_FREE)
def test_stage_trains_logs_evaluates_and_saves_a_policy(trained, stage) -> None:
    from transformers import AutoModelForCausalLM

    assert f"[{stage}] running" in trained.out and "[sft] up to date" in trained.out, "only the new stages run"
    assert "[ppo]" not in trained.out, "ppo: false drops the inherited stage"
    manifest = read_manifest(trained.run_dir / stage)
    assert manifest["status"] == "complete" and manifest["upstream"].keys() == {"sft", "reward"}
    rows = read_metrics(trained.run_dir / stage)
    assert [row["step"] for row in rows] == list(range(1, PPO_STEPS + 1))
    assert [row["episodes"] for row in rows] == [ROLLOUT * (i + 1) for i in range(PPO_STEPS)]
    for row in rows:
        for key in ("score", "rm_score", "kl", "policy_loss", "entropy", "judge", "group_score_std"):
            assert row[key] == row[key], f"{stage} {key} is NaN"
    metrics = manifest["metrics"]
    assert {"eval_judge", "eval_judge_sft", "eval_kl", "eval_rm_score"} <= metrics.keys()
    assert not (trained.run_dir / stage / "value").exists(), "no critic"
    AutoModelForCausalLM.from_pretrained(trained.run_dir / stage)
    assert max_weight_diff(trained.run_dir / stage / "model.safetensors", trained.sft / "model.safetensors") > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", CRITIC_FREE)
def test_killed_at_a_random_iteration_resumes_to_the_same_policy(trained, tmp_path, capsys, stage) -> None:
    step = random.randint(1, PPO_STEPS)
    run_dir = clone(trained, tmp_path)
    shutil.rmtree(run_dir / stage)
    run_killed(trained.pipeline, "--run-dir", run_dir, "--only", stage, step=step, event="rl_update")
    code, out, err = run(capsys, trained.pipeline, "--run-dir", run_dir, "--only", stage)
    assert code == 0, err[-3000:]
    resumed = f"resuming from {building_dir(run_dir, stage) / 'checkpoints' / 'step-2'}"
    assert (resumed in out) if step > 2 else ("resuming from" not in out), f"killed in iteration {step}"
    diff = max_weight_diff(run_dir / stage / "model.safetensors", trained.run_dir / stage / "model.safetensors")
    assert diff <= WEIGHT_ATOL, f"{stage} killed in iteration {step}: max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"
    for new, old in zip(read_metrics(run_dir / stage), read_metrics(trained.run_dir / stage), strict=True):
        for key in ("step", "score", "rm_score", "kl", "judge", "policy_loss", "lr"):
            assert new[key] == pytest.approx(old[key], abs=1e-5), f"{stage} step {new['step']} {key}"


@pytest.mark.slow
def test_lora_starts_at_the_reference_and_saves_a_plain_model(trained, tmp_path, capsys) -> None:
    from test_reward_ppo_stages import weights

    run_dir = clone(trained, tmp_path)
    code, out, err = run(capsys, trained.pipeline, "--run-dir", run_dir, "--only", "reinforce_pp",
                         "stages.reinforce_pp.lora.r=4", "stages.reinforce_pp.steps=2", "stages.reinforce_pp.lr=1e-2")  # fmt: skip
    assert code == 0, err[-3000:]
    rows = read_metrics(run_dir / "reinforce_pp")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["kl"] != pytest.approx(0.0, abs=1e-6)
    saved = weights(run_dir / "reinforce_pp" / "model.safetensors")
    assert not any("lora" in name for name in saved) and set(saved) == set(weights(trained.sft / "model.safetensors"))


@pytest.mark.parametrize("override, problem", [
    ("stages.grpo.answers_per_prompt=1", "stages.grpo.answers_per_prompt: a group needs at least 2 answers, got 1"),
    ("stages.rloo.answers_per_prompt=1", "stages.rloo.answers_per_prompt: leave-one-out needs at least 2 answers, got 1"),
    ("stages.grpo.variant=grpo2", "stages.grpo.variant: must be one of grpo, dr_grpo, got 'grpo2'"),
    ("stages.rloo.rollout_batch_size=3", "stages.rloo: rollout_batch_size (x group_size) must be a multiple of minibatch_size"),
    ("stages.reinforce_pp.gamma=2", "stages.reinforce_pp.gamma: must be in [0, 1], got 2.0"),
    ("stages.grpo.max_seconds=-1", "stages.grpo.max_seconds: must be >= 0, got -1.0"),
])  # fmt: skip
def test_bad_settings_stop_with_one_line_and_change_nothing(tiny_rlhf, tmp_path, capsys, override, problem) -> None:
    pipeline = write_tiny_critic_free(tiny_rlhf.folder)
    run_dir = clone(tiny_rlhf, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run(capsys, pipeline, "--run-dir", run_dir, override)
    assert code == 2 and problem in one_line_error(err), err[-2000:]
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_max_seconds_stops_after_the_iteration_that_reaches_it(trained, tmp_path, capsys) -> None:
    run_dir = clone(trained, tmp_path)
    code, out, err = run(capsys, trained.pipeline, "--run-dir", run_dir, "--only", "rloo", "stages.rloo.max_seconds=0.001")
    assert code == 0 and "[rloo] stopped after iteration 1 of 4: max_seconds 0.001 reached" in out, err[-2000:]
    assert [row["step"] for row in read_metrics(run_dir / "rloo")] == [1]
    assert read_manifest(run_dir / "rloo")["metrics"]["iterations"] == 1


@pytest.mark.slow
def test_max_seconds_counts_the_training_time_before_a_resume(trained, tmp_path, capsys) -> None:
    """A checkpoint records the seconds trained; a resumed run whose checkpoint had all but used up the
    budget stops after its first iteration."""
    import json

    run_dir = clone(trained, tmp_path)
    shutil.rmtree(run_dir / "rloo")
    budget = "stages.rloo.max_seconds=1000"
    run_killed(trained.pipeline, "--run-dir", run_dir, "--only", "rloo", budget, step=3, event="rl_update")
    state_file = building_dir(run_dir, "rloo") / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    assert 0 < state["seconds"] < 1000, "the seconds trained up to the checkpoint"
    state_file.write_text(json.dumps({**state, "seconds": 1000 - 1e-3}))  # as if it had run long
    code, out, err = run(capsys, trained.pipeline, "--run-dir", run_dir, "--only", "rloo", budget)
    assert code == 0 and "[rloo] stopped after iteration 3 of 4: max_seconds 1000 reached" in out, err[-2000:]
    assert read_manifest(run_dir / "rloo")["metrics"]["iterations"] == 3


@pytest.mark.slow
def test_weight_decay_reaches_the_optimizer(trained, tmp_path, capsys, monkeypatch) -> None:
    import rlhf.rl_training

    made = []
    real = rlhf.rl_training.adamw
    monkeypatch.setattr(rlhf.rl_training, "adamw", lambda *args: made.append(real(*args)) or made[-1])
    run_dir = clone(trained, tmp_path)
    code, out, err = run(capsys, trained.pipeline, "--run-dir", run_dir, "--only", "rloo", "stages.rloo.weight_decay=0.25",
                         "stages.rloo.steps=1")  # fmt: skip
    assert code == 0, err[-2000:]
    assert [group["weight_decay"] for group in made[0].param_groups] == [0.25]  # rloo trains the policy alone


@pytest.mark.slow
def test_grpo_runs_data_parallel_under_torchrun(trained, tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from test_distributed import WORLD, torchrun

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the reward function lives in pipeline_helpers
    run_dir = clone(trained, tmp_path)
    shutil.rmtree(run_dir / "grpo")
    result = torchrun("run", trained.pipeline, "--run-dir", run_dir, "--only", "grpo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("[grpo] running") == 1
    rows = read_metrics(run_dir / "grpo")
    assert [row["episodes"] for row in rows] == [WORLD * ROLLOUT * (i + 1) for i in range(PPO_STEPS)]
    assert read_manifest(run_dir / "grpo")["status"] == "complete"


def test_the_report_gives_every_rl_stage_the_same_headline_metrics() -> None:
    from rlhf.stages.report import RL_HEADLINE_METRICS, headline_metrics

    assert all(headline_metrics(stage) == RL_HEADLINE_METRICS for stage in ("ppo", *CRITIC_FREE))
    assert "judge_after" in headline_metrics("sft") and headline_metrics("report") == ()
