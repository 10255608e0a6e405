"""The benchmark's statistics: a ratio of two candidates from runs made in adjacent pairs, with a bootstrap interval.

On a shared machine the speed drifts over minutes (other work, clocks, caches), so two candidates are never
compared through their separate averages. Their runs alternate, and each pair of adjacent runs gives one ratio,
which the drift common to both mostly cancels. The estimate is the geometric mean of the pair ratios; its 95%
interval comes from resampling the pairs. An interval wider than RESOLUTION is reported as unresolved, not as
a figure.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

RESOLUTION = 0.04  # the widest interval (hi - lo, as a ratio) that still counts as a measurement
MIN_PAIRS = 3  # fewer pairs give no interval worth the name (a bootstrap of two has three outcomes)
RESAMPLES = 4000


@dataclass(frozen=True)
class Ratio:
    estimate: float  # geometric mean of the pair ratios
    low: float  # 95% bootstrap interval
    high: float
    pairs: list[float]

    @property
    def resolved(self) -> bool:
        return len(self.pairs) >= MIN_PAIRS and self.high - self.low <= RESOLUTION

    def text(self) -> str:
        """``1.012 [0.998, 1.027]``, or ``unresolved (0.95-1.08, 6 pairs)``."""
        if not self.resolved:
            return f"unresolved ({self.low:.3f}-{self.high:.3f}, {len(self.pairs)} pairs)"
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def paired_ratio(numerators: list[float], denominators: list[float], seed: int = 0) -> Ratio:
    """The ratio numerator/denominator from runs made in pairs (the i-th of each list adjacent in time)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("paired_ratio needs the same number (at least one) of runs on each side")
    pairs = [a / b for a, b in zip(numerators, denominators, strict=True)]
    rng = random.Random(seed)
    means = sorted(geometric_mean(rng.choices(pairs, k=len(pairs))) for _ in range(RESAMPLES))
    low, high = means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]
    return Ratio(geometric_mean(pairs), low, high, pairs)


def run_statistic(step_times: list[float], warmup_steps: int) -> float:
    """One run's figure: the median of its step times after the warm-up."""
    measured = step_times[warmup_steps:]
    if not measured:
        raise ValueError(f"a run logged {len(step_times)} steps, not more than the {warmup_steps} warm-up ones")
    return statistics.median(measured)
