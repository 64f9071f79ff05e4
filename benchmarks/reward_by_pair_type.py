"""Where does the demo's reward model go wrong? Pairwise accuracy broken down by pair type.

A pair's type is the request kind and the gold-judge rubric items that chosen earns and rejected
does not: `arithmetic/correct` is a wrong result against a right one with the same politeness,
`listing/opening+closing` a rude answer against a polite one, and so on (`-` when only a mild flaw
separates them, e.g. an extra word after the closing against a missing closing). The held-out pairs
are exactly the reward stage's (the split its manifest records); `--train` scores the training
pairs too, to tell underfitting from overfitting.

Run after `rlhf run`:  python benchmarks/reward_by_pair_type.py [runs/demo] [--train]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from rlhf.artifacts import read_manifest
from rlhf.config import RewardConfig
from rlhf.data import preference_pairs, read_rows
from rlhf.demo_task import judge_parts, parse_request, user_text
from rlhf.scoring import RewardScorer
from rlhf.stages.reward import split_rows


def pair_type(pair: dict) -> str:
    """`kind/items` — the request kind and the rubric items only chosen earns, joined by '+'."""
    prompt = user_text(pair["prompt"])
    chosen, rejected = (judge_parts(prompt, pair[side][0]["content"]) for side in ("chosen", "rejected"))
    items = "+".join(name for name in chosen if chosen[name] and not rejected[name]) or "-"
    return f"{parse_request(prompt).kind}/{items}"


def accuracy_by_type(scorer: RewardScorer, pairs: list[dict]) -> dict[str, list[int]]:
    """pair type -> [pairs won, pairs], plus the row 'all'."""
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs], normalised=False)
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs], normalised=False)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pair, c, r in zip(pairs, chosen, rejected):
        for key in (pair_type(pair), "all"):
            counts[key][0] += c > r
            counts[key][1] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo")
    parser.add_argument("--train", action="store_true", help="also score the training pairs")
    args = parser.parse_args()

    manifest = read_manifest(f"{args.run_dir}/reward")
    if manifest is None:
        raise SystemExit(f"error: no finished reward stage in {args.run_dir}")
    config = RewardConfig(**manifest["config"])
    train_rows, eval_rows = split_rows(read_rows(config.data), config)
    splits = {"held-out": preference_pairs(config.data, eval_rows)[0]}
    if args.train:
        splits["train"] = preference_pairs(config.data, train_rows)[0]
    scorer = RewardScorer(f"{args.run_dir}/reward")
    results = {name: accuracy_by_type(scorer, pairs) for name, pairs in splits.items()}

    keys = sorted(results["held-out"], key=lambda k: (k == "all", -results["held-out"][k][1], k))
    print("| pair type | " + " | ".join(f"{name} pairs | {name} accuracy" for name in results) + " |")
    print("| --- |" + " ---: | ---: |" * len(results))
    for key in keys:
        cells = []
        for counts in results.values():
            won, total = counts.get(key, [0, 0])
            cells += [str(total), f"{won / total:.3f}" if total else "-"]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
