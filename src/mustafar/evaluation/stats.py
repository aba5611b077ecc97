"""95 % confidence intervals of evaluation scores: Wilson for 0/1 outcomes, a percentile bootstrap otherwise.

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion
  (Wilson, JASA 1927; recommended over the normal approximation by Brown, Cai and
  DasGupta, Statistical Science 2001), exact-free and well behaved at 0 and n.
- :func:`bootstrap_interval`: percentile bootstrap of the mean of scores in [0, 1]
  (RULER's ``string_match_all`` gives partial credit), optionally stratified (one
  resample per task, the mean of the task means: the suite average) and paired
  (the difference of two methods on the same samples).
- :func:`mean_interval`: Wilson when every score is 0 or 1, else the bootstrap.

Seeded (:data:`SEED`): the same scores give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["wilson_interval", "bootstrap_interval", "mean_interval", "Z95", "RESAMPLES", "SEED"]

#: Two-sided 95 % standard normal quantile.
Z95 = 1.959963984540054
#: Bootstrap resamples.
RESAMPLES = 4000
#: Bootstrap seed.
SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of ``successes`` out of ``n`` trials, in [0, 1].

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
    """95 % interval of the mean of ``scores`` in [0, 1]: Wilson if all are 0 or 1, else the bootstrap."""
    if len(scores) == 0:
        raise ValueError("scores must hold at least one score, got none")
    if all(s in (0.0, 1.0) for s in scores):
        return wilson_interval(int(sum(scores)), len(scores))
    return bootstrap_interval([scores])
