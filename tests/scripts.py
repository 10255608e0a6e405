"""Fakes for the node scripts (docker/entrypoint.sh, slurm/train.sbatch): no Docker engine or Slurm here, so
each script runs on the host with a fake `accelerate` (prints its argv as JSON), a fake `nvidia-smi` (lists N
GPUs) and a fake `python` (records the preflight) on PATH."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent

# Prints one JSON line: the argv and the few variables a launch depends on.
FAKE_ACCELERATE = f"""#!{sys.executable}
import json, os, sys
keys = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "OMP_NUM_THREADS", "SLURMD_NODENAME", "VIRTUAL_ENV")
print(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}))
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
"""


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_path(tmp_path: Path, gpus: int | None) -> Path:
    """A bin folder with fake accelerate and python, and nvidia-smi listing ``gpus`` GPUs (None: absent)."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    write_exe(fake / "accelerate", FAKE_ACCELERATE)
    write_exe(fake / "python", FAKE_PYTHON)
    if gpus is not None:
        lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(gpus))
        write_exe(fake / "nvidia-smi", f"#!/usr/bin/env bash\nprintf '{lines}'\n")
    return fake


def fake_venv(tmp_path: Path) -> Path:
    """A virtual environment's layout: bin/activate puts its bin (the fakes) first on PATH."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("accelerate", "python"):
        write_exe(venv / "bin" / name, FAKE_ACCELERATE if name == "accelerate" else FAKE_PYTHON)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{venv}"\nexport PATH="{venv}/bin:$PATH"\n')
    return venv


def run_script(
    tmp_path: Path, script: list[str], gpus: int | None, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run a node script with only the fakes and the system's basic tools on PATH."""
    fake = fake_path(tmp_path, gpus)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CUDA_", "SLURM_", "NNODES", "NODE_RANK", "MASTER_", "NPROC"))
    }
    full = {**base, "PATH": f"{fake}:/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "python.log"), **env}
    proc = subprocess.run(script, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc


def launches(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def multi_node_argv(num_processes: int, port: int, machine_rank: int, addr: str) -> list[str]:
    """What a node of a 2-node job runs; num_processes counts all machines (accelerate's convention)."""
    return [
        *"launch --num_machines 2 --mixed_precision no --dynamo_backend no --multi_gpu".split(),
        *f"--num_processes {num_processes} --main_process_port {port} --machine_rank {machine_rank}".split(),
        *f"--main_process_ip {addr} --rdzv_backend static".split(),
    ]
