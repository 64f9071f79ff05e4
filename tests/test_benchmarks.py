"""Smoke tests of the model benchmarks' helpers at tiny shapes (the benchmarks themselves take minutes)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_model_llama_reference_is_llama_with_the_same_function():
    bench = load("bench_model")
    args = argparse.Namespace(layout="llama", vocab=64, context=32, width=32, layers=2, heads=4, kv_heads=2)
    from rlhf.model import RlhfForCausalLM

    torch.manual_seed(0)
    ours = RlhfForCausalLM(bench.model_config(args)).eval()
    theirs = bench.reference_model(ours).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.num_key_value_heads == 2 and not theirs.config.tie_word_embeddings
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_bench_qwen_memory_sft_at_a_tiny_shape():
    bench = load("bench_qwen_memory")
    args = argparse.Namespace(steps=2, batch=2, seq=16)
    result = bench.measure_sft(args, checkpointing=True, overrides={"num_hidden_layers": 1, "vocab_size": 128})
    assert result["params"] > 0 and len(result["step_s"]) == 2
    assert result["peak_gb"] >= result["build_peak_gb"] > 0


def test_bench_qwen_memory_shape_is_qwen25_05b():
    bench = load("bench_qwen_memory")
    shape = bench.QWEN25_05B
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]) == (896, 24, 14)
    assert (shape["num_key_value_heads"], shape["intermediate_size"], shape["vocab_size"]) == (2, 4864, 151936)


def test_bench_ppo_measures_every_phase_at_a_tiny_shape():
    import dataclasses

    from rlhf.config import PPOConfig
    from rlhf.model import RlhfConfig

    bench = load("bench_ppo")
    config = RlhfConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, pad_token_id=0, eos_token_id=1)
    settings = dataclasses.replace(PPOConfig(prompts="p.jsonl"), rollout_batch_size=4, minibatch_size=2, max_new_tokens=6, ppo_epochs=1)
    result = bench.measure(bench.random_models(config), settings, [[5, 6, 7]] * 4, iterations=1)
    assert set(bench.SPLITS) <= set(result) and all(result[key] > 0 for key in bench.SPLITS)
    assert result["response_length"] == 6, "EOS is never sampled: full-length responses"
    assert result["episodes_per_second"] == 4 / sum(result[key] for key in bench.SPLITS)


def test_bench_ppo_hands_trl_the_same_models_as_gpt2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2ForSequenceClassification, GPT2LMHeadModel

    from rlhf.model import RlhfConfig, RlhfForCausalLM
    from rlhf.tokenizer import train_tokenizer

    bench = load("bench_ppo")
    tokenizer = train_tokenizer(["What is 2 + 2? Sure! 2 + 2 = 4. Have a nice day."] * 20, vocab_size=300)
    like = tmp_path / "like"
    config = RlhfConfig(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    RlhfForCausalLM(config).save_pretrained(like / "sft")
    tokenizer.save_pretrained(like / "sft")
    run = bench.random_run(tmp_path / "run", like, 2, 2, 32)
    sft, rm = bench.gpt2_copies(run, tmp_path / "gpt2")
    ids = torch.randint(3, len(tokenizer), (2, 10))
    assert tokenizer.pad_token_id < 3
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(run / "sft")(ids).logits
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(sft)(ids).logits, ours, atol=1e-5, rtol=1e-5)
        reward = AutoModelForSequenceClassification.from_pretrained(run / "reward")
        shift = reward.score.bias.item()  # the one thing GPT-2's head lacks: a constant shift of every score
        torch.testing.assert_close(GPT2ForSequenceClassification.from_pretrained(rm)(ids).logits + shift, reward(ids).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_bench_shakespeare_refuses_without_a_reference_and_reads_its_last_loss(monkeypatch, capsys):
    bench = load("bench_shakespeare")
    monkeypatch.setattr("sys.argv", ["bench_shakespeare.py"])
    with pytest.raises(SystemExit, match="needs --reference PATH"):
        bench.main()
    out = "step 1750: train loss 1.7000, val loss 1.9000\niter 1999: loss 1.6\nstep 2000: train loss 1.6500, val loss 1.8857\n"
    assert float(bench.FINAL_LOSS.findall(out)[-1][2]) == 1.8857


def test_bench_sft_head_times_both_paths_and_restores_the_threshold(monkeypatch):
    from rlhf import sft_trainer

    bench = load("bench_sft_head")
    args = argparse.Namespace(vocab=64, layers=1, heads=2, width=16, context=16, batch=2, steps=2, warmup=1)
    taken: list[bool] = []
    full_logits = sft_trainer.SFTTrainer.full_logits
    monkeypatch.setattr(sft_trainer.SFTTrainer, "full_logits", lambda self, inputs: taken.append(full_logits(self, inputs)) or taken[-1])
    assert bench.seconds_per_step(args, full_logits=True) > 0 and set(taken) == {True}
    taken.clear()
    assert bench.seconds_per_step(args, full_logits=False) > 0 and set(taken) == {False}
    assert sft_trainer.FULL_LOGITS_MAX == 2**25
