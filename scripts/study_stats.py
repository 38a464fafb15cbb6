"""Paired-seed statistics for the accuracy and gradient-norm studies: a mean paired difference with its 95% t
interval, and the fraction of full SAM's gain a method keeps with a paired bootstrap interval.

Both take per-seed values paired by seed (the same data order, initialisation and label noise for every method of a
seed), so the seed-to-seed spread of the task cancels out of the difference.

    >>> d = paired_difference([0.80, 0.78, 0.81], [0.83, 0.79, 0.85])
    >>> round(d.mean, 4), d.n
    (0.0267, 3)
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at `level`; `lo`/`hi` are NaN when there are too few seeds."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        """The interval lies strictly on one side of 0: a measured effect (NaN bounds never do)."""
        return self.lo > 0 or self.hi < 0

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """`+1.23 [+0.40, +2.06]` (values times `scale`, e.g. 100 for points); `+1.23 [n=1]` without an interval."""
        if math.isnan(self.lo):
            return f"{self.mean * scale:+.{digits}f} [n={self.n}]"
        return f"{self.mean * scale:+.{digits}f} [{self.lo * scale:+.{digits}f}, {self.hi * scale:+.{digits}f}]"


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of `values` with the Student t interval mean ± t_{(1+level)/2, n-1} · s / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value.")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level)
    half = student_t.ppf((1 + level) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_difference(base: Sequence[float], other: Sequence[float], level: float = LEVEL) -> Interval:
    """`other - base` per seed (equal-length sequences in the same seed order), as a t interval of the mean."""
    if len(base) != len(other):
        raise ValueError(f"paired_difference needs one value per seed on both sides, got {len(base)} and "
                         f"{len(other)}: run the missing seeds or drop them from both.")
    return t_interval([o - b for b, o in zip(base, other)], level)


def gain_fraction(base: Sequence[float], full: Sequence[float], other: Sequence[float], level: float = LEVEL,
                  resamples: int = 10_000, seed: int = 0) -> Interval:
    """The fraction of full SAM's mean gain over `base` that `other` keeps, mean(other - base) / mean(full - base),
    with a paired percentile bootstrap interval: seeds are resampled with replacement, the same seeds for all three
    sequences, and the ratio recomputed. Resamples whose full-SAM gain is not positive have no meaningful fraction and
    are dropped (the interval is conditional on a positive full-SAM gain); if more than (1 - level) / 2 of them are,
    full SAM's gain is itself not established and the interval is (-inf, inf)."""
    n = len(base)
    if not n or len(full) != n or len(other) != n:
        raise ValueError(f"gain_fraction needs one value per seed for base, full and other, got {len(base)}, "
                         f"{len(full)} and {len(other)}.")
    d_full = [f - b for b, f in zip(base, full)]
    d_other = [o - b for b, o in zip(base, other)]
    point = statistics.fmean(d_other) / statistics.fmean(d_full) if statistics.fmean(d_full) > 0 else math.nan
    if n < 2:
        return Interval(point, math.nan, math.nan, n, level)
    rng = random.Random(seed)
    ratios, dropped = [], 0
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        gain = sum(d_full[i] for i in idx)
        if gain <= 0:
            dropped += 1
            continue
        ratios.append(sum(d_other[i] for i in idx) / gain)  # the 1/n of both means cancels
    tail = (1 - level) / 2
    if dropped > tail * resamples:  # full SAM's gain itself is not reliably positive: no bounded fraction
        return Interval(point, -math.inf, math.inf, n, level)
    ratios.sort()
    lo, hi = ratios[int(tail * len(ratios))], ratios[min(int((1 - tail) * len(ratios)), len(ratios) - 1)]
    return Interval(point, lo, hi, n, level)
