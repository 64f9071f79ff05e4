"""Does PPO beat SFT on the demo's gold judge? Held-out prompts, several sampling seeds, a sign test.

Both policies answer every prompt once per seed, with the same seeds; pairs of answers are compared
by the gold judge (ties dropped) and a two-sided sign test gives the p-value of "PPO is no better
than SFT". The gain is also given per seed, as a mean over the seeds with its 95% t-interval.

`--generator-seed N` draws the prompts from the demo generator run with another seed (its
held-out evaluation prompts and its PPO prompts, which the run never saw as such) instead of
data_samples/eval.jsonl. `--policy` names another stage folder or `DIR@best-of-N` to compare
with SFT (e.g. the gold-reward upper bound, `runs/demo_gold_reward/ppo`).

Run after `rlhf run`:  python benchmarks/demo_gold_gain.py [runs/demo] [--seeds 5] [--generator-seed 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from scipy.stats import binomtest
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlhf  # noqa: F401
from rlhf.data import read_rows
from rlhf.demo_task import gold_judge, write_data_samples
from rlhf.evaluation import sample_policy
from rlhf.statistics import mean_ci


def prompts_of(args) -> list:
    if args.generator_seed is None:
        return [row["prompt"] for row in read_rows(args.prompts)]
    with tempfile.TemporaryDirectory() as folder:
        paths = write_data_samples(folder, seed=args.generator_seed)
        return [row["prompt"] for name in ("eval.jsonl", "ppo_prompts.jsonl") for row in read_rows(paths[name])]


def judge_scores(path: str, tokenizer, prompts: list, seeds: int, max_new_tokens: int, reward: str) -> list[list[float]]:
    """Gold scores per seed (seeds x prompts) of a policy folder or `DIR@best-of-N` (picked by `reward`)."""
    from rlhf.scoring import RewardScorer

    folder, _, suffix = path.partition("@best-of-")
    policy = AutoModelForCausalLM.from_pretrained(folder).eval()
    extra = {"best_of": int(suffix), "reward_model": RewardScorer(reward).model} if suffix else {}
    return [sample_policy(policy, tokenizer, prompts, max_new_tokens, seed=seed, judge=gold_judge, **extra).judge_scores
            for seed in range(seeds)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    parser.add_argument("--prompts", default="data_samples/eval.jsonl")
    parser.add_argument("--generator-seed", type=int, default=None, help="prompts from the demo generator with this seed")
    parser.add_argument("--policy", default=None, help="policy compared with SFT (default RUN_DIR/ppo)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(f"{args.run_dir}/sft")
    prompts = prompts_of(args)
    reward = f"{args.run_dir}/reward"
    sft = judge_scores(f"{args.run_dir}/sft", tokenizer, prompts, args.seeds, args.max_new_tokens, reward)
    other = judge_scores(args.policy or f"{args.run_dir}/ppo", tokenizer, prompts, args.seeds, args.max_new_tokens, reward)
    flat_sft, flat_other = sum(sft, []), sum(other, [])
    better = sum(p > s for s, p in zip(flat_sft, flat_other))
    worse = sum(p < s for s, p in zip(flat_sft, flat_other))
    p_value = binomtest(better, better + worse).pvalue if better + worse else 1.0
    gains = [statistics.fmean(o) - statistics.fmean(s) for s, o in zip(sft, other)]
    gain, low, high = mean_ci(gains)
    name = args.policy or "PPO"
    print(f"{len(prompts)} prompts x {args.seeds} seeds: gold judge SFT {statistics.fmean(flat_sft):.3f}, "
          f"{name} {statistics.fmean(flat_other):.3f}")  # fmt: skip
    print(f"gain per seed: mean {gain:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}] ({', '.join(f'{g:+.3f}' for g in gains)})")
    print(f"{name} better on {better}, worse on {worse}, tied on {len(flat_sft) - better - worse}; sign test p = {p_value:.3g}")
    print(f"RESULT sft={statistics.fmean(flat_sft):.4f} policy={statistics.fmean(flat_other):.4f} gain={gain:.4f} "
          f"gain_low={low:.4f} gain_high={high:.4f} p_value={p_value:.4g}")  # fmt: skip


if __name__ == "__main__":
    main()
