"""The run plan: what a config means under one launch, resolved once and frozen. Pure Python, no torch.

The trainer and the comparison tool both call ``make_plan``: the batch plan for the launch's world size,
the batch-scaled optimizer values and the optimizer steps. With ``run.max_epochs`` the steps need the
training set's size, so a plan made before the data is loaded has ``max_steps=None`` until
``with_train_samples`` resolves it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from launcher.batching import BatchPlan, plan_batch
from launcher.builtin import BATCH_NORM_MODELS
from launcher.config import Config, ConfigError
from launcher.lr import ResolvedOptim, resolve_optim


@dataclass(frozen=True)
class RunPlan:
    batch: BatchPlan
    optim: ResolvedOptim  # the batch-scaled lr, betas and eps the optimizer uses
    max_epochs: float  # run.max_epochs (0 = off)
    max_steps: int | None  # optimizer steps to train; None until the training set's size is known (max_epochs)
    train_samples: int | None = None
    steps_per_epoch: int | None = None

    def with_train_samples(self, train_samples: int) -> RunPlan:
        """The same plan once the training set's size is known: the steps per epoch, and the steps to train."""
        per_epoch = math.ceil(train_samples / self.batch.global_batch_size)
        steps = self.max_steps if self.max_epochs <= 0 else steps_for_epochs(self.max_epochs, per_epoch)
        return dataclasses.replace(self, max_steps=steps, train_samples=train_samples, steps_per_epoch=per_epoch)


def steps_for_epochs(max_epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps that cover ``max_epochs`` passes, rounded up (a fraction of an epoch is trained, not
    dropped)."""
    # round() first: 0.3 x 10 is 3.0000000000000004 in floating point, which must not become 4 steps.
    return max(1, math.ceil(round(max_epochs * steps_per_epoch, 9)))


def batch_norm_micro_batch_error(model_name: str, micro_batch_size: int) -> ConfigError:
    return ConfigError(
        f"batch.micro_batch_size={micro_batch_size} is not valid with model.name={model_name!r}: BatchNorm needs "
        ">= 2 samples per micro-batch in training; use batch.micro_batch_size >= 2"
    )


def make_plan(cfg: Config, world_size: int) -> RunPlan:
    """The plan of ``cfg`` under a launch of ``world_size`` processes; raises ConfigError for a batch that does
    not divide, a micro batch BatchNorm cannot train, or a betas rule that leaves [0, 1)."""
    b = cfg.batch
    batch = plan_batch(b.global_batch_size, b.micro_batch_size, b.accum_steps, world_size)
    if cfg.model.name in BATCH_NORM_MODELS and batch.micro_batch_size < 2:
        raise batch_norm_micro_batch_error(cfg.model.name, batch.micro_batch_size)
    if cfg.parallel.strategy == "fsdp" and world_size < 2:
        raise ConfigError(
            f"parallel.strategy='fsdp' shards over processes, but the launch has {world_size}; launch 2 or more "
            "(accelerate launch --multi_gpu --num_processes N), or use parallel.strategy=ddp"
        )
    optim = resolve_optim(cfg.optim, batch.global_batch_size)
    max_steps = None if cfg.run.max_epochs > 0 else cfg.run.max_steps
    return RunPlan(batch, optim, cfg.run.max_epochs, max_steps)
