"""Helpers that launch the real thing: `accelerate launch` subprocesses over gloo on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TRAIN = "launcher/train.py"
TINY_LM = "configs/runs/tiny_lm.yaml"


def launch_env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    # One thread per process on 2 cores; loopback for gloo; torchelastic's leftovers in the test's temp dir.
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def accelerate_cmd(nproc: int) -> list[str]:
    cmd = [ACCELERATE, "launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nproc > 1:
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    return cmd


def launch(tmp_path: Path, nproc: int, *overrides: str, config: str = TINY_LM,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` the trainer with ``nproc`` processes; returns the finished process."""
    cmd = [*accelerate_cmd(nproc), TRAIN, "--config", config, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def run_ok(tmp_path: Path, nproc: int, name: str, *overrides: str, **kwargs) -> Path:
    """Launch a run into tmp_path/name and fail the test with its output unless it exits 0."""
    out = tmp_path / name
    proc = launch(tmp_path, nproc, f"run.output_dir={out}", *overrides, **kwargs)
    # A negative return code is a kill, not a pass.
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def read_run(out: Path) -> dict:
    from safetensors.torch import load_file

    return {
        "summary": json.loads((out / "summary.json").read_text()),
        "metrics": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
        "weights": load_file(str(out / "model.safetensors")),
    }


def rel_l2(a: dict, b: dict) -> float:
    """Relative L2 distance of two state dicts, over all tensors together."""
    assert a.keys() == b.keys()
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    norm = sum(float((b[k].double() ** 2).sum()) for k in b)
    return math.sqrt(diff / norm)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return launch_env(tmp_path)
