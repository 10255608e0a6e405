"""The only module that touches Accelerator, ranks, launch environment variables and process groups."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from launcher.config import Config, ConfigError, UserError


class LaunchError(UserError):
    """The launch does not give what the run needs; the message is one line for the user."""


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_accelerator(cfg: Config) -> Accelerator:
    """Form the process group the launch asked for, on GPUs when there are any, else on CPU with gloo.

    On a host without CUDA, ``accelerate launch --multi_gpu`` still starts N processes, but a plain
    ``Accelerator()`` then reports one process each: N silent, independent trainings. ``cpu=True``
    makes Accelerate form the MULTI_CPU gloo group instead, and the size check below refuses any
    other mismatch.
    """
    use_cpu = not torch.cuda.is_available()
    if cfg.precision == "fp16" and use_cpu:
        raise ConfigError("precision='fp16' needs a CUDA device; on CPU use precision=bf16 or precision=no")
    launched = launched_world_size()
    try:
        accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=cfg.precision,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.dist_timeout_s))],
        )
    except (ValueError, RuntimeError) as err:  # a half-set launch environment: say what is missing, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LaunchError(f"could not form the process group for WORLD_SIZE={launched}: {first}") from None
    formed = dist.get_world_size() if dist.is_initialized() else 1
    if launched != formed or accelerator.num_processes != formed:
        raise LaunchError(
            f"WORLD_SIZE={launched} but the process group has {formed} process(es) "
            f"(accelerate reports {accelerator.num_processes}); check the launch command and its accelerate config"
        )
    return accelerator


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def all_reduce_sum(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64 keeps integer counts exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_object(accelerator: Accelerator, value: object) -> list:
    """Every rank's ``value``, in rank order (a list of one when not distributed)."""
    if accelerator.num_processes == 1:
        return [value]
    out: list = [None] * accelerator.num_processes
    dist.all_gather_object(out, value)
    return out


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
