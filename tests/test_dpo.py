"""The DPO stage end to end on the CPU, in a tiny pipeline (tokenizer -> pretrain -> sft -> dpo): its logged
implicit-reward columns, a saved policy that prefers the chosen responses more than SFT did, IPO,
LoRA merged into a plain model, resuming after SIGKILL to the same weights, and the `max_seconds`
budget every Trainer stage takes.

One tiny run is shared by the module; tests that change a run work on a copy of its directory.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest

from rlhf.artifacts import building_dir, read_manifest, read_metrics, verify_outputs

from pipeline_helpers import DPO_STEPS, clone, max_weight_diff, run, run_killed

WEIGHT_ATOL = 1e-6  # a resumed run must reproduce the uninterrupted one's weights to float32 rounding
DPO_COLUMNS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture
def base(tiny_dpo):
    return tiny_dpo


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def mean_margin(model_dir: Path, tokenizer_dir: Path, pairs: list[dict]) -> float:
    """Mean over `pairs` of log p(prompt + chosen) - log p(prompt + rejected) under the model in `model_dir`
    (the shared prompt's tokens cancel), each cut to the context as the trainer cuts it (keeping the start)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.scoring import render_conversation

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def logp(prompt, response) -> float:
        ids = torch.tensor([tokenizer(render_conversation(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]])
        ids = ids[:, : model.config.n_positions]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]  # (T-1, V)
        return logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).sum().item()

    return statistics.fmean(logp(p.get("prompt"), p["chosen"]) - logp(p.get("prompt"), p["rejected"]) for p in pairs)


def training_pairs(base) -> list[dict]:
    from rlhf.config import load_pipeline
    from rlhf.stages.dpo import read_inputs

    return read_inputs(load_pipeline(base.pipeline).stages["dpo"]).train_pairs


def test_dpo_completes_and_logs_the_implicit_rewards(base) -> None:
    assert "[dpo] running" in base.out and "[dpo] done" in base.out
    manifest = read_manifest(base.run_dir / "dpo")
    assert manifest["status"] == "complete" and verify_outputs(base.run_dir / "dpo", manifest) is None
    assert manifest["upstream"].keys() == {"sft"}
    metrics = manifest["metrics"]
    assert metrics["steps"] == DPO_STEPS and metrics["train_pairs"] == 40 and metrics["eval_pairs"] == 8
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and 0.0 <= metrics["judge_after"] <= 1.0
    assert "judge score on" in base.out and "SFT" in base.out
    rows = [row for row in read_metrics(base.run_dir / "dpo") if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, DPO_STEPS + 1))
    for column in DPO_COLUMNS:
        assert all(column in row for row in rows), f"{column} not logged every step"
    assert any("eval_rewards/margins" in row for row in read_metrics(base.run_dir / "dpo"))


def test_dpo_policy_loads_and_prefers_chosen_more_than_sft(base) -> None:
    from transformers import AutoModelForCausalLM

    from rlhf.model import RlhfForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(base.run_dir / "dpo"), RlhfForCausalLM)
    pairs = training_pairs(base)
    before = mean_margin(base.run_dir / "sft", base.run_dir / "sft", pairs)
    after = mean_margin(base.run_dir / "dpo", base.run_dir / "dpo", pairs)
    assert after > before, f"mean chosen-rejected log-prob margin {before:.4f} (SFT) -> {after:.4f} (DPO)"


def test_ipo_loss_runs(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "dpo", "stages.dpo.loss_type=ipo",
                         "stages.dpo.max_steps=2", "stages.dpo.judge=", "stages.dpo.eval_prompts=")  # fmt: skip
    assert code == 0, err[-3000:]
    assert "(ipo, beta 0.1)" in out
    rows = [row for row in read_metrics(run_dir / "dpo") if "loss" in row]
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(25.0, rel=1e-4), "IPO at the reference: (0 - 1/(2 beta))^2"


def test_lora_saves_a_merged_plain_model(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "dpo", "stages.dpo.lora.r=4",
                         "stages.dpo.max_steps=2", "stages.dpo.lr=1e-2", "stages.dpo.judge=", "stages.dpo.eval_prompts=")  # fmt: skip
    assert code == 0, err[-3000:]
    rows = [row for row in read_metrics(run_dir / "dpo") if "loss" in row]
    # LoRA's B starts at zero, so at the first step the policy IS the reference (adapters disabled).
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    saved = weights(run_dir / "dpo" / "model.safetensors")
    assert not any("lora" in name for name in saved)
    assert set(saved) == set(weights(base.run_dir / "dpo" / "model.safetensors"))
    assert max_weight_diff(run_dir / "dpo" / "model.safetensors", run_dir / "sft" / "model.safetensors") > 0


@pytest.mark.slow
def test_dpo_killed_at_a_random_step_resumes_to_the_same_weights(base, tmp_path, capsys) -> None:
    """SIGKILL at the end of a random step (1-3 of 4; a checkpoint every step) loses at most that step:
    the same command ends with the uninterrupted run's weights (atol 1e-6)."""
    step = random.randint(1, DPO_STEPS - 1)
    run_dir = clone(base, tmp_path)
    (run_dir / "dpo").rename(tmp_path / "dpo.done")
    run_killed(base.pipeline, "--run-dir", run_dir, "--only", "dpo", step=step)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "dpo")
    assert code == 0, err[-3000:]
    resumed = f"resuming from {building_dir(run_dir, 'dpo') / 'checkpoints' / f'checkpoint-{step - 1}'}"
    assert (resumed in out) if step > 1 else ("resuming from" not in out), f"killed at step {step}"
    diff = max_weight_diff(run_dir / "dpo" / "model.safetensors", base.run_dir / "dpo" / "model.safetensors")
    assert diff <= WEIGHT_ATOL, f"killed at step {step}: max |diff| {diff:.3g} > atol {WEIGHT_ATOL}"


def test_max_seconds_stops_training_early_and_the_stage_completes(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "dpo", "stages.dpo.max_seconds=1e-3",
                         "stages.dpo.judge=", "stages.dpo.eval_prompts=")  # fmt: skip
    assert code == 0, err[-3000:]
    assert "[dpo] max_seconds 0.001 reached; stopped after step 1" in out
    manifest = read_manifest(run_dir / "dpo")
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 1 < DPO_STEPS
    assert (run_dir / "dpo" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_runs_data_parallel_under_torchrun(base, tmp_path) -> None:
    """Two processes each take their share of every batch: half the optimizer steps of one process
    for the same data, once, and the run completes with a loadable policy."""
    import shutil

    from test_distributed import WORLD, torchrun

    run_dir = clone(base, tmp_path)
    shutil.rmtree(run_dir / "dpo")
    result = torchrun("run", base.pipeline, "--run-dir", run_dir, "--only", "dpo", "stages.dpo.max_steps=-1", "stages.dpo.epochs=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("[dpo] running") == 1
    manifest = read_manifest(run_dir / "dpo")
    assert manifest["status"] == "complete" and verify_outputs(run_dir / "dpo", manifest) is None
    per_process = math.ceil(len(training_pairs(base)) / WORLD)  # the sampler pads the last share
    assert manifest["metrics"]["steps"] == math.ceil(per_process / 4), "each step saw WORLD x batch_size pairs"


def test_beyond_context_counts_cut_and_left_out_pairs_by_hand() -> None:
    from rlhf.stages.dpo import beyond_context

    rows = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},  # 2 + 2 = 4: fits 4
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},  # 3 + 2 = 5: cut to 4
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4, 5, 6]},  # 1 + 4 = 5: cut (the longer answer)
    ]
    assert beyond_context(rows, pairs=5, max_length=4) == {"dropped_long_pairs": 2, "cut_long_pairs": 2}
    assert beyond_context(rows, pairs=3, max_length=5) == {"dropped_long_pairs": 0, "cut_long_pairs": 0}


def test_pairs_past_max_length_are_counted_and_said(base, tmp_path, capsys) -> None:
    run_dir = clone(base, tmp_path)
    code, out, err = run(capsys, base.pipeline, "--run-dir", run_dir, "--only", "dpo", "stages.dpo.max_length=12",
                         "stages.dpo.max_steps=1", "stages.dpo.judge=", "stages.dpo.eval_prompts=")  # fmt: skip
    assert code == 0, err[-3000:]
    metrics = read_manifest(run_dir / "dpo")["metrics"]
    assert metrics["cut_long_pairs"] > 0
    assert f"{metrics['cut_long_pairs']} are cut to it" in out and f"{metrics['dropped_long_pairs']} left out" in out
    assert metrics["train_pairs"] == len(training_pairs(base))
