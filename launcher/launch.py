"""Build `accelerate launch` commands and their environment, for tools that start runs as subprocesses
(compare, the benchmarks, the tests), so that all of them start the trainer exactly the same way.

The flags spell out what an interactive ``accelerate config`` would otherwise decide. On a host
without CUDA, ``--multi_gpu`` is what makes ``accelerate launch`` start N processes (the trainer then
forms the gloo group on CPU); ``--cpu`` would start only one.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launcher" / "train.py"


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Machine:
    """Where one `accelerate launch` stands in a multi-machine job: its rank among ``num_machines`` and the
    rendezvous that machine rank 0 hosts (every machine's launch must name the same address and port)."""

    num_machines: int
    machine_rank: int
    main_process_port: int
    main_process_ip: str = LOOPBACK


def accelerate_command(
    num_processes: int, script: str | Path = TRAIN_SCRIPT, machine: Machine | None = None
) -> list[str]:
    """`accelerate launch` for ``num_processes`` processes, every default spelled out (so Accelerate prints no
    warning) and the multi-process path on CPU too.

    ``num_processes`` is Accelerate's: the total over all machines. Without ``machine`` the launch is this
    machine alone and the OS picks a free port; with one, it is that machine's share (num_processes /
    num_machines) of a job that meets at ``machine``'s rendezvous.
    """
    num_machines = machine.num_machines if machine else 1
    if num_processes % num_machines:
        # accelerate would floor-divide and silently start fewer processes than asked for
        raise ValueError(f"num_processes={num_processes} does not divide over num_machines={num_machines}")
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
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
    if machine is not None and num_machines > 1:
        # Port 0 cannot be shared: each agent would pick its own. The caller picks one (free_port) for all.
        cmd += [
            "--multi_gpu",
            "--machine_rank",
            str(machine.machine_rank),
            "--main_process_ip",
            machine.main_process_ip,
            "--main_process_port",
            str(machine.main_process_port),
        ]
    elif num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    return [*cmd, str(script)]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` now: bound with port 0, read and released, for machine 0's rendezvous.
    Another process may take it before machine 0's launch binds it: that launch then fails (port in use)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
