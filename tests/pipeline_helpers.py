"""Helpers shared by the tests that run tiny pipelines through the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import yaml

from rlhf.artifacts import read_metrics, sha256_file
from rlhf.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny.yaml"
ATOL = 1e-6
"""Largest weight difference allowed between a resumed or re-run stage and one run straight through."""
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


def snapshot(folder: Path) -> dict | None:
    """Every file's (sha256, mtime) and every folder under `folder`; None if it does not exist."""
    if not folder.exists():
        return None
    return {
        p.relative_to(folder).as_posix(): (sha256_file(p), p.stat().st_mtime_ns) if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
    }


def hold_lock(run_dir: Path, pid: int) -> None:
    """Write `run_dir`'s lock as process `pid` on this host would hold it."""
    holder = {"pid": pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00"}
    (run_dir / ".lock").write_text(json.dumps(holder), encoding="utf-8")


def write_subsets(folder: Path, lines: dict[str, int]) -> None:
    """The first `lines[name]` lines of each data_samples/ file `name`, written into `folder`."""
    for name, count in lines.items():
        text = (ROOT / "data_samples" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:count]
        (folder / name).write_text("".join(text), encoding="utf-8")


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def add_trainer_callback(monkeypatch, callback) -> None:
    """Give every Trainer that a stage of this process trains `callback`, ahead of the stage's own."""
    import rlhf.training as training

    real = training.train

    def train(trainer, *args, **kwargs):
        trainer.add_callback(callback)
        return real(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "train", train)


def at_step(monkeypatch, event: str, step: int, action) -> None:
    """Make every Trainer of this process call `action()` at `event` (a TrainerCallback method) of `step`."""
    from transformers import TrainerCallback

    class Act(TrainerCallback):
        pass

    def act(self, args, state, control, **kwargs):
        if state.global_step == step:
            action()

    setattr(Act, event, act)
    add_trainer_callback(monkeypatch, Act())


def at_rl_update(monkeypatch, iteration: int, action) -> None:
    """Make an RL stage call `action()` as it starts the update of the `iteration`-th iteration this process runs."""
    import rlhf.rl_training

    real, calls = rlhf.rl_training.update, []

    def update(*args, **kwargs):
        calls.append(None)
        if len(calls) == iteration:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(rlhf.rl_training, "update", update)


def run_killed(*args, step: int, event: str = "on_step_end", timeout: float = 300) -> None:
    """`rlhf run ARGS` in a child process that SIGKILLs itself at `event` of `step`: a TrainerCallback method
    (e.g. 'on_step_end'), or 'rl_update' (as the update of an RL stage's iteration `step` starts).

    The child is forked from this process, torch and transformers already imported (a fresh interpreter
    would spend most of the test importing them); its output goes to a log shown if it is not killed.
    """
    import pytest

    with tempfile.TemporaryFile("w+") as log:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
                if event == "rl_update":
                    at_rl_update(pytest.MonkeyPatch(), step, kill)
                else:
                    at_step(pytest.MonkeyPatch(), event, step, kill)
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    main(["run", *map(str, args)])
            except BaseException:
                traceback.print_exc(file=log)
            finally:
                log.flush()
                os._exit(1)
        deadline = time.monotonic() + timeout
        done, status = os.waitpid(pid, os.WNOHANG)
        while not done and time.monotonic() < deadline:
            time.sleep(0.05)
            done, status = os.waitpid(pid, os.WNOHANG)
        if not done:  # hung: end it, and fail below
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = 0
        log.seek(0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed, f"not killed at {event} of step {step} (status {status}): {log.read()[-3000:]}"


def write_tiny_rlhf(folder: Path, report: bool = True) -> Path:
    """Tiny versions of the demo's stages (the report too, unless `report` is False) on subsets of
    data_samples/ written inside `folder`."""
    write_subsets(folder, {"corpus.txt": 400, "sft.jsonl": 64, "preferences.jsonl": 48, "ppo_prompts.jsonl": 16, "eval.jsonl": 8})
    common = dict(eval_batch_size=8, lr=1.0e-3, log_every=1, save_every=100)
    tree = {
        "run_dir": str(folder / "run"),
        "seed": 0,
        "stages": {
            "tokenizer": {"data": [str(folder / "corpus.txt")], "vocab_size": 300},
            "pretrain": {"data": [str(folder / "corpus.txt")], "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 96},
                         "max_steps": 4, "batch_size": 4, **common},
            "sft": {"data": str(folder / "sft.jsonl"), "max_steps": 3, "batch_size": 4, **common},
            "reward": {"data": str(folder / "preferences.jsonl"), "max_steps": 3, "batch_size": 4, "eval_rows": 8,
                       "norm_prompts": 8, "norm_max_new_tokens": 8, **common, "save_every": 1},
            "ppo": {"prompts": str(folder / "ppo_prompts.jsonl"), "steps": PPO_STEPS, "rollout_batch_size": ROLLOUT,
                    "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8, "save_every": 2, "norm_prompts": 32,
                    "eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge"},
        },
    }  # fmt: skip
    if report:
        tree["stages"]["report"] = {"eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge",
                                    "max_new_tokens": 8, "batch_size": 4}  # fmt: skip
    return write_yaml(folder / "tiny_rlhf.yaml", tree)


def write_tiny_sft(folder: Path) -> Path:
    """The fixture pipeline with its data cut to small subsets of data_samples/ inside `folder`."""
    write_subsets(folder, {"corpus.txt": 400, "sft.jsonl": 40, "eval.jsonl": 8})
    tree = yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))
    tree["run_dir"] = str(folder / "run")
    stages = tree["stages"]
    stages["tokenizer"]["data"] = [str(folder / "corpus.txt")]
    stages["pretrain"]["data"] = [str(folder / "corpus.txt")]
    stages["sft"]["data"] = str(folder / "sft.jsonl")
    stages["sft"]["eval_prompts"] = str(folder / "eval.jsonl")
    return write_yaml(folder / "tiny.yaml", tree)


def file_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under `run_dir` (`snapshot` also records times and folders)."""
    return {p.relative_to(run_dir).as_posix(): sha256_file(p) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def manifest_bytes(run_dir: Path, stage: str) -> bytes:
    return (run_dir / stage / "manifest.json").read_bytes()


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line in {err[-2000:]!r}"
    return lines[0]


def max_weight_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between two safetensors files' tensors (same names required)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max((wa[name] - wb[name]).abs().max().item() for name in wa)


def weights(stage_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(stage_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name] - wb[name]).abs().max().item()
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=ATOL), f"{name}: max |diff| {diff:.3g} > atol {ATOL}"


def loss_steps(stage_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(stage_dir) if "loss" in row]


CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")
DPO_STEPS = 4


def write_tiny_dpo(folder: Path) -> Path:
    """The tiny pipeline's tokenizer, pretrain and sft, then dpo on its preference pairs (a checkpoint every step)."""
    tree = yaml.safe_load(write_tiny_rlhf(folder, report=False).read_text(encoding="utf-8"))
    stages = tree["stages"]
    del stages["reward"], stages["ppo"]
    stages["dpo"] = {"data": str(folder / "preferences.jsonl"), "max_steps": DPO_STEPS, "batch_size": 4, "eval_rows": 8,
                     "eval_batch_size": 8, "lr": 1.0e-3, "log_every": 1, "save_every": 1, "beta": 0.1,
                     "eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge", "max_new_tokens": 8}  # fmt: skip
    return write_yaml(folder / "tiny_dpo.yaml", tree)


def write_tiny_critic_free(folder: Path) -> Path:
    """The tiny pipeline of `write_tiny_rlhf` in `folder` (extended, not copied) with PPO and the report
    dropped and the three critic-free stages added: 4 iterations of 8 episodes each, checkpoints every 2.
    The tiny policies rarely stop within 8 tokens (every answer then shares the missing-EOS penalty), so a
    reward for the response's length gives the answers to one prompt different scores."""
    group = {"grpo": 2, "rloo": 2, "reinforce_pp": 1}
    stages: dict = {"ppo": False, "report": False}
    for name in CRITIC_FREE:
        stages[name] = {"prompts": str(folder / "ppo_prompts.jsonl"), "steps": PPO_STEPS, "rollout_batch_size": ROLLOUT // group[name],
                        "answers_per_prompt": group[name], "minibatch_size": 4, "max_new_tokens": 8, "save_every": 2,
                        "norm_prompts": 8, "lr": 1e-3, "reward_functions": ["pipeline_helpers:length_reward"], "eval_prompts": str(folder / "eval.jsonl"), "judge": "rlhf.demo_task:gold_judge"}  # fmt: skip
    return write_yaml(folder / "tiny_critic_free.yaml", {"extends": "tiny_rlhf.yaml", "stages": stages})


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A programmatic reward that tells the tiny policies' answers apart: their length in characters / 50."""
    return [len(response) / 50 for response in responses]


def plain_tokenizer(template: str | None = None):
    """A byte-level BPE of 300 tokens on the demo corpus, as a foreign checkpoint ships one: EOS its only
    special token, no pad, and `template` (none by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf.tokenizer import EOS_TOKEN

    texts = (ROOT / "data_samples" / "corpus.txt").read_text(encoding="utf-8").splitlines()[:300]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    tokenizer.chat_template = template
    return tokenizer


def write_checkpoint(folder: Path, template: str | None = None, vocab_size: int | None = None, family: str = "gpt2") -> Path:
    """A tiny random transformers causal LM (`GPT2LMHeadModel`, or `LlamaForCausalLM` with grouped-query
    attention and an untied head for family "llama") and `plain_tokenizer(template)`, saved by
    save_pretrained into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = plain_tokenizer(template)
    torch.manual_seed(0)
    vocab, eos = vocab_size or len(tokenizer), tokenizer.eos_token_id
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=False,
                             eos_token_id=eos, bos_token_id=eos)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    config = GPT2Config(vocab_size=vocab, n_positions=96, n_embd=32, n_layer=1, n_head=2, eos_token_id=eos, bos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
