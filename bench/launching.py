"""How the benchmark starts a run: pinned ranks, bounded threads, the run's wall time from start to exit."""

from __future__ import annotations

import time
from pathlib import Path

from launcher.distributed import PIN_CORES_ENV
from launcher.launch import REPO, Job, job_commands, launch_env

LAUNCH_TIMEOUT_S = 900


def launch_once(cmd: list[str], tmp: Path, name: str, pin: bool = True) -> float:
    """Run one benchmark launch to its end, each rank pinned to a core of its own unless ``pin`` is False (a
    tokenizer's threads would share that one core); returns its wall time (s)."""
    env = {**launch_env(tmp / "tmp"), **({PIN_CORES_ENV: "1"} if pin else {})}
    started = time.perf_counter()
    outcome = Job([cmd], [tmp / f"{name}.log"], env).start().wait(LAUNCH_TIMEOUT_S)
    if not outcome.ok:
        raise SystemExit(
            f"benchmark run {name} failed ({outcome.reason()}): {' '.join(cmd)}\n{outcome.log_text()[-3000:]}"
        )
    return time.perf_counter() - started


def train_command(processes: int, *overrides: str, config: str | None = None) -> list[str]:
    """The trainer on ``processes`` processes of this host (one runs train.py itself, as compare does), on
    ``config`` or the embedded default."""
    (base,) = job_commands(processes)
    return [*base, *(["--config", str(REPO / config)] if config else []), *overrides]


def baseline_command(processes: int, *args: str) -> list[str]:
    (base,) = job_commands(processes, script=REPO / "bench" / "baselines.py")
    return [*base, *args]
