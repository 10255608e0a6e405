"""Helpers that launch the real thing: `accelerate launch` subprocesses over gloo on CPU."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from launcher.launch import REPO, accelerate_command, launch_env

TRAIN = "launcher/train.py"
TINY_LM = "configs/runs/tiny_lm.yaml"


def launch(
    tmp_path: Path, nproc: int, *overrides: str, config: str = TINY_LM, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch` the trainer with ``nproc`` processes; returns the finished process."""
    cmd = [*accelerate_command(nproc), "--config", config, *overrides]
    return subprocess.run(
        cmd, cwd=REPO, env=launch_env(tmp_path / "tmp"), capture_output=True, text=True, timeout=timeout
    )


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
