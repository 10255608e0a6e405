"""Batch arithmetic and the global sample order. No torch, no ranks.

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
from dataclasses import dataclass

import numpy as np

from launcher.config import ConfigError

DEFAULT_GLOBAL_BATCH, DEFAULT_MICRO_BATCH = 16, 4  # the bare command's batch: K = 4 on one process


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
    """Derive the missing one of (global, micro, accum) for ``world_size`` processes. With fewer than two set, the
    defaults fill in: a global batch of DEFAULT_GLOBAL_BATCH, then micro batches of DEFAULT_MICRO_BATCH."""
    if [global_batch_size, micro_batch_size, accum_steps].count(None) > 1:
        if global_batch_size is None:
            global_batch_size = DEFAULT_GLOBAL_BATCH
        if micro_batch_size is None and accum_steps is None:
            micro_batch_size = DEFAULT_MICRO_BATCH
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


_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well-mixed 64-bit hash, vectorized (numpy's uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SampleOrder:
    """The global, split-independent order of sample indices: epoch e is a seeded permutation of the samples.

    The permutation is computed per position (a keyed 4-round Feistel bijection on [0, 4^h) >= num_samples, with
    cycle-walking onto [0, num_samples)), so the order holds nothing per sample: a billion-sample set costs
    the same as a small one, and any step's window is known without the ones before it.
    """

    ROUNDS = 4

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, reverse: bool = False) -> None:
        if num_samples < 1:
            raise ConfigError("data: the dataset has no samples")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.reverse = reverse  # batch.window_order=reversed: each window's samples in reverse order
        self.steps_per_epoch = math.ceil(num_samples / global_batch_size)
        self._half = max(1, math.ceil(math.log2(num_samples) / 2)) if num_samples > 1 else 1

    def _keys(self, epoch: int) -> list[np.uint64]:
        base = ((self.seed * 1_000_003 + epoch) * 0x9E3779B97F4A7C15) & _MASK64
        keys = _mix(np.asarray([(base + r) & _MASK64 for r in range(1, self.ROUNDS + 1)], dtype=np.uint64))
        return [np.uint64(k) for k in keys]

    def _feistel(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        half, mask = np.uint64(self._half), np.uint64((1 << self._half) - 1)
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << half) | right

    def permuted(self, positions: np.ndarray, epoch: int) -> np.ndarray:
        """The samples at ``positions`` of epoch ``epoch``'s permutation."""
        keys = self._keys(epoch)
        out = self._feistel(positions.astype(np.uint64), keys)
        outside = out >= self.num_samples
        while outside.any():  # cycle-walking: the bijection on the larger domain, restricted to [0, n)
            out[outside] = self._feistel(out[outside], keys)
            outside = out >= self.num_samples
        return out.astype(np.int64)

    def window(self, step: int) -> np.ndarray:
        """Sample indices of optimizer step ``step``: at most G, fewer on an epoch's last step."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        window = self.permuted(np.arange(start, min(start + self.global_batch_size, self.num_samples)), epoch)
        return window[::-1].copy() if self.reverse else window


def micro_batch_ids(window: np.ndarray, plan: BatchPlan, rank: int, micro_step: int) -> np.ndarray:
    """The samples of rank ``rank`` at ``micro_step``: up to B, possibly none in a short window."""
    start = (micro_step * plan.world_size + rank) * plan.micro_batch_size
    return window[start : start + plan.micro_batch_size]
