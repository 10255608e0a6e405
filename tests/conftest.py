"""Helpers that launch the real thing: `accelerate launch` subprocesses over gloo on CPU."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from launcher.compare import read_run, weights_agreement  # noqa: F401 - read_run is shared with the tests
from launcher.launch import REPO, accelerate_command, launch_env

TRAIN = "launcher/train.py"
TINY_LM = "configs/runs/tiny_lm.yaml"


@pytest.fixture(autouse=True, scope="session")
def tokenization_cache_in_tmp(tmp_path_factory):
    """Runs started by the tests (data.cache_dir=auto) cache tokenized data in the session's temp folder: never
    in the home folder, and never a hit left over from an earlier session."""
    os.environ["ACCUM_CACHE"] = str(tmp_path_factory.mktemp("accum-cache"))


def launch(
    tmp_path: Path, nproc: int, *overrides: str, config: str = TINY_LM, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch` the trainer with ``nproc`` processes; returns the finished process."""
    cmd = [*accelerate_command(nproc), "--config", config, *overrides]
    return subprocess.run(
        cmd, cwd=REPO, env=launch_env(tmp_path / "tmp"), capture_output=True, text=True, timeout=timeout
    )


def start(tmp_path: Path, nproc: int, *overrides: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a launch without waiting, in its own session so a test can signal or kill the whole group;
    its output goes to tmp_path/launch.log, readable while it runs."""
    cmd = [*accelerate_command(nproc), "--config", TINY_LM, *overrides]
    with open(tmp_path / "launch.log", "w") as log:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**launch_env(tmp_path / "tmp"), **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the ranks of an `accelerate launch` agent), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return sorted(found)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_ok(tmp_path: Path, nproc: int, name: str, *overrides: str, **kwargs) -> Path:
    """Launch a run into tmp_path/name and fail the test with its output unless it exits 0."""
    out = tmp_path / name
    proc = launch(tmp_path, nproc, f"run.output_dir={out}", *overrides, **kwargs)
    # A negative return code is a kill, not a pass.
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def rel_l2(a: dict, b: dict) -> float:
    """Relative L2 distance of two state dicts, over all tensors together."""
    return weights_agreement(a, b)["weights_rel_l2"]
