"""The benchmark's statistics: a ratio of two candidates from steps made in adjacent pairs, with a 95% interval.

On a shared machine the speed drifts over minutes (other work, clocks, caches), so two candidates are never
compared through their separate averages. Their steps alternate in one process, and each adjacent pair gives one
ratio, which the drift common to both mostly cancels. Whole launches in pairs were tried first and dropped: the
4 to 6 pairs a 10-minute benchmark holds gave t intervals 3-28% wide (bootstrap ones, too narrow, disagreed
between two runs).

The figure (``hodges_lehmann``) is the Hodges-Lehmann estimate with its signed-rank interval. A step now and then
is 10-20 % slow (the host, a collection), and one such pair in twenty widened a t interval from 2.7 % to 4.4 %;
the signed-rank interval does not lean on the tails, and over 100 pairs and more it was 20-25 % narrower than the
plain median's (the sign test's).

An interval wider than RESOLUTION is reported as unresolved, not as a figure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

RESOLUTION = 0.04  # the widest interval (hi - lo, as a ratio) that still counts as a measurement
MIN_PAIRS = 6  # the fewest adjacent pairs with a 95% signed-rank interval


@dataclass(frozen=True)
class Ratio:
    estimate: float  # the Hodges-Lehmann estimate of the pair ratios
    low: float  # 95% interval
    high: float
    pairs: list[float]

    @property
    def resolved(self) -> bool:
        return len(self.pairs) >= MIN_PAIRS and self.high - self.low <= RESOLUTION

    def text(self) -> str:
        """``1.012 [0.998, 1.027]``, or ``unresolved (0.95-1.08, 6 pairs)``."""
        if not math.isfinite(self.high):
            return f"unresolved ({len(self.pairs)} pairs: too few for an interval)"
        if not self.resolved:
            return f"unresolved ({self.low:.3f}-{self.high:.3f}, {len(self.pairs)} pairs)"
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def hodges_lehmann(numerators: list[float], denominators: list[float]) -> Ratio:
    """The ratio numerator/denominator from many pairs (the i-th of each list adjacent in time): the
    Hodges-Lehmann estimate over the logs of the pair ratios (the median of their pairwise means) and the
    Wilcoxon signed-rank 95% interval, which leaves out the ``k`` smallest and largest of those means, ``k``
    from the normal approximation of the signed-rank statistic (the exact table's value from 10 pairs up;
    below 6 pairs there is no interval)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("hodges_lehmann needs the same number (at least one) of steps on each side")
    pairs = [a / b for a, b in zip(numerators, denominators, strict=True)]
    logs, n = [math.log(p) for p in pairs], len(pairs)
    means = sorted((logs[i] + logs[j]) / 2 for i in range(n) for j in range(i, n))
    estimate = math.exp(statistics.median(means))
    k = math.floor(n * (n + 1) / 4 - 1.96 * math.sqrt(n * (n + 1) * (2 * n + 1) / 24))
    if k < 1:
        return Ratio(estimate, 0.0, math.inf, pairs)
    return Ratio(estimate, math.exp(means[k]), math.exp(means[-1 - k]), pairs)


def run_statistic(step_times: list[float], warmup_steps: int) -> float:
    """One run's figure: the median of its step times after the warm-up."""
    measured = step_times[warmup_steps:]
    if not measured:
        raise ValueError(f"a run logged {len(step_times)} steps, not more than the {warmup_steps} warm-up ones")
    return statistics.median(measured)
