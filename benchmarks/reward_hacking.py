"""Reward hacking made visible: the demo's PPO curves with and without the KL penalty, side by side.

Prints KL to the SFT policy, normalised reward-model score and gold-judge score (means over a
window of 10 iterations) from two PPO stages' metrics.jsonl.

Run after `rlhf run` and `rlhf run pipelines/demo_no_kl.yaml`:
    python benchmarks/reward_hacking.py [runs/demo/ppo runs/demo_no_kl/ppo]
"""

from __future__ import annotations

import argparse

from rlhf.artifacts import read_metrics


def window_mean(rows: list[dict], index: int, key: str, width: int = 10) -> float:
    window = rows[max(0, index - width // 2) : index + width // 2]
    return sum(row[key] for row in window) / len(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("with_kl", nargs="?", default="runs/demo/ppo")
    parser.add_argument("without_kl", nargs="?", default="runs/demo_no_kl/ppo")
    args = parser.parse_args()
    runs = [read_metrics(args.with_kl), read_metrics(args.without_kl)]
    if not all(runs):
        raise SystemExit("error: run both pipelines first (no metrics.jsonl found)")
    print("| iteration | KL, with penalty | KL, beta = 0 | RM score, with | RM score, beta = 0 | gold, with | gold, beta = 0 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    last = min(len(r) for r in runs) - 1
    for index in sorted({*range(0, last, 10), last}):
        cells = [f"{window_mean(r, index, key):.3f}" for key in ("kl", "rm_score", "judge") for r in runs]
        print(f"| {index + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
