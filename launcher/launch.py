"""The `accelerate launch` command line and environment for one training run, built in one place.

Used by ``compare`` (one launch per mode) and by the tests, so both start the trainer exactly the
same way. The flags spell out what an interactive ``accelerate config`` would otherwise decide:
on a host without CUDA, ``--multi_gpu`` is what makes ``accelerate launch`` start N processes (the
trainer then forms the gloo group on CPU); ``--cpu`` would start only one.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")


def accelerate_executable() -> list[str]:
    """The ``accelerate`` of this interpreter's environment (a venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).parent / "accelerate"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("accelerate")
    return [found] if found else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def accelerate_command(num_processes: int, num_machines: int = 1) -> list[str]:
    """``accelerate launch ...`` up to (not including) the script, for ``num_processes`` on one machine."""
    cmd = [
        *accelerate_executable(),
        "launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        str(num_machines),
        "--mixed_precision",
        "no",  # precision comes from the training config (through Accelerator), not from the launcher
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        # Port 0: the launcher picks a free port, so concurrent comparisons (or tests) never collide.
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    return cmd


def train_command(num_processes: int, config: str | Path, overrides: list[str] = ()) -> list[str]:
    """The full command that trains ``config`` (plus dotted overrides) on ``num_processes`` processes."""
    return [*accelerate_command(num_processes), str(TRAIN_SCRIPT), "--config", str(config), *overrides]


def threads_per_device(max_processes: int) -> int:
    """Cores per process when the largest mode runs ``max_processes`` at once: one "device" on CPU."""
    return max(1, (os.cpu_count() or 1) // max_processes)


def launch_env(tmp_dir: Path, threads_per_process: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for one launch on this host.

    * ``TMPDIR`` -> ``tmp_dir``: each launch leaves ``/tmp/torchelastic_*`` behind otherwise.
    * ``OMP_NUM_THREADS``: set for every process, so that N processes do not each start one thread
      per core and fight over the cores (on a busy 2-core host that costs 10x in step time).
    * ``GLOO_SOCKET_IFNAME=lo`` unless set: on one host, loopback always works, while gloo's default
      (the address of the hostname) may not exist in a container or network namespace.
    """
    env = dict(os.environ if base is None else base)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp_dir)
    env["OMP_NUM_THREADS"] = str(threads_per_process)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows a failing run's last lines, not a lost buffer
    return env
