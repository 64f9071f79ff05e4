"""`rlhf eval`, `rlhf generate` and `rlhf chat` on the tiny pipeline's policies."""

from __future__ import annotations

import json
import math

import pytest

from rlhf.cli import main

from cli_helpers import one_line_error


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_on_reference_answers_writes_json_and_a_table(tiny_rlhf, tmp_path, capsys) -> None:
    from rlhf.data import prompts_and_references, read_rows
    from rlhf.evaluation import answer_token_stats, load_policy

    out = tmp_path / "eval.json"
    data = tiny_rlhf.folder / "eval.jsonl"
    code, stdout, err = cli(capsys, "eval", tiny_rlhf.run_dir / "sft", "--data", data, "--max-new-tokens", 8, "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["kind"] == "answers" and result["rows"] == 8 and result["decoding"] == "greedy"
    assert 0 <= result["bleu"] <= 100 and 0 <= result["accuracy"] <= 1
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    model, tokenizer = load_policy(tiny_rlhf.run_dir / "sft")
    stats, _ = answer_token_stats(model, tokenizer, prompts_and_references(data, read_rows(data)))
    assert result["perplexity"] == pytest.approx(stats.perplexity, rel=1e-6)
    assert "perplexity" in stdout and "BLEU (greedy)" in stdout


def test_eval_on_sft_rows_and_on_text(tiny_rlhf, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "eval", tiny_rlhf.run_dir / "pretrain", "--data", tiny_rlhf.folder / "sft.jsonl",
                         "--samples", 4, "--max-new-tokens", 4)  # fmt: skip
    assert code == 0, err
    assert "4 reference answers" in out
    code, out, err = cli(capsys, "eval", tiny_rlhf.run_dir / "pretrain", "--data", tiny_rlhf.folder / "corpus.txt")
    assert code == 0, err
    assert "1 documents" in out and "BLEU" not in out


def test_eval_refuses_prompts_without_references(tiny_rlhf, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "eval", tiny_rlhf.run_dir / "sft", "--data", tiny_rlhf.folder / "ppo_prompts.jsonl")
    assert code == 2 and "no reference answers" in err and "ppo_prompts.jsonl" in err


def test_generate_one_prompt_and_a_file(tiny_rlhf, tmp_path, capsys) -> None:
    policy = tiny_rlhf.run_dir / "ppo"
    code, out, err = cli(capsys, "generate", policy, "--prompt", "What is 2 + 3?", "--max-new-tokens", 6, "--temperature", 0)
    assert code == 0, err
    again = cli(capsys, "generate", policy, "--prompt", "What is 2 + 3?", "--max-new-tokens", 6, "--temperature", 0)[1]
    assert out == again  # greedy is deterministic
    target = tmp_path / "responses.jsonl"
    code, out, err = cli(capsys, "generate", policy, "--prompts", tiny_rlhf.folder / "eval.jsonl", "--max-new-tokens", 6,
                         "--out", target)  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and all(set(row) == {"prompt", "sample", "response"} and row["sample"] == 0 for row in rows)


def test_generate_several_answers_per_prompt(tiny_rlhf, tmp_path, capsys) -> None:
    policy, prompts = tiny_rlhf.run_dir / "ppo", tiny_rlhf.folder / "eval.jsonl"
    target = tmp_path / "responses.jsonl"
    code, out, err = cli(capsys, "generate", policy, "--prompts", prompts, "--max-new-tokens", 6, "--temperature", 1.5,
                         "--num-return-sequences", 3, "--out", target)  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    asked = [json.loads(line)["prompt"] for line in prompts.read_text(encoding="utf-8").splitlines()]
    assert [(row["prompt"], row["sample"]) for row in rows] == [(p, i) for p in asked for i in range(3)]
    groups = [{row["response"] for row in rows[i : i + 3]} for i in range(0, len(rows), 3)]
    assert any(len(group) > 1 for group in groups)  # the three are separate samples, not one answer repeated
    code, out, err = cli(capsys, "generate", policy, "--prompts", prompts, "--max-new-tokens", 6, "--num-return-sequences", 2)
    assert code == 0, err
    blocks = out.strip().split("\n\n")  # one block per prompt: "> prompt", then its answers numbered
    assert len(blocks) == 8 and all(b.startswith("> ") and "\n[1] " in b and "\n[2] " in b and "[3]" not in b for b in blocks)
    code, out, err = cli(capsys, "generate", policy, "--prompt", "What is 2 + 3?", "--max-new-tokens", 6, "--num-return-sequences", 2)
    assert code == 0 and out.startswith("[1] ") and "\n[2] " in out, err


@pytest.mark.parametrize("args, message", [
    ((), "give --prompt TEXT or --prompts FILE"),
    (("--prompt", "   "), "--prompt: row 1: prompt: empty text"),
    (("--prompt", "hi", "--temperature", "-1"), "--temperature"),
    (("--prompt", "hi", "--num-return-sequences", "0"), "--num-return-sequences must be positive, got 0"),
])  # fmt: skip
def test_generate_bad_input(tiny_rlhf, capsys, args, message) -> None:
    code, out, err = cli(capsys, "generate", tiny_rlhf.run_dir / "sft", *args)
    assert code == 2 and message in one_line_error(err)


def _model_commands(run) -> dict[str, list]:
    """Every command that loads a model, with arguments it would otherwise run with."""
    prompts = run.folder / "eval.jsonl"
    return {
        "generate": ["generate", run.run_dir / "sft", "--prompt", "hi"],
        "chat": ["chat", run.run_dir / "sft"],
        "eval": ["eval", run.run_dir / "sft", "--data", prompts],
        "score": ["score", "--reward", run.run_dir / "reward", "--data", run.folder / "preferences.jsonl"],
        "compare": ["compare", run.run_dir / "sft", "--reward", run.run_dir / "reward", "--prompts", prompts],
    }


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "score", "compare"])
@pytest.mark.parametrize("device, message", [
    ("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    ("cuda:99", "--device cuda:99: "),  # no such GPU here, with or without CUDA
])  # fmt: skip
def test_a_bad_device_is_one_line_before_any_model_loads(tiny_rlhf, monkeypatch, capsys, command, device, message) -> None:
    from transformers import PreTrainedModel

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --device was checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_loading))
    code, out, err = cli(capsys, *_model_commands(tiny_rlhf)[command], "--device", device)
    assert code == 2 and message in one_line_error(err)


def test_device_cpu_and_auto_run(tiny_rlhf, capsys) -> None:
    import torch

    for device in ("cpu", "auto"):
        code, out, err = cli(capsys, "generate", tiny_rlhf.run_dir / "sft", "--prompt", "hi", "--max-new-tokens", 3, "--device", device)
        assert code == 0, err
    from rlhf.devices import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu") and resolve_device(" CPU ") == "cpu"


def test_chat_keeps_the_conversation_and_resets(tiny_rlhf, monkeypatch, tmp_path, capsys) -> None:
    from rlhf import responses

    seen = []
    real = responses.stream_response

    def recording(model, tokenizer, prompt, *args, **kwargs):
        seen.append(prompt)
        return real(model, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setenv("HOME", str(tmp_path))  # the readline history file goes there
    monkeypatch.setattr(responses, "stream_response", recording)
    lines = iter(["What is 1 + 1?", "And 2 + 2?", "/reset", "Name 2 fruits.", "/system Be brief.", "Hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = cli(capsys, "chat", tiny_rlhf.run_dir / "sft", "--max-new-tokens", 4)
    assert code == 0, err
    assert out.count("assistant> ") == 4 and "(history cleared)" in out and "(system message set; history cleared)" in out
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[2] == [{"role": "user", "content": "Name 2 fruits."}]
    assert seen[3] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_chat_ends_on_end_of_input_and_on_ctrl_c_at_the_prompt(tiny_rlhf, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for stop in (EOFError, KeyboardInterrupt):
        def ended(prompt=""):
            raise stop

        monkeypatch.setattr("builtins.input", ended)
        code, out, err = cli(capsys, "chat", tiny_rlhf.run_dir / "sft")
        assert code == 0 and "interrupted" not in err and "Traceback" not in err, err  # not the pipeline's message


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(tiny_rlhf, monkeypatch, tmp_path, capsys) -> None:
    from rlhf import responses

    seen = []

    def interrupted(model, tokenizer, prompt, max_new_tokens, write, *args, **kwargs):
        seen.append(prompt)
        write("half an")
        raise KeyboardInterrupt

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(responses, "stream_response", interrupted)
    lines = iter(["first", "second", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = cli(capsys, "chat", tiny_rlhf.run_dir / "sft")
    assert code == 0 and "interrupted" not in err, err
    assert out.count("assistant> half an\n(stopped)") == 2
    assert seen[1][1] == {"role": "assistant", "content": "half an"}  # what was shown stays in the conversation


@pytest.mark.parametrize("temperature, seed", [(0.7, 0), (1.5, 4), (0.0, 0)])
def test_a_streamed_reply_equals_the_unstreamed_one(tiny_rlhf, temperature, seed) -> None:
    from rlhf.evaluation import load_policy
    from rlhf.responses import sample_responses, stream_response

    model, tokenizer = load_policy(tiny_rlhf.run_dir / "ppo", "cpu")
    conversation = [{"role": "user", "content": "Name 3 colours."}]
    pieces: list[str] = []
    reply = stream_response(model, tokenizer, conversation, 24, pieces.append, temperature, seed)
    assert reply == "".join(pieces) == sample_responses(model, tokenizer, [conversation], 24, temperature, seed)[0]
    assert len(pieces) > 1 and reply  # it came in pieces, as generated


def _chat_process(run_dir, home, *args: str, **kwargs):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhf.cli", "chat", str(run_dir), *args], env=env, **kwargs)


@pytest.mark.slow
def test_chat_through_stdin(tiny_rlhf, tmp_path) -> None:
    import subprocess

    from rlhf.commands import CHAT_COMMANDS

    chat = _chat_process(tiny_rlhf.run_dir / "ppo", tmp_path, "--max-new-tokens", "6", stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = chat.communicate("/help\nWhat is 2 + 3?\n/reset\n/nonsense\n/quit\n", timeout=120)
    assert chat.returncode == 0, err
    assert "/help lists the commands" in out.splitlines()[0]
    assert all(f"  {name}" in out for name in CHAT_COMMANDS)
    assert out.count("assistant> ") == 1 and "(history cleared)" in out and "(unknown command /nonsense" in out


@pytest.mark.slow
def test_chat_on_a_terminal_streams_and_recalls_history(tiny_rlhf, tmp_path) -> None:
    """Through a pseudo-terminal, as a person would: readline edits the line and Up recalls the last one."""
    import os
    import pty
    import select
    import time

    main_fd, terminal = pty.openpty()
    chat = _chat_process(tiny_rlhf.run_dir / "ppo", tmp_path, "--max-new-tokens", "6", stdin=terminal, stdout=terminal,
                         stderr=terminal, close_fds=True)  # fmt: skip
    os.close(terminal)
    screen = b""

    def read_until(marker: bytes, count: int, timeout: float = 60) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while screen.count(marker) < count:
            assert time.monotonic() < deadline, f"waited for {count} x {marker!r}; the screen: {screen!r}"
            if select.select([main_fd], [], [], 0.5)[0]:
                try:
                    screen += os.read(main_fd, 4096)
                except OSError:  # the child has gone: the terminal is closed
                    break

    try:
        read_until(b"you> ", 1)
        os.write(main_fd, b"What is 2 + 3?\r")
        read_until(b"you> ", 2)
        os.write(main_fd, b"\x1b[A\r")  # Up arrow: the last line again, then Enter
        read_until(b"you> ", 3)
        os.write(main_fd, b"/quit\r")
        assert chat.wait(timeout=30) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
        os.close(main_fd)
    text = screen.decode("utf-8", "replace")
    assert text.count("What is 2 + 3?") == 2 and text.count("assistant> ") == 2  # recalled and answered again
    assert "What is 2 + 3?" in (tmp_path / ".rlhf_chat_history").read_text(encoding="utf-8")
