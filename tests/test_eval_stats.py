"""95 % intervals of evaluation scores (mustafar.evaluation.stats) against published values and invariants."""

import pytest

from mustafar.evaluation.stats import bootstrap_interval, mean_interval, stratified_interval, wilson_interval


@pytest.mark.parametrize("successes, n, low, high", [
    (5, 10, 0.2366, 0.7634),   # Brown, Cai and DasGupta 2001 / any Wilson table
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (1, 25, 0.0071, 0.1954),
])
def test_wilson_matches_reference_values(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="successes=11, n=10"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)


def test_mean_interval_partial_credit_and_binary():
    assert mean_interval([1, 0] * 5) == pytest.approx(wilson_interval(5, 10))
    low, high = mean_interval([0.5] * 10)  # partial credit: conservative binomial width, not a point
    assert low < 0.5 < high and high - low > 0.4
    with pytest.raises(ValueError, match="at least one score"):
        mean_interval([])


def test_stratified_interval_keeps_uncertainty_of_perfect_tasks():
    low, high = stratified_interval([[1.0] * 25, [0.0] * 25])
    assert low < 0.5 < high and 0.05 < high - low < 0.3
    narrow = stratified_interval([[1.0, 0.0] * 50] * 11)
    wide = stratified_interval([[1.0, 0.0] * 5] * 11)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="non-empty"):
        stratified_interval([[1.0], []])


def test_bootstrap_paired_and_seeded():
    scores = [[0.0, 1.0] * 20, [1.0, 1.0, 0.0] * 10]
    first, again = bootstrap_interval(scores), bootstrap_interval(scores)
    assert first == again and first[0] < sum(sum(g) / len(g) for g in scores) / 2 < first[1]
    shifted = [[s - 0.25 for s in g] for g in scores]
    assert bootstrap_interval(scores, shifted) == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError, match="paired must have the shape"):
        bootstrap_interval(scores, [[0.0]])
