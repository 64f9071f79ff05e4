"""`rlhf eval`, `rlhf generate` and `rlhf chat` on the tiny pipeline's policies."""

from __future__ import annotations

import json
import math

import pytest

from rlhf.cli import main


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
    assert len(rows) == 8 and all(set(row) == {"prompt", "response"} for row in rows)


@pytest.mark.parametrize("args, message", [
    ((), "give --prompt TEXT or --prompts FILE"),
    (("--prompt", "   "), "--prompt: row 1: prompt: empty text"),
    (("--prompt", "hi", "--temperature", "-1"), "--temperature"),
])  # fmt: skip
def test_generate_bad_input(tiny_rlhf, capsys, args, message) -> None:
    code, out, err = cli(capsys, "generate", tiny_rlhf.run_dir / "sft", *args)
    assert code == 2 and message in err


def test_chat_keeps_the_conversation_and_resets(tiny_rlhf, monkeypatch, capsys) -> None:
    from rlhf import responses

    seen = []
    real = responses.sample_responses

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.append(prompts[0])
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(responses, "sample_responses", recording)
    lines = iter(["What is 1 + 1?", "And 2 + 2?", "/reset", "Name 2 fruits.", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = cli(capsys, "chat", tiny_rlhf.run_dir / "sft", "--max-new-tokens", 4)
    assert code == 0, err
    assert out.count("assistant> ") == 3 and "(history cleared)" in out
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[2] == [{"role": "user", "content": "Name 2 fruits."}]


def test_chat_ends_on_end_of_input(tiny_rlhf, monkeypatch, capsys) -> None:
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert cli(capsys, "chat", tiny_rlhf.run_dir / "sft")[0] == 0
