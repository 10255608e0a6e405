"""Every way to reach a global batch: devices N, micro batch, accumulation K (global = micro x K x N), strategy and
sync policy, each checked by the trainer's own rules (``runplan.make_plan``). Pure Python."""

from __future__ import annotations

import dataclasses

from launcher.config import Config, ConfigError
from launcher.plan.model import Split
from launcher.runplan import make_plan

SYNC_POLICIES = ("no_sync", "every_step")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _trainable(train: Config, split: Split) -> bool:
    """The trainer accepts this split (BatchNorm's micro batch of 2 or more, FSDP's 2 or more processes)."""
    batch = dataclasses.replace(
        train.batch,
        global_batch_size=split.global_batch_size,
        micro_batch_size=split.micro_batch_size,
        accum_steps=split.accum_steps,
        sync=split.sync,
    )
    cfg = dataclasses.replace(train, batch=batch, parallel=dataclasses.replace(train.parallel, strategy=split.strategy))
    try:
        make_plan(cfg, split.world_size)
    except ConfigError:
        return False
    return True


def enumerate_splits(train: Config, global_batch: int, devices: list[int], strategies: list[str]) -> list[Split]:
    """Every valid split of ``global_batch`` over each device count. With K = 1 or one device the sync policy
    changes nothing (one sync per step, or none), so it is listed once (no_sync). Raises ConfigError when no
    device count divides it."""
    splits = []
    for n in devices:
        if global_batch % n:
            continue
        for mb in divisors(global_batch // n):
            k = global_batch // (n * mb)
            for strategy in strategies:
                for sync in SYNC_POLICIES if k > 1 and n > 1 else SYNC_POLICIES[:1]:
                    split = Split(n, mb, k, strategy, sync)
                    if _trainable(train, split):
                        splits.append(split)
    if not splits:
        raise ConfigError(
            f"global_batch_size={global_batch} is not valid: no split over devices={','.join(map(str, devices))} "
            f"and strategies={','.join(strategies)} reaches it: it must be micro batch x K x devices for one of "
            "those device counts (a multiple of a device count), within the trainer's rules (BatchNorm trains on "
            ">= 2 samples per micro batch, fsdp on >= 2 devices)"
        )
    return splits
