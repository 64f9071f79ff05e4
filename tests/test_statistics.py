"""rlhf.statistics on numbers worked by hand."""

from __future__ import annotations

import math

import pytest

from rlhf.statistics import corpus_bleu, distinct_n, mean_ci, paired_comparison


def test_mean_ci_is_the_student_t_interval() -> None:
    # [1, 2, 3]: mean 2, sample sd 1, t(0.975, df=2) = 4.302653; half-width 4.302653 / sqrt(3) = 2.484138.
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (low, high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)


def test_mean_ci_of_one_value_or_equal_values_is_a_point() -> None:
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    assert mean_ci([0.25, 0.25, 0.25]) == pytest.approx((0.25, 0.25, 0.25))
    assert all(math.isnan(x) for x in mean_ci([]))


def test_paired_comparison_counts_wins_losses_and_ties() -> None:
    # differences 1, 0, -2, 3: two wins, one loss, one tie -> (2 + 0.5) / 4.
    result = paired_comparison([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    assert (result.wins, result.losses, result.ties) == (2, 1, 1)
    assert result.win_rate == 0.625
    assert result.sign_test_p == pytest.approx(1.0)  # 2 of 3 under Binomial(3, 1/2): P(X>=2)*2 = 1
    assert result.mean_difference == pytest.approx(0.5)


def test_identical_scores_give_half_and_p_one() -> None:
    scores = [0.3, -1.2, 2.0, 0.0]
    result = paired_comparison(scores, list(scores))
    assert result.win_rate == 0.5 and result.sign_test_p == 1.0 and result.wilcoxon_p == 1.0


def test_tied_flags_and_tolerance_override_rounding_noise() -> None:
    result = paired_comparison([1.0 + 1e-8, 2.0, 3.0], [1.0, 2.5, 1.0], tied=[False, True, False])
    assert (result.wins, result.losses, result.ties) == (1, 0, 2)


def test_a_clearly_better_policy_is_significant() -> None:
    # 20 wins, 0 losses: sign test p = 2 / 2**20 = 1.9e-6; Wilcoxon with all 20 ranks positive: 2 / 2**20 too.
    better = paired_comparison([1.0 + i for i in range(20)], [0.0] * 20)
    assert better.sign_test_p == pytest.approx(2 / 2**20)
    assert better.wilcoxon_p == pytest.approx(2 / 2**20)
    assert better.win_rate == 1.0


def test_wilcoxon_exact_small_sample() -> None:
    # Differences 1..5 all positive: W- = 0, the most extreme of 2**5 sign patterns on each side -> p = 2/32.
    result = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    assert result.wilcoxon_p == pytest.approx(0.0625)
    assert result.sign_test_p == pytest.approx(0.0625)


def test_paired_comparison_needs_aligned_scores() -> None:
    with pytest.raises(ValueError, match="equally many"):
        paired_comparison([1.0], [1.0, 2.0])


def test_distinct_n() -> None:
    texts = ["a b a", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)  # a b a a b
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n(["one"], 2) == 0.0


def test_corpus_bleu_bounds() -> None:
    references = ["the cat sat on the mat today", "a dog ran in the park all day"]
    assert corpus_bleu(references, references) == pytest.approx(100.0)
    assert corpus_bleu(["zzz qqq", "xxx yyy"], references) == pytest.approx(0.0)
    partial = corpus_bleu(["the cat sat on the mat", "a dog ran in the park"], references)
    assert 0.0 < partial < 100.0
