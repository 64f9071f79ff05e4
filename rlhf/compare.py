"""Comparing policy checkpoints on the same held-out prompts (`rlhf compare`, the `report` stage).

Every policy answers every prompt with the same sampling seeds. Per policy: the mean normalised
reward-model score with a 95% confidence interval; the win rate against the first policy judged
by the reward model (ties count half) with a two-sided sign test and a Wilcoxon signed-rank test
on the paired scores; mean KL to a reference policy; perplexity and next-token accuracy on
held-out answers; BLEU against reference answers; a gold judge's score where the task has one;
response length, distinct-1/2 and the share of responses that ended with EOS.

A policy may also be `DIR@best-of-N`: best-of-N sampling from DIR with the comparison's reward
model (N answers per prompt, the highest-scoring one kept). Its reward-model figures are in-sample
(it chose by that score), its KL is analytic and it has no perplexity (see `legend_text`).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.artifacts import CAUSAL_LM, REWARD_MODEL, check_model_dir, sha256_file
from rlhf.errors import UserError

SAMPLES_SHOWN = 8
"""Prompts whose responses compare.md shows side by side."""
BEST_OF_SUFFIX = re.compile(r"best-of-([0-9]+)")
"""What may follow '@' in a policy argument: DIR@best-of-N."""
ANALYTIC_MARK = "*"
"""Appended in tables to a KL computed by formula rather than sampled."""


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
    """Rows sampled together, each batch with its own seed (a best-of-N policy's batch holds batch_size // N
    prompts); part of the seeding, so reproducing a comparison needs the same value."""
    device: str | None = None
    """Torch device the models run on (`rlhf.devices.resolve_device`); None: cuda if available, else cpu.
    CPU and CUDA draw different random numbers from the same seed."""


@dataclass(frozen=True)
class PolicySpec:
    """A policy argument: a policy directory, or `DIR@best-of-N`."""

    path: str
    """The policy directory (for best-of-N, the policy sampled from)."""
    best_of: int | None = None
    """N of best-of-N sampling from `path` with the reward model; None: `path`'s own samples."""

    @property
    def label(self) -> str:
        """runs/demo/sft -> sft; runs/demo/sft@best-of-16 -> sft@best-of-16."""
        base = Path(self.path).name or self.path
        return f"{base}@best-of-{self.best_of}" if self.best_of else base


def parse_policy(argument: str) -> PolicySpec:
    """`DIR` or `DIR@best-of-N` (N >= 1); anything else after the last '@' is a UserError."""
    path, at, suffix = argument.rpartition("@")
    if not at or "/" in suffix:  # no '@', or one inside a folder name (runs/lr@3e-4/sft)
        return PolicySpec(argument)
    match = BEST_OF_SUFFIX.fullmatch(suffix)
    if not path or match is None or int(match.group(1)) < 1:
        raise UserError(f"policy {argument!r}: expected a policy directory or DIR@best-of-N with N a positive integer, "
                        "e.g. runs/demo/sft@best-of-16")  # fmt: skip
    return PolicySpec(path, int(match.group(1)))


def command_line(policies: list[str], settings: CompareSettings, out: str | None = None) -> str:
    """The `rlhf compare` command that reproduces a comparison."""
    default = CompareSettings(prompts="", reward="")
    parts = ["rlhf", "compare", *policies, "--reward", settings.reward, "--prompts", settings.prompts]
    for name in ("reference", "samples", "seed", "max_new_tokens", "temperature", "judge", "eval_data", "batch_size", "device"):
        value = getattr(settings, name)
        if value != getattr(default, name) or name == "seed":
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if out:
        parts += ["--out", out]
    return shlex.join(parts)


def policy_names(specs: list[PolicySpec]) -> list[str]:
    """Short unique labels: the folder name (runs/demo/ppo -> ppo, runs/demo/sft@best-of-4 -> sft@best-of-4),
    numbered when repeated."""
    names: list[str] = []
    for spec in specs:
        base = spec.label
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
    """Sample every policy (a directory or `DIR@best-of-N`) on the same prompts and measure it;
    returns the comparison as plain data."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import rlhf.model  # noqa: F401  (registers the Auto classes)
    from rlhf.console import progress_bar
    from rlhf.devices import resolve_device
    from rlhf.evaluation import answer_token_stats, best_of_n_kl, sample_policy
    from rlhf.responses import load_function
    from rlhf.stages import A_POLICY
    from rlhf.statistics import corpus_bleu, distinct_n, mean_ci, paired_comparison

    # 1. Check every directory and read the prompts before loading any model.
    if not policies:
        raise UserError("name at least one policy directory")
    specs = [parse_policy(policy) for policy in policies]
    paths = list(dict.fromkeys(spec.path for spec in specs))
    for path in paths + ([settings.reference] if settings.reference else []):
        context = check_model_dir(path, CAUSAL_LM, A_POLICY).get("n_positions")
        if isinstance(context, int) and settings.max_new_tokens >= context:
            raise UserError(f"--max-new-tokens {settings.max_new_tokens}: must be less than the context of {path} ({context} tokens)")
    check_model_dir(settings.reward, REWARD_MODEL, "a reward model (the reward stage's output)")
    check_same_tokenizer(paths + [settings.reward] + ([settings.reference] if settings.reference else []))
    prompts, references, held_out = load_prompts(settings)
    judge = load_function(settings.judge, "--judge", probe=prompts) if settings.judge else None

    # 2. The frozen models every policy is measured with.
    device = resolve_device(settings.device)
    tokenizer = AutoTokenizer.from_pretrained(specs[0].path)
    reward = AutoModelForSequenceClassification.from_pretrained(settings.reward).to(device).eval()
    reference = AutoModelForCausalLM.from_pretrained(settings.reference).to(device).eval() if settings.reference else None

    # 3. Each policy answers the same prompts with the same seeds; best-of-N keeps the reward model's
    #    favourite of N answers, and its KL is the formula's, to its base policy when that is the reference.
    names = policy_names(specs)
    rows, samples = [], {}
    for name, spec in progress_bar("comparing", iterable=list(zip(names, specs)), unit="policy", disable=not progress):
        policy = AutoModelForCausalLM.from_pretrained(spec.path).to(device).eval()
        sampled = sample_policy(policy, tokenizer, prompts, settings.max_new_tokens, settings.seed, settings.temperature,
                                reward_model=reward, reference=None if spec.best_of else reference, judge=judge,
                                batch_size=settings.batch_size, best_of=spec.best_of or 1)  # fmt: skip
        mean, low, high = mean_ci(sampled.rm_scores)
        row: dict[str, Any] = {"policy": name, "path": spec.path, "rm_score": mean, "rm_score_ci": [low, high]}
        if spec.best_of:
            row["best_of"] = spec.best_of
        if held_out and not spec.best_of:
            stats, _ = answer_token_stats(policy, tokenizer, held_out, batch_size=settings.batch_size)
            row.update(perplexity=stats.perplexity, accuracy=stats.accuracy)
        with_reference = [(r, ref) for r, ref in zip(sampled.responses, references) if ref is not None]
        if with_reference:
            row["bleu"] = corpus_bleu([r for r, _ in with_reference], [ref for _, ref in with_reference])
        if reference is not None and spec.best_of:
            same_model = Path(spec.path).resolve() == Path(settings.reference).resolve()
            row.update(kl=best_of_n_kl(spec.best_of) if same_model else None, kl_analytic=True)
        elif reference is not None:
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
                cells[-1] += ANALYTIC_MARK if row.get(f"{key}_analytic") else ""
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
    best_of = [row for row in result["policies"] if row.get("best_of")]
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
        + (best_of_legend(result) if best_of else "")
    )


def best_of_legend(result: dict) -> str:
    """What the best-of-N rows' columns mean."""
    return (
        f" `X@best-of-N`: best-of-N sampling from X, N answers per prompt at the same temperature and length limit "
        f"(each prompt's N candidates are rows of one batch, a batch holding batch_size // N prompts, seeded from "
        f"seed {result['settings']['seed']} like every batch), the one the reward model scores highest kept (the first "
        f"among ties). Its RM score and win rate are in-sample (the answer was chosen by that score); the gold judge "
        f"is the honest measure. Its KL (marked `{ANALYTIC_MARK}`) is not sampled but analytic, log N - (N-1)/N, the KL "
        f"of best-of-N to X (Stiennon et al. 2020; an upper bound, tight when X rarely repeats an answer, Beirami et "
        f"al. 2024), shown only where X is the KL reference. It has no perplexity or next-token accuracy: best-of-N "
        f"does not define next-token probabilities of its own, and X's are in X's row."
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
    with_kl = [row for row in result["policies"] if row.get("kl") is not None]
    if with_kl:
        figure, axis = plt.subplots(figsize=(7, 4))
        for row in with_kl:
            name, kl = row["policy"], samples["policy:" + row["policy"]]["kl"]
            mean_score = sum(scores[name]) / len(scores[name])
            if kl:
                points = axis.scatter(kl, scores[name], s=10, alpha=0.4, label=name)
                axis.scatter([sum(kl) / len(kl)], [mean_score], s=160, marker="X",
                             color=points.get_facecolor()[0], edgecolor="black", alpha=1.0)  # fmt: skip
            else:  # best-of-N: the analytic KL has no per-response values, only the mean
                axis.scatter([row["kl"]], [mean_score], s=160, marker="X", edgecolor="black", label=f"{name} (analytic KL)")
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
