"""Build `accelerate launch` commands and their environment, for tools that start runs as subprocesses."""

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
        "no",
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    return [*cmd, str(script)]


def launch_env(tmpdir: Path, threads_per_process: int = 1) -> dict[str, str]:
    """Environment for a launched run: bounded threads (2 cores shared by N processes), gloo on loopback
    unless the caller chose an interface, torchelastic's leftovers in ``tmpdir``, no hub access."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads_per_process),
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
