"""Statistics for comparing policies: confidence intervals, paired win rates and their tests, text
diversity and BLEU. Plain functions of lists of numbers or strings (scipy, sacrebleu), no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t confidence interval of the mean; the interval is the mean itself
    for a single value or values that are all equal."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass
class PairedComparison:
    """A policy's per-prompt scores against the baseline's on the same prompts."""

    wins: int
    losses: int
    ties: int
    win_rate: float
    """(wins + ties / 2) / prompts."""
    sign_test_p: float
    """Two-sided exact binomial test of wins against losses (ties dropped); 1 when all tie."""
    wilcoxon_p: float
    """Two-sided Wilcoxon signed-rank test on the score differences (zeros dropped); 1 when all are zero."""
    mean_difference: float


def paired_comparison(scores: list[float], baseline: list[float], tied: list[bool] | None = None,
                      tolerance: float = 1e-6) -> PairedComparison:  # fmt: skip
    """Compare `scores` with `baseline` prompt by prompt.

    A prompt is a tie when `tied` says so (e.g. both responses are the same text) or the scores
    differ by at most `tolerance` (scores of equal texts can differ by float rounding across batches).
    """
    from scipy import stats

    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"need equally many scores, at least one: got {len(scores)} and {len(baseline)}")
    tied = tied or [False] * len(scores)
    differences = [0.0 if t or abs(s - b) <= tolerance else s - b for s, b, t in zip(scores, baseline, tied)]
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    ties = len(differences) - wins - losses
    sign_p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    nonzero = [d for d in differences if d != 0]
    wilcoxon_p = float(stats.wilcoxon(nonzero).pvalue) if nonzero else 1.0
    return PairedComparison(
        wins=wins, losses=losses, ties=ties, win_rate=(wins + ties / 2) / len(differences),
        sign_test_p=float(sign_p), wilcoxon_p=wilcoxon_p, mean_difference=sum(differences) / len(differences),
    )  # fmt: skip


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace-split words, across all texts (0 if none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0-100, default 13a tokenisation) against one reference per hypothesis."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
