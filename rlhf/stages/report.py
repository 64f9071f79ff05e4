"""Stage `report`: the one page to open after `rlhf run`.

Compares the run's policies (by default SFT, PPO and the pretrained model, then best-of-4 and
best-of-16 sampling from SFT with the reward model) on held-out prompts exactly as `rlhf compare`
does, with the same seed, draws every stage's training curves, and writes `<run_dir>/report.md`
(figures and samples in `<run_dir>/report/`). The page names the `rlhf compare` command that
reproduces its table.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable, NamedTuple

from rlhf.config import ReportConfig
from rlhf.stages import STAGES, StageContext
from rlhf.console import say

HEADLINE_METRICS = {  # stage -> manifest metrics worth a line in the report
    "tokenizer": ("vocab_size",),
    "pretrain": ("eval_loss", "eval_perplexity", "steps"),
    "sft": ("eval_loss", "eval_accuracy", "judge_before", "judge_after"),
    "reward": ("eval_accuracy", "eval_margin", "reward_mean", "reward_std"),
    "dpo": ("eval_accuracy", "eval_margin", "judge_before", "judge_after"),
}
RL_HEADLINE_METRICS = ("eval_rm_score_sft", "eval_rm_score", "eval_judge_sft", "eval_judge", "eval_kl", "beta")
"""Every RL stage's (`rlhf.rl_driver.RLRun.finish`)."""


def headline_metrics(stage: str) -> tuple[str, ...]:
    from rlhf.config import RLConfig

    return RL_HEADLINE_METRICS if issubclass(STAGES[stage].config, RLConfig) else HEADLINE_METRICS.get(stage, ())


def upstream(config: ReportConfig) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*config.policies, config.reference, config.reward]))


def inputs(config: ReportConfig) -> list[str]:
    return [config.eval_prompts] + ([config.eval_data] if config.eval_data else [])


class ReportInputs(NamedTuple):
    prompts: list[tuple]
    """(prompt, reference answer or None) of each held-out prompt."""
    eval_data: list[tuple]
    """(prompt, reference answer) of the perplexity data; empty without `eval_data`."""
    judge: Callable | None


def read_inputs(config: ReportConfig) -> ReportInputs:
    """Check the prompt and perplexity files and the judge before any stage runs (`rlhf compare` reads
    them again by name, as the command the report prints does)."""
    from rlhf.data import prompts_and_references, read_rows
    from rlhf.responses import load_function

    prompts = prompts_and_references(config.eval_prompts, read_rows(config.eval_prompts))
    eval_data = prompts_and_references(config.eval_data, read_rows(config.eval_data)) if config.eval_data else []
    judge = load_function(config.judge, "judge", probe=[prompt for prompt, _ in prompts]) if config.judge else None
    return ReportInputs(prompts, eval_data, judge)


def settings_for(config: ReportConfig, run_dir: Path, seed: int):
    """The `rlhf compare` settings this report uses (so the same command reproduces it)."""
    from rlhf.compare import CompareSettings

    return CompareSettings(
        prompts=config.eval_prompts, reward=str(run_dir / config.reward), reference=str(run_dir / config.reference),
        samples=config.samples, seed=seed, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        judge=config.judge or None, eval_data=config.eval_data or None, batch_size=config.batch_size,
    )  # fmt: skip


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_lines(run_dir: Path) -> list[str]:
    """A markdown table of every completed stage: time and headline metrics from its manifest."""
    from rlhf.artifacts import complete_manifest

    lines = ["| stage | seconds | headline metrics |", "|---|---|---|"]
    for stage in STAGES:
        manifest = complete_manifest(run_dir / stage)
        if not manifest:
            continue
        metrics = manifest.get("metrics") or {}
        shown = ", ".join(f"{k} {_number(metrics[k])}" for k in headline_metrics(stage) if metrics.get(k) is not None)
        lines.append(f"| {stage} | {manifest.get('seconds', '-')} | {shown or '-'} |")
    return lines


def headline(result: dict) -> str:
    """One line per policy against the baseline: win rate, wins/losses/ties, sign test, and the judge if any."""
    lines = []
    for row in result["policies"][1:]:
        verdict = "significant at 0.05" if row["sign_test_p"] < 0.05 else "not significant at 0.05"
        judge = f"; gold judge {row['judge']:.3f} against {result['policies'][0]['judge']:.3f}" if "judge" in row else ""
        picked = " that picked its answers" if row.get("best_of") else ""  # best-of-n: an in-sample win rate
        lines.append(
            f"- **{row['policy']}** against **{result['baseline']}**: win rate {row['win_rate']:.3f} by the reward model{picked} "
            f"({row['wins']} wins, {row['losses']} losses, {row['ties']} ties; sign test p = {row['sign_test_p']:.2g}, "
            f"{verdict}){judge}."
        )
    return "\n".join(lines)


def run(ctx: StageContext) -> dict:
    from rlhf.artifacts import atomic_write_text
    from rlhf.compare import compare_policies, format_table, legend_text, markdown_table, samples_markdown, write_comparison
    from rlhf.plots import logged_stages, plot_stage

    config: ReportConfig = ctx.config
    run_dir = ctx.run_dir

    # 1. Check the upstream stages, then compare their policies and best-of-N from the first, as `rlhf compare` would.
    policies = [str(ctx.upstream(stage)) for stage in config.policies]
    policies += [f"{policies[0]}@best-of-{n}" for n in config.best_of]
    for stage in (config.reference, config.reward):
        ctx.upstream(stage)
    settings = settings_for(config, run_dir, ctx.seed)
    result = compare_policies(policies, settings)
    out_dir = ctx.begin()
    written = write_comparison(result, out_dir)
    print(format_table(result))

    # 2. Every stage's training curves.
    curves = [plot_stage(run_dir / s, out_dir / f"curves_{s}.png") for s in logged_stages(run_dir)]
    curves = [c for c in curves if c is not None]

    # 3. The page.
    folder = ctx.name  # the page links the figures where the swap puts them
    page = [
        f"# RLHF run report: `{run_dir}`", "",
        f"Seed {ctx.seed}; written {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}.", "",
        "## Policies on held-out prompts", "", headline(result), "", markdown_table(result), "", legend_text(result), "",
        f"Reproduce this table: `{result['command']}`", "",
        *[f"![{p.stem}]({folder}/{p.name})" for p in written if p.suffix == ".png"], "",
        "## Stages", "", *stage_lines(run_dir), "",
        "## Training curves", "", *[f"![{p.stem}]({folder}/{p.name})" for p in curves], "",
        "## Sample responses", "", samples_markdown(result),
    ]  # fmt: skip
    atomic_write_text(run_dir / "report.md", "\n".join(page) + "\n")
    say("report", f"wrote {run_dir / 'report.md'}")
    return {f"{row['policy']}_{key}": row[key] for row in result["policies"]
            for key in ("rm_score", "win_rate", "sign_test_p", "kl", "judge") if key in row}  # fmt: skip
