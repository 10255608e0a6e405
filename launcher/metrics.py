"""Measurements and the files they go to: a counting DDP communication hook, timers, memory, writers.

Communication is counted where it happens (inside DDP's comm hook, as sent),
memory is read from the runtime, and every result file is written atomically
(temporary file, then rename) so that a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from launcher.config import ConfigError


class CommCounter:
    """Counts DDP's gradient all-reduces: every bucket DDP hands to the hook is one all-reduce call,
    and the bucket DDP marks as last closes one synchronization round (one synced backward)."""

    def __init__(self) -> None:
        self.sync_rounds = 0
        self.allreduce_calls = 0
        self.allreduce_bytes = 0

    def attach(self, model: nn.Module) -> None:
        """Register on a DDP-wrapped model; a single-process model sends nothing and stays at zero."""
        if not isinstance(model, DistributedDataParallel):
            return

        # No annotations: DDP compares them to real types, and this module's are postponed strings.
        def counting_allreduce(state, bucket):  # noqa: ANN001, ANN202
            buffer = bucket.buffer()
            self.allreduce_calls += 1
            self.allreduce_bytes += buffer.numel() * buffer.element_size()
            self.sync_rounds += int(bucket.is_last())
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_allreduce)

    def totals(self) -> dict[str, int]:
        return {
            "sync_rounds": self.sync_rounds,
            "allreduce_calls": self.allreduce_calls,
            "allreduce_bytes": self.allreduce_bytes,
        }


def library_versions() -> dict[str, str]:
    import platform

    import accelerate
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
    }


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record for an experiment tracker (nested ones, like an
    evaluation's, as ``eval/loss``); the step is passed separately, flags and lists are left out."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            values.update({f"{key}/{k}": v for k, v in tracker_values(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            values[key] = value
    return values


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now_s() -> float:
    return time.perf_counter()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA, peak resident set size on CPU (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_source(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "getrusage.ru_maxrss"


def atomic_output(path: Path, produce: Callable[[str], None]) -> None:
    """Let ``produce`` write a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        produce(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def produce(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_output(path, produce)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_weights_atomic(model: nn.Module, path: Path) -> None:
    """Final weights as safetensors; tied tensors (GPT-2's embedding/head) are stored once."""
    from safetensors.torch import save_model

    atomic_output(path, lambda tmp: save_model(model, tmp))


RESULT_FILES = ("metrics.jsonl", "summary.json", "model.safetensors")


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool = False) -> None:
    """Refuse to write over a finished or started run unless asked (or resuming it), and fail early on an
    unwritable folder."""
    found = [name for name in RESULT_FILES if (output_dir / name).exists()]
    if found and not overwrite and not resuming:
        raise ConfigError(
            f"run.output_dir={str(output_dir)!r} already holds a run ({', '.join(found)}); "
            "choose another folder or set run.overwrite=true"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ConfigError(f"run.output_dir={str(output_dir)!r} is not writable: {err.strerror}") from None


class JsonlWriter:
    """One JSON object per line, flushed per line so a reader (or a crash) sees whole lines only."""

    def __init__(self, path: Path, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records of steps 1..``last_step`` (a resumed run re-does the later ones) and drop a torn last
    line; rewrites ``path`` atomically and returns the kept records."""
    kept: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line cut by a kill: nothing after it was written whole
            if record.get("step", 0) > last_step:
                break
            kept.append(record)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept
