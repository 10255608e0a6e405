"""Fault injection for tests and for users rehearsing failures, kept out of the training step itself.

- ``run.inject_nan_at_step`` / ``run.inject_nan_rank``: that step's first forward returns NaN logits on
  that rank (a forward hook, registered for the one step and removed after it).
- ``run.inject_kill=rank@step/attempt,...``: that rank SIGKILLs itself once that optimizer step is done (its
  line logged, before any checkpoint of that step) in that attempt of a launch with restarts.
- ``ACCUM_TEST_PAUSE_IN_SAVE_AT_STEP``: rank 0 holds the checkpoint save of that step open (files written,
  not yet renamed) until a signal arrives, so a test can kill a run at exactly that point.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch

from launcher.config import RunConfig


@contextlib.contextmanager
def nan_logits(model: torch.nn.Module, run: RunConfig, step: int, rank: int) -> Iterator[None]:
    """During optimizer step ``step`` (0-based), poison the first forward's logits on the configured rank."""
    if not (run.inject_nan_at_step == step + 1 and run.inject_nan_rank == rank):
        yield
        return
    fired = []

    def poison(module: torch.nn.Module, args: tuple, output):  # noqa: ANN001, ANN202 - a forward hook
        if fired:
            return output
        fired.append(True)
        output.logits = output.logits * float("nan")
        return output

    handle = model.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def kill_if_asked(run: RunConfig, done: int, rank: int, attempt: int) -> None:
    """SIGKILL this process when run.inject_kill names this rank, step (1-based, done) and attempt."""
    if f"{rank}@{done}/{attempt}" in {k.strip() for k in run.inject_kill.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)


def pause_in_save(step: int) -> None:
    """Hold the save of ``step`` open until a signal arrives (ACCUM_TEST_PAUSE_IN_SAVE_AT_STEP)."""
    if os.environ.get("ACCUM_TEST_PAUSE_IN_SAVE_AT_STEP") == str(step):
        signal.pause()
