"""`rlhf run --dry-run` (`rlhf.pipeline.describe_plan`): the resolved config, what would run and why, and
every check's verdict, on the tiny RLHF pipeline; and that it writes nothing, not even the run directory."""

from __future__ import annotations

import json
import os
import shutil

from pipeline_helpers import clone, hold_lock, run, snapshot, write_tiny_rlhf

STAGES = ("tokenizer", "pretrain", "sft", "reward", "ppo", "report")


def plan_lines(out: str) -> dict[str, str]:
    """Stage -> what its line of the plan says after 'stage: '."""
    section = out.split("\nplan for ", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip().split(": ", 1) for line in section.splitlines()[1:]]
    return {stage: says for stage, says in rows}


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, f"expected one 'error:' line in {err[-2000:]!r}"
    return lines[0]


def test_fresh_pipeline_plans_every_stage_and_writes_nothing(tmp_path, capsys) -> None:
    pipeline = write_tiny_rlhf(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, pipeline, "--dry-run", "stages.sft.lr=3e-4")
    assert code == 0, err
    assert {stage: says for stage, says in plan_lines(out).items()} == {stage: "run: never ran" for stage in STAGES}
    assert "resolved config:" in out and "    sft:\n      lr: 0.0003\n" in out, "the values after overrides"
    assert "eval_fraction: 0.05" in out, "and after defaults"
    assert "does not exist yet" in out and out.rstrip().endswith("every check passed")
    assert not (tmp_path / "run").exists() and snapshot(tmp_path) == before


def test_finished_run_skips_every_stage_and_changes_nothing(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run")
    assert code == 0, err
    plan = plan_lines(out)
    assert list(plan) == list(STAGES) and all(says.startswith("skip: up to date") for says in plan.values()), plan
    for stage in STAGES:
        assert f"  {stage}: outputs: " in out and "files match their recorded sha256" in out
    assert f"lock: {run_dir} is free" in out
    assert snapshot(run_dir) == before and not (run_dir / ".lock").exists()


def test_changed_setting_names_the_key_for_the_stage_and_its_downstream(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run", "stages.sft.lr=3e-4")
    assert code == 0, err
    plan = plan_lines(out)
    assert plan["tokenizer"].startswith("skip") and plan["pretrain"].startswith("skip")
    assert plan["sft"] == "run: config changed: lr 0.001 -> 0.0003"
    for stage in ("reward", "ppo", "report"):
        assert plan[stage].startswith("run: upstream ") and "sft: config changed: lr" in plan[stage], plan[stage]
    assert snapshot(run_dir) == before


def test_forced_and_changed_input_are_named(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run", "--force", "--only", "pretrain")
    assert code == 0, err
    assert plan_lines(out) == {"pretrain": "run: forced (--force)"}
    # A report that ran on `prompts`, whose contents then changed:
    prompts = tmp_path / "other_eval.jsonl"
    shutil.copy(tiny_rlhf.folder / "eval.jsonl", prompts)
    manifest = json.loads((run_dir / "report" / "manifest.json").read_text(encoding="utf-8"))
    manifest["config"]["eval_prompts"] = str(prompts)
    manifest["inputs"] = {str(prompts): manifest["inputs"][str(tiny_rlhf.folder / "eval.jsonl")]}
    (run_dir / "report" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with open(prompts, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "one more"}) + "\n")
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run", "--only", "report", f"stages.report.eval_prompts={prompts}")
    assert code == 0, err
    assert plan_lines(out) == {"report": f"run: inputs changed: {prompts} (contents differ)"}


def test_interrupted_build_resumes_from_its_last_checkpoint(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    os.rename(run_dir / "reward", run_dir / ".reward.building")
    (run_dir / ".reward.building" / "manifest.json").unlink()
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run")
    assert code == 0, err
    plan = plan_lines(out)
    assert plan["reward"] == "run: never completed (an interrupted or failed build); resume from checkpoint step 3 in .reward.building/"
    assert plan["ppo"].startswith("run: upstream reward runs first")
    assert snapshot(run_dir) == before


def test_corrupted_output_is_reported_and_exits_2(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    with open(run_dir / "sft" / "model.safetensors", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x01\x02\x03")
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run")
    assert code == 2
    line = one_line_error(err)
    assert "stage 'sft'" in line and "model.safetensors was modified or corrupted" in line
    assert "  sft: outputs: FAILED: " in out and "  pretrain: outputs: 6 files match" in out
    assert snapshot(run_dir) == before


def test_lock_held_by_another_process_is_reported_and_left_alone(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    hold_lock(run_dir, os.getpid())
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run")
    assert code == 2
    assert f"in use by pid {os.getpid()}" in one_line_error(err) and "lock: FAILED" in out
    assert snapshot(run_dir) == before


def test_stale_lock_counts_as_free_and_is_left_alone(tiny_rlhf, tmp_path, capsys) -> None:
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir = clone(tiny_rlhf, tmp_path)
    hold_lock(run_dir, gone.pid)
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run")
    assert code == 0, err
    assert f"lock: {run_dir} is free" in out
    assert snapshot(run_dir) == before, "the run takes a stale lock over; the dry run leaves it"


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys) -> None:
    pipeline = write_tiny_rlhf(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, \n', encoding="utf-8")
    before = snapshot(tmp_path)
    for override in (f"stages.sft.data={tmp_path / 'bad.jsonl'}", f"stages.sft.data={tmp_path / 'missing.jsonl'}", "stages.sft.lrr=1"):
        code, out, err = run(capsys, pipeline, "--dry-run", override)
        assert code == 2, (override, err)
        one_line_error(err)
        assert "plan for" not in out
    assert not (tmp_path / "run").exists() and snapshot(tmp_path) == before


def test_interrupted_swap_is_named_and_not_settled(tiny_rlhf, tmp_path, capsys) -> None:
    run_dir = clone(tiny_rlhf, tmp_path)
    os.rename(run_dir / "report", run_dir / ".report.old")  # a crash between the swap's two renames
    before = snapshot(run_dir)
    code, out, err = run(capsys, tiny_rlhf.pipeline, "--run-dir", run_dir, "--dry-run")
    assert code == 0, err
    assert "report: a swap was interrupted; the run settles it first" in out
    assert snapshot(run_dir) == before
