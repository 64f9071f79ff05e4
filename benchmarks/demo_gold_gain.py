"""Does PPO beat SFT on the demo's gold judge? Held-out prompts, several sampling seeds, a sign test.

Both policies answer every prompt of data_samples/eval.jsonl once per seed, with the same seeds;
pairs of answers are compared by the gold judge (ties dropped) and a two-sided sign test gives the
p-value of "PPO is no better than SFT".

Run after `rlhf run`:  python benchmarks/demo_gold_gain.py [runs/demo] [--seeds 5]
"""

from __future__ import annotations

import argparse

from scipy.stats import binomtest
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlhf  # noqa: F401
from rlhf.data import read_rows
from rlhf.demo_task import gold_judge
from rlhf.evaluation import sample_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    parser.add_argument("--prompts", default="data_samples/eval.jsonl")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(f"{args.run_dir}/sft")
    prompts = [row["prompt"] for row in read_rows(args.prompts)]
    scores: dict[str, list[float]] = {}
    for stage in ("sft", "ppo"):
        policy = AutoModelForCausalLM.from_pretrained(f"{args.run_dir}/{stage}").eval()
        scores[stage] = [
            score
            for seed in range(args.seeds)
            for score in sample_policy(policy, tokenizer, prompts, args.max_new_tokens, seed=seed, judge=gold_judge).judge_scores
        ]
    sft, ppo = scores["sft"], scores["ppo"]
    better = sum(p > s for s, p in zip(sft, ppo))
    worse = sum(p < s for s, p in zip(sft, ppo))
    p_value = binomtest(better, better + worse).pvalue if better + worse else 1.0
    print(f"{len(prompts)} prompts x {args.seeds} seeds: gold judge SFT {sum(sft) / len(sft):.3f}, PPO {sum(ppo) / len(ppo):.3f}")
    print(f"PPO better on {better}, worse on {worse}, tied on {len(sft) - better - worse}; sign test p = {p_value:.3g}")
    print(f"RESULT sft={sum(sft) / len(sft):.4f} ppo={sum(ppo) / len(ppo):.4f} p_value={p_value:.4g}")


if __name__ == "__main__":
    main()
