"""Where an optimizer step's time goes, phase by phase (``run.time_breakdown``).

- ``data``: waiting for the window's micro-batches (prepared in the background) and copying them to the device;
- ``forward`` and ``backward``: the micro-steps' compute;
- ``comm_exposed``: the part of a syncing backward after its last gradient collective was launched, that is the
  communication the backward did not hide (zero in the micro-steps that do not sync);
- ``scalars``: the launcher's one per-step all-reduce (the logged loss and the agreements);
- ``optimizer``: clipping, the optimizer step and zeroing the gradients;
- ``other``: the rest of the step (the learning rate, the record).

On CPU, host timers (the work is done when the call returns). On CUDA, events on the current stream, read once
the step has synchronized, as it does anyway for its logged numbers: no synchronization per micro-step;
``run.time_breakdown=synced`` synchronizes at every phase boundary instead (exact, and slower).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from launcher.measure import COUNTER

PHASES = ("data", "forward", "backward", "comm_exposed", "scalars", "optimizer")


class StepClock:
    """Accumulates the phases of one step; ``read()`` returns them and starts the next step."""

    def __init__(self, device: torch.device, mode: str) -> None:
        self.enabled = mode != "none"
        self._events = device.type == "cuda" and mode == "auto"
        self._synced = device.type == "cuda" and mode == "synced"
        self._spans: list[tuple[str, object, object]] = []

    def _mark(self) -> object:
        if self._events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self._synced:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = self._mark()
        try:
            yield
        finally:
            self._spans.append((name, start, self._mark()))

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        """A micro-step's backward, split at its last gradient collective's launch (none: all compute)."""
        if not self.enabled:
            yield
            return
        start, launches = self._mark(), []
        COUNTER.on_reduction = lambda: launches.append(self._mark())
        try:
            yield
        finally:
            COUNTER.on_reduction = None
            end = self._mark()
            split = launches[-1] if launches else end
            self._spans += [("backward", start, split), ("comm_exposed", split, end)]

    def read(self, step_s: float) -> dict[str, float] | None:
        """Seconds per phase of the step just done (its device work has finished), ``other`` the rest."""
        if not self.enabled:
            return None
        seconds = dict.fromkeys(PHASES, 0.0)
        for name, start, end in self._spans:
            seconds[name] += start.elapsed_time(end) / 1000 if self._events else end - start
        self._spans.clear()
        seconds["other"] = max(step_s - sum(seconds.values()), 0.0)
        return {f"{name}_s": value for name, value in seconds.items()}


def median_breakdown(breakdowns: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each phase's median over the steps (so the phases need not add up to the median step)."""
    measured = [b for b in breakdowns if b]
    if not measured:
        return None
    return {name: statistics.median(b[name] for b in measured) for name in measured[0]}
