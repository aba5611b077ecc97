"""95 % confidence intervals of evaluation scores (scores in [0, 1], one per sample).

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion
  (Wilson, JASA 1927; recommended over the normal approximation by Brown, Cai and
  DasGupta, Statistical Science 2001), well behaved at 0 and n. :func:`mean_interval`
  applies it to ``sum(scores)`` out of ``n``: exact Wilson for 0/1 scores, and
  conservative for partial credit (RULER's ``string_match_all``), whose variance is
  at most the binomial ``p (1 - p)``.
- :func:`stratified_interval`: the mean of several tasks' means (a suite average),
  normal interval with each task's Agresti-Coull variance ``p~ (1 - p~) / (n + z^2)``,
  ``p~ = (x + z^2 / 2) / (n + z^2)`` (Agresti and Coull, Am. Stat. 1998), so that a task
  scored all 0 or all 1 still carries its uncertainty.
- :func:`bootstrap_interval`: percentile bootstrap of the mean of task means, optionally
  paired (the difference of two methods on the same samples). A percentile bootstrap
  collapses to a point when no sample differs: report the number of discordant samples
  beside it. Seeded (:data:`SEED`): the same scores give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["wilson_interval", "bootstrap_interval", "mean_interval", "stratified_interval", "Z95", "RESAMPLES",
           "SEED"]

#: Two-sided 95 % standard normal quantile.
Z95 = 1.959963984540054
#: Bootstrap resamples.
RESAMPLES = 4000
#: Bootstrap seed.
SEED = 0


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of ``successes`` out of ``n`` trials, in [0, 1].

    ``successes`` may be fractional (a sum of scores in [0, 1]; see the module docstring).

    Raises:
        ValueError: ``n`` < 1 or ``successes`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(groups: Sequence[Sequence[float]], paired: Sequence[Sequence[float]] | None = None,
                       level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the group means (one group: the plain mean).

    ``groups``: scores per task (each resampled with replacement within itself). ``paired``: if
    given, the same shape, and the statistic is mean(groups) - mean(paired) with the same sample
    indices drawn for both (a paired difference).

    Raises:
        ValueError: an empty group, or ``paired`` of another shape.
    """
    groups = [np.asarray(g, dtype=float) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError(f"groups must be non-empty lists of scores, got sizes {[g.size for g in groups]}")
    others = [np.asarray(g, dtype=float) for g in paired] if paired is not None else None
    if others is not None and [g.shape for g in others] != [g.shape for g in groups]:
        raise ValueError(f"paired must have the shape of groups {[g.size for g in groups]}, got "
                         f"{[g.size for g in others]}")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for index, group in enumerate(groups):
        draws = rng.integers(0, group.size, size=(resamples, group.size))
        means = group[draws].mean(axis=1)
        if others is not None:
            means = means - others[index][draws].mean(axis=1)
        total += means
    total /= len(groups)
    tail = (1 - level) / 2
    low, high = np.quantile(total, [tail, 1 - tail])
    return float(low), float(high)


def mean_interval(scores: Sequence[float]) -> tuple[float, float]:
    """95 % interval of the mean of ``scores`` in [0, 1]: Wilson of ``sum(scores)`` out of ``len(scores)``.

    Raises:
        ValueError: no score.
    """
    if len(scores) == 0:
        raise ValueError("scores must hold at least one score, got none")
    return wilson_interval(float(sum(scores)), len(scores))


def stratified_interval(groups: Sequence[Sequence[float]], z: float = Z95) -> tuple[float, float]:
    """95 % interval of the mean of the groups' means (scores in [0, 1]), clipped to [0, 1].

    Raises:
        ValueError: no group, or an empty group.
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError(f"groups must be non-empty lists of scores, got sizes {[len(g) for g in groups]}")
    mean = sum(sum(g) / len(g) for g in groups) / len(groups)
    variance = 0.0
    for group in groups:
        n = len(group) + z * z
        p = (sum(group) + z * z / 2) / n
        variance += p * (1 - p) / n
    half = z * math.sqrt(variance) / len(groups)
    return max(0.0, mean - half), min(1.0, mean + half)
