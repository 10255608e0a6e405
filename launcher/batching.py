"""Batch arithmetic and the global sample order. Pure Python: no torch, no ranks.

global_batch_size = micro_batch_size x accum_steps x world_size, per optimizer step.

Every launch walks one global order of samples: epoch e is a seeded permutation
of the dataset, and optimizer step s takes the window of positions
[s*G, (s+1)*G) of that permutation (the last window of an epoch may be short).
Rank r's micro-step m takes the B positions starting at (m*W + r)*B of the
window, so 1 process x K micro-steps and W processes x K/W micro-steps see the
same samples in the same optimizer step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from launcher.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    accum_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accum_steps * self.world_size

    def describe(self) -> str:
        """The long form, for the trainer's plan line."""
        return (
            f"world_size={self.world_size} x micro_batch_size={self.micro_batch_size} "
            f"x accum_steps={self.accum_steps} = global_batch_size={self.global_batch_size}"
        )

    def short(self, num_machines: int = 1) -> str:
        """``2p x mb1 x K=8`` (``2m x 1p x mb1 x K=8`` on two machines): processes x micro batch x accumulation,
        for tables."""
        processes = f"{self.world_size}p"
        if num_machines > 1:
            processes = f"{num_machines}m x {self.world_size // num_machines}p"
        return f"{processes} x mb{self.micro_batch_size} x K={self.accum_steps}"


def plan_batch(
    global_batch_size: int | None, micro_batch_size: int | None, accum_steps: int | None, world_size: int
) -> BatchPlan:
    """Derive the missing one of (global, micro, accum) for ``world_size`` processes."""
    given = {
        "batch.global_batch_size": global_batch_size,
        "batch.micro_batch_size": micro_batch_size,
        "batch.accum_steps": accum_steps,
    }
    if sum(v is not None for v in given.values()) < 2:
        raise ConfigError(
            "batch: set two of batch.global_batch_size, batch.micro_batch_size, batch.accum_steps "
            f"(got {', '.join(f'{k}={v}' for k, v in given.items())})"
        )
    if global_batch_size is None:
        return BatchPlan(world_size, micro_batch_size, accum_steps)
    if micro_batch_size is None or accum_steps is None:
        known_key, known = (
            ("batch.accum_steps", accum_steps)
            if micro_batch_size is None
            else ("batch.micro_batch_size", micro_batch_size)
        )
        derived, rest = divmod(global_batch_size, known * world_size)
        if rest or derived == 0:
            raise ConfigError(
                f"batch.global_batch_size={global_batch_size} is not divisible by {known_key}={known} x "
                f"world_size={world_size}; choose a global batch that is a multiple of {known * world_size}"
            )
        micro_batch_size = micro_batch_size or derived
        accum_steps = accum_steps or derived
    plan = BatchPlan(world_size, micro_batch_size, accum_steps)
    if plan.global_batch_size != global_batch_size:
        raise ConfigError(
            f"batch.global_batch_size={global_batch_size} != batch.micro_batch_size={micro_batch_size} x "
            f"batch.accum_steps={accum_steps} x world_size={world_size} = {plan.global_batch_size}; "
            "leave one of them unset (null) to derive it"
        )
    return plan


class SampleOrder:
    """The global, split-independent order of sample indices, one seeded permutation per epoch."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ConfigError("data: the dataset has no samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = math.ceil(num_samples / global_batch_size)
        self._epoch = -1
        self._perm: list[int] = []

    def window(self, step: int) -> list[int]:
        """Sample indices of optimizer step ``step``: at most G, fewer on an epoch's last step."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = list(range(self.num_samples))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._perm)
            self._epoch = epoch
        start = index * self.global_batch_size
        return self._perm[start : start + self.global_batch_size]


def micro_batch_ids(window: list[int], plan: BatchPlan, rank: int, micro_step: int) -> list[int]:
    """The samples of rank ``rank`` at ``micro_step``: up to B, possibly none in a short window."""
    start = (micro_step * plan.world_size + rank) * plan.micro_batch_size
    return window[start : start + plan.micro_batch_size]
