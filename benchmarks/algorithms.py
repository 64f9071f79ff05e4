"""PPO, GRPO, RLOO, REINFORCE++ and DPO side by side on the demo task, each with the same wall-clock budget.

Every algorithm starts from the same finished demo run (its tokenizer, pretrain, SFT and reward stages
are copied, never retrained) and runs its shipped pipeline's stage (`pipelines/demo.yaml` for PPO,
`pipelines/demo_<algorithm>.yaml` for the others) on this machine, one after another, with the same
wall-clock budget, `max_seconds` = `--budget` (default 120 s): a stage stops after the iteration (RL)
or optimizer step (DPO) that reaches it. By default each runs its shipped recipe (steps and schedule)
within the budget, and the cheaper ones finish early (the table gives each one's time);
`--fill-budget` makes every one train until the budget ends instead (`steps` / `epochs` raised, the
learning rate held constant: a decay schedule cut short would compare schedules, not algorithms).
A checkpoint is kept every `--save-every` iterations (RL) or steps (DPO; the Trainer keeps the last two).

Then, on the demo's held-out prompts:
- the table: the gold judge over `--seeds` sampling seeds against SFT's with the same seeds (mean
  gain per seed with its 95% t-interval, two-sided sign test over every answer pair, ties dropped),
  the reward model's normalised score and the KL to the SFT policy (sampled k1, seed 0), episodes/s
  (RL: episodes sampled / training seconds; DPO: preference pairs) and the stage's wall time;
- the frontier: every checkpoint's (KL to SFT, gold judge) at seed 0, per algorithm, with best-of-n
  from the SFT policy (n = 1, 2, 4, 8, 16; KL log n - (n - 1)/n) as the reference curve, drawn to
  `<out>/algorithms_frontier.png`; the table goes to `<out>/algorithms.md` and `algorithms.json`.

Run after `rlhf run`:  python benchmarks/algorithms.py runs/demo [--budget 120] [--fill-budget] [--seeds 5] [--work runs/algorithms]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scipy.stats import binomtest

ALGORITHMS = {  # name -> (stage, pipeline, the overrides that let it train until the budget ends: --fill-budget)
    "ppo": ("ppo", "pipelines/demo.yaml", ["steps=100000"]),
    "grpo": ("grpo", "pipelines/demo_grpo.yaml", ["steps=100000"]),
    "rloo": ("rloo", "pipelines/demo_rloo.yaml", ["steps=100000"]),
    "reinforce_pp": ("reinforce_pp", "pipelines/demo_reinforce_pp.yaml", ["steps=100000"]),
    "dpo": ("dpo", "pipelines/demo_dpo.yaml", ["epochs=1000"]),
}
UPSTREAM = ("tokenizer", "pretrain", "sft", "reward")
BEST_OF = (1, 2, 4, 8, 16)


def train(name: str, demo: Path, work: Path, budget: float, save_every: int, fill: bool) -> dict:
    """Run algorithm `name`'s stage on a copy of the demo's upstream stages; returns its manifest."""
    stage, pipeline, overrides = ALGORITHMS[name]
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for upstream in UPSTREAM:
        shutil.copytree(demo / upstream, run_dir / upstream)
    settings = [f"max_seconds={budget}", f"save_every={save_every}"] + ([*overrides, "lr_schedule=constant"] if fill else [])
    command = ["rlhf", "run", pipeline, "--run-dir", str(run_dir), "--only", stage, *[f"stages.{stage}.{s}" for s in settings]]
    print(f"{name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    manifest = json.loads((run_dir / stage / "manifest.json").read_text(encoding="utf-8"))
    manifest["wall_seconds"] = time.perf_counter() - started
    return manifest


def checkpoint_policies(stage_dir: Path):
    """(label, policy) for every kept checkpoint of a stage, oldest first, then the final policy."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    from rlhf.checkpoints import checkpoint_step, complete_checkpoints

    for folder in complete_checkpoints(stage_dir / "checkpoints"):
        if (folder / "config.json").is_file():  # a Trainer checkpoint: a model folder of its own
            yield f"step {checkpoint_step(folder)}", AutoModelForCausalLM.from_pretrained(folder).eval()
        else:  # an RL checkpoint: the policy's weights, loaded into the final model's architecture
            policy = AutoModelForCausalLM.from_pretrained(stage_dir).eval()
            load_model(policy, str(folder / "policy.safetensors"))
            yield f"iteration {checkpoint_step(folder)}", policy
    yield "final", AutoModelForCausalLM.from_pretrained(stage_dir).eval()


def measure(policy, context: dict, seeds: int) -> dict:
    """Gold scores per seed (seeds x prompts), and seed 0's reward-model score and KL to SFT."""
    from rlhf.demo_task import gold_judge
    from rlhf.evaluation import sample_policy

    first = sample_policy(policy, context["tokenizer"], context["prompts"], context["max_new_tokens"], seed=0,
                          reward_model=context["reward"], reference=context["sft"], judge=gold_judge)  # fmt: skip
    gold = [first.judge_scores] + [
        sample_policy(policy, context["tokenizer"], context["prompts"], context["max_new_tokens"], seed=seed, judge=gold_judge).judge_scores
        for seed in range(1, seeds)
    ]  # fmt: skip
    return {"gold": gold, "rm_score": first.mean("rm_scores"), "kl": first.mean("kl")}


def against_sft(gold: list[list[float]], sft: list[list[float]]) -> dict:
    """Mean gain per seed with its 95% t-interval, and the sign test over every answer pair."""
    from rlhf.statistics import mean_ci

    pairs = list(zip(sum(sft, []), sum(gold, [])))
    better, worse = sum(g > s for s, g in pairs), sum(g < s for s, g in pairs)
    gain, low, high = mean_ci([statistics.fmean(g) - statistics.fmean(s) for s, g in zip(sft, gold)])
    return {"gold": statistics.fmean(sum(gold, [])), "gain": gain, "gain_low": low, "gain_high": high,
            "better": better, "worse": worse, "p_value": binomtest(better, better + worse).pvalue if better + worse else 1.0}  # fmt: skip


def throughput(stage_dir: Path, manifest: dict) -> tuple[int, float]:
    """(episodes sampled or preference pairs trained on, seconds of training) of a finished stage."""
    from rlhf.artifacts import read_metrics

    metrics, config = manifest["metrics"], manifest["config"]
    if "episodes" in metrics:  # an RL stage: the iterations' own timings (no normalisation or evaluation)
        rows = read_metrics(stage_dir)
        return metrics["episodes"], sum(row["time_generate"] + row["time_score"] + row["time_update"] for row in rows)
    return metrics["steps"] * config["batch_size"] * config["grad_accum"], metrics["train_seconds"]


def frontier_point(policy, context: dict) -> tuple[float, float]:
    scores = measure(policy, context, seeds=1)
    return scores["kl"], statistics.fmean(scores["gold"][0])


def best_of_curve(context: dict) -> list[tuple[int, float, float]]:
    """(n, analytic KL, gold judge at seed 0) of best-of-n sampling from the SFT policy."""
    from rlhf.demo_task import gold_judge
    from rlhf.evaluation import best_of_n_kl, sample_policy

    curve = []
    for n in BEST_OF:
        samples = sample_policy(context["sft"], context["tokenizer"], context["prompts"], context["max_new_tokens"], seed=0,
                                reward_model=context["reward"], judge=gold_judge, best_of=n)  # fmt: skip
        curve.append((n, best_of_n_kl(n), samples.mean("judge_scores")))
    return curve


def draw(frontiers: dict, curve: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot([kl for _, kl, _ in curve], [gold for _, _, gold in curve], "k--o", label="SFT best-of-n (n = 1 ... 16)")
    for name, points in frontiers.items():  # (KL, gold) pairs
        axis.plot([kl for kl, _ in points], [gold for _, gold in points], "-o", label=name)
    axis.set_xlabel("KL to the SFT policy (nats per answer; best-of-n: analytic)")
    axis.set_ylabel("gold judge, held-out prompts (seed 0)")
    axis.set_title("Gold judge against KL: each algorithm's checkpoints")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(rows: dict, sft: dict, seeds: int, budget: float, fill: bool) -> str:
    how = "each trained until it ended" if fill else "each ran its shipped recipe within it"
    lines = [f"Budget: {budget:g} s of training per algorithm on this machine ({how}); gold judge over {seeds} sampling seeds.", "",
             "| algorithm | gold judge | gain vs SFT (95% CI) | better / worse | sign-test p | RM score | KL to SFT | episodes/s | training s | stage wall s |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| SFT | {sft['gold']:.3f} | | | | {sft['rm_score']:.3f} | 0 | | | |"]  # fmt: skip
    for name, row in rows.items():
        lines.append(f"| {name} | {row['gold']:.3f} | {row['gain']:+.3f} [{row['gain_low']:+.3f}, {row['gain_high']:+.3f}] | "
                     f"{row['better']} / {row['worse']} | {row['p_value']:.2g} | {row['rm_score']:.3f} | {row['kl']:.3f} | "
                     f"{row['episodes_per_second']:.1f} | {row['train_seconds']:.0f} | {row['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/demo", help="a finished demo run")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training per algorithm, at most")
    parser.add_argument("--fill-budget", action="store_true", help="train every algorithm until the budget ends")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--work", default="runs/algorithms", help="where each algorithm's run directory goes")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prompts", default="data_samples/eval.jsonl")
    args = parser.parse_args()

    import rlhf  # noqa: F401  (registers the architectures)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.data import read_rows
    from rlhf.scoring import RewardScorer

    demo, work, out = Path(args.run_dir), Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {name: train(name, demo, work, args.budget, args.save_every, args.fill_budget) for name in args.algorithms}

    sft = AutoModelForCausalLM.from_pretrained(demo / "sft").eval()
    context = {"tokenizer": AutoTokenizer.from_pretrained(demo / "sft"), "prompts": [row["prompt"] for row in read_rows(args.prompts)],
               "max_new_tokens": 40, "reward": RewardScorer(demo / "reward").model, "sft": sft}  # fmt: skip
    baseline = measure(sft, {**context, "sft": None}, args.seeds)
    baseline["gold"], sft_gold = statistics.fmean(sum(baseline["gold"], [])), baseline["gold"]
    rows, frontiers = {}, {}
    for name, manifest in manifests.items():
        stage_dir = work / name / ALGORITHMS[name][0]
        points = [frontier_point(policy, context) for _, policy in checkpoint_policies(stage_dir)]
        final = measure(AutoModelForCausalLM.from_pretrained(stage_dir).eval(), context, args.seeds)
        examples, seconds = throughput(stage_dir, manifest)
        rows[name] = {**against_sft(final["gold"], sft_gold), "rm_score": final["rm_score"], "kl": final["kl"],
                      "episodes_per_second": examples / seconds, "train_seconds": seconds, "wall_seconds": manifest["wall_seconds"]}  # fmt: skip
        frontiers[name] = [(0.0, 0.0, statistics.fmean(sft_gold[0]))] + [(i, kl, gold) for i, (kl, gold) in enumerate(points, 1)]
        print(f"{name}: gold {rows[name]['gold']:.3f} (gain {rows[name]['gain']:+.3f}, p {rows[name]['p_value']:.2g}), "
              f"KL {final['kl']:.3f}", flush=True)  # fmt: skip
    curve = best_of_curve(context)
    markdown = table(rows, baseline, args.seeds, args.budget, args.fill_budget)
    print(markdown)
    (out / "algorithms.md").write_text(markdown + "\n", encoding="utf-8")
    (out / "algorithms.json").write_text(json.dumps({"budget": args.budget, "fill_budget": args.fill_budget, "seeds": args.seeds, "sft": baseline, "algorithms": rows,
                                                     "frontiers": frontiers, "best_of": curve}, indent=1), encoding="utf-8")  # fmt: skip
    draw({name: [(kl, gold) for _, kl, gold in points] for name, points in frontiers.items()}, curve, out / "algorithms_frontier.png")
    print(f"wrote {out / 'algorithms.md'}, {out / 'algorithms.json'}, {out / 'algorithms_frontier.png'}")


if __name__ == "__main__":
    main()
