"""DDP: a full replica per process; gradients all-reduced in buckets during the backward that syncs.

``no_sync`` must wrap the forward and the backward of a micro-step that does not sync: DDP arms its reducer
in forward, so wrapping backward alone saves nothing. The comm hook is DDP's own default all-reduce, called
from Python so that ``measure.COUNTER`` sees every bucket as it is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from launcher.measure import local


class DDP:
    name = "ddp"
    sharded = False  # checkpoints: rank 0 writes the full state

    def __init__(self) -> None:
        self.accelerator: Accelerator | None = None

    def prepare(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        self.accelerator = accelerator
        model, optimizer = accelerator.prepare(model, make_optimizer(model))
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(None, default_hooks.allreduce_hook)
        return model, optimizer

    def sync(self, model: torch.nn.Module, enabled: bool) -> AbstractContextManager:
        """The context of one micro-step's forward and backward: gradients all-reduced only when ``enabled``."""
        return contextlib.nullcontext() if enabled else self.accelerator.no_sync(model)

    def held_gradient_bytes(self, model: torch.nn.Module) -> int:
        """Gradients this rank holds between micro-steps: a full replica's, in ``.grad``."""
        return sum(local(p.grad).nbytes for p in model.parameters() if p.grad is not None)
