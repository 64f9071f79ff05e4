"""Helpers shared by the tests that run tiny pipelines through the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import yaml

from rlhf.cli import main

ROOT = Path(__file__).resolve().parents[1]
PPO_STEPS = 4
ROLLOUT = 8


def run_once(pipeline: Path, folder: Path) -> SimpleNamespace:
    """Run `pipeline` (whose run_dir is folder/run) and return its paths and stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", str(pipeline)])
    assert code == 0, err.getvalue()[-3000:]
    return SimpleNamespace(pipeline=str(pipeline), run_dir=folder / "run", folder=folder, out=out.getvalue())


def run(capsys, *args) -> tuple[int, str, str]:
    """`rlhf run ARGS` in-process: (exit code, stdout, stderr)."""
    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def clone(base, tmp_path: Path) -> Path:
    """A copy of a finished run directory to change without touching the shared one."""
    target = tmp_path / "run"
    shutil.copytree(base.run_dir, target)
    return target


def write_tiny_rlhf(folder: Path, report: bool = True) -> Path:
    """Tiny versions of the demo's stages (the report too, unless `report` is False) on subsets of
    data_samples/ written inside `folder`."""
    samples = ROOT / "data_samples"
    subsets = {"corpus.txt": 400, "sft.jsonl": 64, "preferences.jsonl": 48, "ppo_prompts.jsonl": 16, "eval.jsonl": 8}
    for name, lines in subsets.items():
        text = (samples / name).read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        (folder / name).write_text("".join(text), encoding="utf-8")
    common = dict(eval_batch_size=8, lr=1.0e-3, log_every=1, save_every=100)
    tree = {
        "run_dir": str(folder / "run"),
        "seed": 0,
        "stages": {
            "tokenizer": {"data": [str(folder / "corpus.txt")], "vocab_size": 300},
            "pretrain": {"data": [str(folder / "corpus.txt")], "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64},
                         "max_steps": 4, "batch_size": 4, **common},
            "sft": {"data": str(folder / "sft.jsonl"), "max_steps": 3, "batch_size": 4, **common},
            "reward": {"data": str(folder / "preferences.jsonl"), "max_steps": 3, "batch_size": 4, "eval_rows": 8,
                       "norm_prompts": 8, "norm_max_new_tokens": 8, **common},
            "ppo": {"prompts": str(folder / "ppo_prompts.jsonl"), "steps": PPO_STEPS, "rollout_batch_size": ROLLOUT,
                    "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8, "save_every": 2,
                    "eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge"},
        },
    }  # fmt: skip
    if report:
        tree["stages"]["report"] = {"eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge",
                                    "max_new_tokens": 8, "batch_size": 4}  # fmt: skip
    path = folder / "tiny_rlhf.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path
