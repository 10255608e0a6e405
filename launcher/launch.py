"""Build `accelerate launch` commands and their environment, for tools that start runs as subprocesses
(compare, the benchmarks, the tests), so that all of them start the trainer exactly the same way.

The flags spell out what an interactive ``accelerate config`` would otherwise decide. On a host
without CUDA, ``--multi_gpu`` is what makes ``accelerate launch`` start N processes (the trainer then
forms the gloo group on CPU); ``--cpu`` would start only one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launcher" / "train.py"


def accelerate_command(num_processes: int, script: str | Path = TRAIN_SCRIPT) -> list[str]:
    """`accelerate launch` for ``num_processes`` processes on this machine, every default spelled out
    (so Accelerate prints no warning), a free port picked by the OS, and the multi-process path on CPU too."""
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # precision comes from the training config (through Accelerator), not from the launcher
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    return [*cmd, str(script)]


def threads_per_device(max_processes: int) -> int:
    """Cores per process when ``max_processes`` run at once: what one "device" is on a CPU host."""
    return max(1, (os.cpu_count() or 1) // max_processes)


def launch_env(tmpdir: Path, threads_per_process: int = 1, offline: bool = True) -> dict[str, str]:
    """Environment for a launched run: bounded threads (N processes must not each start one thread per
    core and fight over them), gloo on loopback unless the caller chose an interface, torchelastic's
    leftovers in ``tmpdir``, and no hub access unless ``offline`` is False (a user's hub model)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads_per_process),
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",  # a failing run's log ends with its last lines, not a lost buffer
    }
    if offline:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return env
