"""Measurements: collectives counted where they are called, timers, memory from the runtime, library versions.

Communication is counted by wrapping the ``torch.distributed`` collectives that the parallel strategies
call: DDP's gradient buckets go through ``dist.all_reduce`` (the comm hook in ``parallel.ddp``), FSDP's
shards through ``dist.reduce_scatter_single`` and ``dist.all_gather_single``. One mechanism for every
strategy; the launcher's own scalar all-reduces (item counts, the logged loss and the agreements) are
counted apart from the gradients'.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import torch
import torch.distributed as dist

# torch.distributed function -> the collective it is. Sizes are the bytes requested: the tensor of an
# all-reduce, the full (unsharded) input of a reduce-scatter and output of an all-gather.
COLLECTIVES = {
    "all_reduce": "all_reduce",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
}
SCALAR = "scalar"  # the launcher's own small all-reduces
GRADIENT_REDUCTIONS = ("all_reduce", "reduce_scatter")


@dataclass
class Traffic:
    calls: int = 0
    bytes: int = 0


@dataclass
class Sent:
    """What a span of training sent: traffic per collective, and the micro-steps that communicated."""

    by_collective: dict[str, Traffic]
    rounds: int

    @property
    def gradient_calls(self) -> int:
        return sum(t.calls for kind, t in self.by_collective.items() if kind != SCALAR)

    @property
    def gradient_bytes(self) -> int:
        return sum(t.bytes for kind, t in self.by_collective.items() if kind != SCALAR)


def _tensor_bytes(name: str, args: tuple, kwargs: dict) -> int:
    if name == "all_reduce":
        tensor = kwargs.get("tensor", args[0] if args else None)
    elif name.startswith("reduce_scatter"):
        tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
    else:  # all-gathers: the output holds every rank's shard
        tensor = kwargs.get("output_tensor", args[0] if args else None)
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


class CollectiveCounter:
    """Counts calls and bytes per collective while installed; ``scalar()`` marks the launcher's own, and
    ``round()`` counts a micro-step as a sync round when gradients went out during it."""

    def __init__(self) -> None:
        self.traffic: dict[str, Traffic] = {}
        self.rounds = 0
        self._originals: dict[str, Callable] = {}
        self._scalar = False
        self.on_reduction: Callable[[], None] | None = None  # called as each gradient reduction is launched

    def install(self) -> None:
        for name, kind in COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            setattr(dist, name, self._counting(name, kind, original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _counting(self, name: str, kind: str, original: Callable) -> Callable:
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the wrapped function's own signature
            entry = self.traffic.setdefault(SCALAR if self._scalar else kind, Traffic())
            entry.calls += 1
            entry.bytes += _tensor_bytes(name, args, kwargs)
            if self.on_reduction is not None and not self._scalar and kind in GRADIENT_REDUCTIONS:
                self.on_reduction()
            return original(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def scalar(self) -> Iterator[None]:
        self._scalar = True
        try:
            yield
        finally:
            self._scalar = False

    def _reductions(self) -> int:
        return sum(t.calls for kind, t in self.traffic.items() if kind in GRADIENT_REDUCTIONS)

    @contextlib.contextmanager
    def round(self) -> Iterator[None]:
        """A micro-step counts as a sync round when its backward reduced gradients (all-gathers do not count)."""
        before = self._reductions()
        yield
        self.rounds += int(self._reductions() > before)

    def snapshot(self) -> tuple[dict[str, tuple[int, int]], int]:
        return {kind: (t.calls, t.bytes) for kind, t in self.traffic.items()}, self.rounds

    def since(self, snapshot: tuple[dict[str, tuple[int, int]], int]) -> Sent:
        """What was sent since ``snapshot`` (a ``snapshot()``)."""
        before, rounds = snapshot
        by_collective = {}
        for kind, t in self.traffic.items():
            calls, n_bytes = before.get(kind, (0, 0))
            if t.calls > calls:
                by_collective[kind] = Traffic(t.calls - calls, t.bytes - n_bytes)
        return Sent(by_collective, self.rounds - rounds)


COUNTER = CollectiveCounter()  # the process's: the trainer installs it once


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now_s() -> float:
    return time.perf_counter()


def own_peak_rss_bytes() -> int | None:
    """This address space's peak resident set (Linux VmHWM); None where /proc does not say. Not ru_maxrss:
    that survives execve, so a trainer started straight from a large parent (a test worker, a notebook) would
    report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    own = own_peak_rss_bytes()
    return own if own is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_source(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "/proc/self/status VmHWM" if own_peak_rss_bytes() is not None else "getrusage.ru_maxrss"


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "transformers": importlib.metadata.version("transformers"),  # not imported: a built-in model needs none
    }


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A rank's own part of a tensor: the local shard of a DTensor (FSDP), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A value every rank holds whole (a DTensor's full value: the gradient norm under FSDP)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _nbytes(tensor: torch.Tensor) -> int:
    t = local(tensor)
    return t.numel() * t.element_size()


@dataclass
class ModelState:
    """Bytes of model state this rank holds: parameters, gradients and optimizer state (local shards only)."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ModelState:
    params = list(model.parameters())
    grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    state = sum(_nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return ModelState(sum(_nbytes(p) for p in params), grads, state)


class SavedActivations:
    """Bytes of the tensors autograd saves for backward during a forward (the activations a micro-step holds
    until its backward), counted through saved-tensor hooks; each storage once, parameters left out (the
    model's own, and the unsharded ones FSDP gathers, which are parameters too)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a wrapper subclass (a functional collective's result) has no storage of its own
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in self._params and key not in self._seen and not isinstance(tensor, torch.nn.Parameter):
            self._seen.add(key)
            self.bytes += size
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedActivations]:
        self._seen.clear()
        self.bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


class MicroStepMeter:
    """What a window holds in memory besides the model: the activations its first micro-step saves for the
    backward, and the gradients held after that micro-step (what accumulation keeps between micro-steps: a
    full replica's under DDP, unsharded ones under FSDP's no_sync, shards under every_step)."""

    def __init__(self, strategy: Any, model: torch.nn.Module) -> None:
        self.strategy, self.model = strategy, model
        self._activations = SavedActivations(model)
        self.activation_bytes = 0
        self.held_grad_bytes = 0

    @contextlib.contextmanager
    def micro_step(self, index: int) -> Iterator[None]:
        if index:
            yield
            return
        with self._activations.counting():
            yield
        self.activation_bytes = self._activations.bytes
        self.held_grad_bytes = self.strategy.held_gradient_bytes(self.model)
