"""Start the trainer as `accelerate launch` subprocesses: the commands, their environment, and one runner.

compare, the benchmarks and the tests all start runs through here, so that all of them start the trainer
exactly the same way. The flags spell out what an interactive ``accelerate config`` would otherwise decide.
On a host without CUDA, ``--multi_gpu`` is what makes ``accelerate launch`` start N processes (the trainer
then forms the gloo group on CPU); ``--cpu`` would start only one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launcher" / "train.py"
LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Machine:
    """Where one `accelerate launch` stands in a multi-machine job: its rank among ``num_machines`` and the
    rendezvous that machine rank 0 hosts (every machine's launch must name the same address and port)."""

    num_machines: int
    machine_rank: int
    main_process_port: int
    main_process_ip: str = LOOPBACK


def accelerate_command(
    num_processes: int, script: str | Path = TRAIN_SCRIPT, machine: Machine | None = None, max_restarts: int = 0
) -> list[str]:
    """`accelerate launch` for ``num_processes`` processes, every default spelled out (so Accelerate prints no
    warning) and the multi-process path on CPU too.

    ``num_processes`` is Accelerate's: the total over all machines. Without ``machine`` the launch is this
    machine alone and the OS picks a free port; with one, it is that machine's share (num_processes /
    num_machines) of a job that meets at ``machine``'s rendezvous. ``max_restarts``: torchrun's elastic agent
    restarts the workers that many times when one fails (Accelerate runs 2 or more processes under it).
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
    if max_restarts:
        cmd += ["--max_restarts", str(max_restarts)]
    return [*cmd, str(script)]


def job_commands(
    num_processes: int,
    num_machines: int = 1,
    script: str | Path = TRAIN_SCRIPT,
    max_restarts: int = 0,
    main_process_ip: str = LOOPBACK,
) -> list[list[str]]:
    """The commands of a job: one process runs the script itself (a launcher would only start it, at a second
    and a half of imports); more are one `accelerate launch` per machine. Several machines meet at one
    rendezvous on this host's loopback (or ``main_process_ip``: machine 0's address on a namespace link), on a
    port picked here: ``--main_process_port 0`` would give each machine its own."""
    if num_processes == 1:
        return [[sys.executable, str(script)]]
    if num_machines == 1:
        return [accelerate_command(num_processes, script, max_restarts=max_restarts)]
    port = free_port()
    return [
        accelerate_command(num_processes, script, Machine(num_machines, rank, port, main_process_ip), max_restarts)
        for rank in range(num_machines)
    ]


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


@dataclass
class LaunchOutcome:
    returncode: int | None  # 0 when every machine's launch exited 0, else the first failing one's; None: stopped
    wall_s: float  # from the first start to the last exit
    logs: list[Path]  # one per machine, machine 0's first
    failed_machine: int | None = None  # the first machine whose launch failed: its log explains the failure
    note: str = ""  # why the runner stopped the job, when it did

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def log(self) -> Path:
        """The log that tells the job's story: the failing machine's, else machine 0's."""
        return self.logs[self.failed_machine or 0]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return self.log_text().splitlines()[-lines:]

    def error_lines(self) -> list[str]:
        """The trainer's one-line errors, without their ``error: `` prefix."""
        return [line.removeprefix("error: ") for line in self.log_text().splitlines() if line.startswith("error: ")]

    def reason(self) -> str:
        """Why the job failed, in one line: the failing launch's own ``error:`` line when the trainer printed
        one (the launcher's traceback that follows it says only that a child failed)."""
        if self.returncode is None:
            return self.note or "stopped"
        errors = self.error_lines()
        machine = f"machine {self.failed_machine} " if len(self.logs) > 1 else ""
        return f"{machine}exited {self.returncode}" + (f": {errors[-1]}" if errors else "")


class Job:
    """The launches of one job (one per machine), each the leader of its own session so that its whole
    process tree can be signalled. Every output goes to the machine's log file."""

    def __init__(self, commands: list[list[str]], logs: list[Path], env: dict[str, str], cwd: Path = REPO) -> None:
        self.commands, self.logs, self.env, self.cwd = commands, logs, env, cwd
        self.procs: list[subprocess.Popen] = []
        self.started = 0.0

    def start(self) -> Job:
        self.started = time.perf_counter()
        for command, log in zip(self.commands, self.logs, strict=True):
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as log_file:  # the launch keeps its own descriptor
                self.procs.append(
                    subprocess.Popen(
                        command,
                        cwd=self.cwd,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=self.env,
                        start_new_session=True,
                    )
                )
        return self

    def exited(self) -> dict[int, int]:
        """Machine rank -> exit code, for the launches that have ended."""
        return {rank: proc.returncode for rank, proc in enumerate(self.procs) if proc.poll() is not None}

    def stop(self) -> None:
        """SIGTERM to every launch's session at once (the trainer stops at a step boundary), SIGKILL what is
        left after 15 s."""
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            running = [proc for proc in self.procs if proc.poll() is None]
            for proc in running:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            for proc in running:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def wait(self, timeout_s: float, on_poll: Callable[[], None] | None = None) -> LaunchOutcome:
        """Wait for every launch, calling ``on_poll`` about twice a second. The job fails as soon as one
        machine's launch does: the others are stopped rather than left to wait out the collective timeout.
        The timeout and an interrupt (Ctrl-C, or SIGTERM turned into one) stop every launch too."""
        note = ""
        exited: dict[int, int] = {}
        try:
            while True:
                try:
                    next(proc for proc in self.procs if proc.poll() is None).wait(0.5)
                except (StopIteration, subprocess.TimeoutExpired):
                    pass
                exited = self.exited()
                if len(exited) == len(self.procs) or any(exited.values()):
                    break
                if on_poll is not None:
                    on_poll()
                if time.perf_counter() - self.started > timeout_s:
                    note = f"stopped after the timeout of {timeout_s:g} s"
                    break
        finally:  # a failed machine, the timeout, Ctrl-C: leave no orphaned workers holding the port
            stopped = [rank for rank, proc in enumerate(self.procs) if proc.poll() is None]
            self.stop()
        failed = next((rank for rank, code in exited.items() if code != 0), None)
        for rank in stopped:
            with self.logs[rank].open("a") as log_file:
                log_file.write(f"\n{note or f'stopped because machine {failed} failed'}\n")
        returncode = None if note else exited[failed] if failed is not None else 0
        return LaunchOutcome(returncode, time.perf_counter() - self.started, self.logs, failed, note)


def machine_logs(folder: Path, num_machines: int) -> list[Path]:
    """Machine 0's log is ``train.log``, machine i's ``train.machine<i>.log``."""
    return [folder / ("train.log" if rank == 0 else f"train.machine{rank}.log") for rank in range(num_machines)]
