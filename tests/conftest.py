"""Helpers that launch the real thing: `accelerate launch` subprocesses over gloo on CPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launcher.compare import read_run, weights_agreement  # noqa: F401 - read_run is shared with the tests
from launcher.launch import launch_env as launcher_env
from launcher.launch import train_command

REPO = Path(__file__).resolve().parents[1]
TRAIN = "launcher/train.py"
TINY_LM = "configs/runs/tiny_lm.yaml"


def launch_env(tmp_path: Path) -> dict[str, str]:
    # One thread per process on 2 cores; loopback for gloo; torchelastic's leftovers in the test's temp dir.
    env = launcher_env(tmp_path / "tmp", threads_per_process=1)
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def launch(tmp_path: Path, nproc: int, *overrides: str, config: str = TINY_LM,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` the trainer with ``nproc`` processes; returns the finished process."""
    cmd = train_command(nproc, config, list(overrides))
    return subprocess.run(cmd, cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return launch_env(tmp_path)
