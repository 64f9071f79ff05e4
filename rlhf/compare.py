"""Comparing policy checkpoints on the same held-out prompts (`rlhf compare`, the `report` stage).

Every policy answers every prompt with the same sampling seeds. Per policy: the mean normalised
reward-model score with a 95% confidence interval; the win rate against the first policy judged
by the reward model (ties count half) with a two-sided sign test and a Wilcoxon signed-rank test
on the paired scores; mean KL to a reference policy; perplexity and next-token accuracy on
held-out answers; BLEU against reference answers; a gold judge's score where the task has one;
response length, distinct-1/2 and the share of responses that ended with EOS.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.artifacts import check_model_dir, sha256_file
from rlhf.errors import UserError

SAMPLES_SHOWN = 8
"""Prompts whose responses compare.md shows side by side."""


@dataclass
class CompareSettings:
    """What `compare_policies` measures with; `rlhf compare` flags map onto these one to one."""

    prompts: str
    """Held-out prompt file: a 'prompt' column, an optional 'reference' answer (or SFT-format rows)."""
    reward: str
    """Reward-model directory (the reward stage's output)."""
    reference: str | None = None
    """Policy directory that KL is measured against (usually the SFT model); None: no KL."""
    samples: int = 0
    """Use the first N prompts; 0 means all."""
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 1.0
    judge: str | None = None
    """'module:function' scoring (prompts, responses) -> [0, 1] scores, e.g. rlhf.demo_task:gold_judge."""
    eval_data: str | None = None
    """Held-out SFT-format data for perplexity; None: the prompt file's reference answers, if any."""
    batch_size: int = 64


def command_line(policies: list[str], settings: CompareSettings, out: str | None = None) -> str:
    """The `rlhf compare` command that reproduces a comparison."""
    default = CompareSettings(prompts="", reward="")
    parts = ["rlhf", "compare", *policies, "--reward", settings.reward, "--prompts", settings.prompts]
    for name in ("reference", "samples", "seed", "max_new_tokens", "temperature", "judge", "eval_data", "batch_size"):
        value = getattr(settings, name)
        if value != getattr(default, name) or name == "seed":
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if out:
        parts += ["--out", out]
    return shlex.join(parts)


def policy_names(paths: list[str]) -> list[str]:
    """Short unique labels: the folder name (runs/demo/ppo -> ppo), numbered when repeated."""
    names: list[str] = []
    for path in paths:
        base = Path(path).name or str(path)
        name, number = base, 2
        while name in names:
            name, number = f"{base}#{number}", number + 1
        names.append(name)
    return names


def check_same_tokenizer(paths: list[str]) -> None:
    """Scores, KL and side-by-side sampling need every model to read the same token ids."""
    first = None
    for path in paths:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"{path}: no tokenizer.json; save the tokenizer with the model")
        digest = sha256_file(file)
        if first is None:
            first = (path, digest)
        elif digest != first[1]:
            raise UserError(f"{path}: its tokenizer differs from {first[0]}'s; compared models must share one tokenizer")


def load_prompts(settings: CompareSettings) -> tuple[list[list[dict]], list[str | None], list[tuple[list[dict], str]]]:
    """(prompts, reference answers or None, (prompt, answer) pairs for perplexity)."""
    from rlhf.data import prompts_and_references, read_rows

    pairs = prompts_and_references(settings.prompts, read_rows(settings.prompts))
    if settings.samples:
        pairs = pairs[: settings.samples]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    if settings.eval_data:
        held_out = [(p, r) for p, r in prompts_and_references(settings.eval_data, read_rows(settings.eval_data)) if r]
        if not held_out:
            raise UserError(f"{settings.eval_data}: no reference answers to measure perplexity on")
    else:
        held_out = [(p, r) for p, r in pairs if r is not None]
    return prompts, references, held_out


def compare_policies(policies: list[str], settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Sample every policy on the same prompts and measure it; returns the comparison as plain data."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.evaluation import answer_token_stats, sample_policy
    from rlhf.responses import load_function
    from rlhf.statistics import corpus_bleu, distinct_n, mean_ci, paired_comparison

    # 1. Check every directory and read the prompts before loading any model.
    if not policies:
        raise UserError("name at least one policy directory")
    for path in policies + ([settings.reference] if settings.reference else []):
        check_model_dir(path, "RlhfForCausalLM", "a policy (pretrain, sft or ppo stage output)")
    check_model_dir(settings.reward, "RlhfForSequenceClassification", "a reward model (the reward stage's output)")
    check_same_tokenizer(policies + [settings.reward] + ([settings.reference] if settings.reference else []))
    judge = load_function(settings.judge, "--judge") if settings.judge else None
    prompts, references, held_out = load_prompts(settings)

    # 2. The frozen models every policy is measured with.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(policies[0])
    reward = AutoModelForSequenceClassification.from_pretrained(settings.reward).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(settings.reference).to(device).eval() if settings.reference else None

    # 3. Each policy answers the same prompts with the same seeds.
    names = policy_names(policies)
    rows, samples = [], {}
    for name, path in tqdm(list(zip(names, policies)), desc="comparing", unit="policy", disable=not progress):
        policy = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        sampled = sample_policy(policy, tokenizer, prompts, settings.max_new_tokens, settings.seed, settings.temperature,
                                reward_model=reward, reference=reference, judge=judge, batch_size=settings.batch_size)  # fmt: skip
        mean, low, high = mean_ci(sampled.rm_scores)
        row: dict[str, Any] = {"policy": name, "path": str(path), "rm_score": mean, "rm_score_ci": [low, high]}
        if held_out:
            stats, _ = answer_token_stats(policy, tokenizer, held_out, batch_size=settings.batch_size)
            row.update(perplexity=stats.perplexity, accuracy=stats.accuracy)
        with_reference = [(r, ref) for r, ref in zip(sampled.responses, references) if ref is not None]
        if with_reference:
            row["bleu"] = corpus_bleu([r for r, _ in with_reference], [ref for _, ref in with_reference])
        if reference is not None:
            row["kl"] = sampled.mean("kl")
        if judge is not None:
            row["judge"] = sampled.mean("judge_scores")
        row.update(length=sampled.mean("lengths"), distinct_1=distinct_n(sampled.responses, 1),
                   distinct_2=distinct_n(sampled.responses, 2), stopped=sampled.mean("stopped"))  # fmt: skip
        rows.append(row)
        samples[name] = {"responses": sampled.responses, "rm_scores": sampled.rm_scores, "kl": sampled.kl,
                         "judge_scores": sampled.judge_scores}  # fmt: skip
        del policy

    # 4. Paired statistics against the first policy: same prompt, same seed.
    base = samples[names[0]]
    for row in rows:
        mine = samples[row["policy"]]
        same_text = [a == b for a, b in zip(mine["responses"], base["responses"])]
        paired = paired_comparison(mine["rm_scores"], base["rm_scores"], same_text)
        row.update(win_rate=paired.win_rate, wins=paired.wins, losses=paired.losses, ties=paired.ties,
                   sign_test_p=paired.sign_test_p, wilcoxon_p=paired.wilcoxon_p)  # fmt: skip
    return {
        "command": command_line(policies, settings),
        "settings": asdict(settings),
        "prompts": len(prompts),
        "perplexity_answers": len(held_out),
        "baseline": names[0],
        "policies": rows,
        "samples": {"prompts": prompts, "references": references, **{"policy:" + k: v for k, v in samples.items()}},
    }


# ----------------------------------------------------------------------------- output

COLUMNS = [  # (key, heading, format)
    ("rm_score", "RM score", "{:.3f}"), ("rm_score_ci", "95% CI", "[{:.2f}, {:.2f}]"), ("win_rate", "win rate", "{:.3f}"),
    ("sign_test_p", "sign p", "{:.2g}"), ("wilcoxon_p", "Wilcoxon p", "{:.2g}"), ("kl", "KL", "{:.3f}"),
    ("judge", "gold judge", "{:.3f}"), ("perplexity", "perplexity", "{:.2f}"), ("accuracy", "next-tok acc", "{:.3f}"),
    ("bleu", "BLEU", "{:.1f}"), ("length", "length", "{:.1f}"), ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"), ("stopped", "ended EOS", "{:.2f}"),
]  # fmt: skip


def table_cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """(headings, rows of formatted cells) for the columns present in the result."""
    present = [c for c in COLUMNS if any(c[0] in row for row in result["policies"])]
    headings = ["policy"] + [heading for _, heading, _ in present]
    rows = []
    for row in result["policies"]:
        cells = [row["policy"]]
        for key, _, fmt in present:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
            else:
                cells.append(fmt.format(*value) if isinstance(value, list) else fmt.format(value))
        rows.append(cells)
    return headings, rows


def format_table(result: dict) -> str:
    """The comparison as an aligned terminal table."""
    headings, rows = table_cells(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headings)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headings, widths)))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) for cells in rows]
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    headings, rows = table_cells(result)
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "*(empty)*"


def samples_markdown(result: dict, shown: int = SAMPLES_SHOWN) -> str:
    """The first prompts with every policy's response and score, side by side."""
    from rlhf.responses import prompt_text

    samples = result["samples"]
    names = [row["policy"] for row in result["policies"]]
    lines = []
    for i, prompt in enumerate(samples["prompts"][:shown]):
        lines += [f"**{i + 1}. {_cell(prompt_text(prompt))}**", "", "| policy | response | RM score |", "|---|---|---|"]
        for name in names:
            policy = samples["policy:" + name]
            lines.append(f"| {name} | {_cell(policy['responses'][i])} | {policy['rm_scores'][i]:.2f} |")
        if samples["references"][i]:
            lines.append(f"| *reference* | {_cell(samples['references'][i])} | |")
        lines.append("")
    return "\n".join(lines)


def legend_text(result: dict) -> str:
    settings = result["settings"]
    return (
        f"{result['prompts']} held-out prompts from `{settings['prompts']}`, one response each per policy "
        f"(temperature {settings['temperature']}, at most {settings['max_new_tokens']} tokens, seed {settings['seed']}; "
        f"every policy gets the same sampling seeds). RM score: the reward model's score normalised to mean 0, "
        f"std 1 under the SFT policy, with its 95% t-interval. Win rate: against `{result['baseline']}` on the same "
        f"prompts, judged by the reward model, ties (identical responses) count half; sign p: two-sided exact sign "
        f"test; Wilcoxon p: two-sided signed-rank test of the paired scores. KL: mean over responses of the summed "
        f"log-ratio to `{settings['reference']}` (nats). Perplexity and next-token accuracy: on "
        f"{result['perplexity_answers']} held-out reference answers. BLEU: sacrebleu corpus BLEU against the "
        f"reference answers. Length in tokens; distinct-n: unique n-grams over all n-grams of the responses; "
        f"ended EOS: share of responses that stopped on their own."
    )


def _save(figure, axis, title: str, x_label: str, y_label: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    axis.set_title(title)
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_comparison(result: dict, out_dir: Path) -> list[Path]:
    """score_distribution.png, and kl_vs_score.png when KL was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    names = [row["policy"] for row in result["policies"]]
    scores = {name: samples["policy:" + name]["rm_scores"] for name in names}
    score_label = "reward-model score (normalised: SFT policy mean 0, std 1)"
    figure, axis = plt.subplots(figsize=(7, 4))
    everything = [s for values in scores.values() for s in values]
    bins = [min(everything) + (max(everything) - min(everything) + 1e-9) * i / 30 for i in range(31)]
    for name, values in scores.items():
        axis.hist(values, bins=bins, histtype="step", linewidth=1.8, label=f"{name} (mean {sum(values) / len(values):.2f})")
    written = [_save(figure, axis, f"Reward-model scores on {result['prompts']} held-out prompts", score_label,
                     "responses", out_dir / "score_distribution.png")]  # fmt: skip
    if all(samples["policy:" + name]["kl"] for name in names):
        figure, axis = plt.subplots(figsize=(7, 4))
        for name in names:
            kl = samples["policy:" + name]["kl"]
            points = axis.scatter(kl, scores[name], s=10, alpha=0.4, label=name)
            axis.scatter([sum(kl) / len(kl)], [sum(scores[name]) / len(kl)], s=160, marker="X",
                         color=points.get_facecolor()[0], edgecolor="black", alpha=1.0)  # fmt: skip
        axis.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, logarithmic above
        written.append(_save(figure, axis, "KL to the reference policy against reward-model score (X: means)",
                             f"KL(policy || {result['settings']['reference']}) per response (nats, symlog scale)",
                             "reward-model score (normalised)", out_dir / "kl_vs_score.png"))  # fmt: skip
    return written


def finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_comparison(result: dict, out_dir: str | Path) -> list[Path]:
    """compare.json, compare.md and the plots in `out_dir`; returns the files written."""
    from rlhf.artifacts import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_comparison(result, out_dir)
    atomic_write_text(out_dir / "compare.json", json.dumps(finite(result), indent=1, ensure_ascii=False) + "\n")
    page = [
        "# Policy comparison", "", f"Reproduce: `{result['command']}`", "", markdown_table(result), "", legend_text(result), "",
        *[f"![{p.stem}]({p.name})" for p in plots], "", "## Sample responses", "", samples_markdown(result),
    ]  # fmt: skip
    atomic_write_text(out_dir / "compare.md", "\n".join(page) + "\n")
    return [out_dir / "compare.json", out_dir / "compare.md", *plots]
