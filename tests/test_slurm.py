"""slurm/train.sbatch on a fake 2-node allocation: the `accelerate launch` each node would run.

A fake `scontrol` lists the allocation's hosts, a fake `srun` runs its command once per node with
that node's Slurm variables (as Slurm does with one task per node), and the fake `accelerate` from
tests/scripts.py prints each node's argv.
"""

from __future__ import annotations

from launcher.launch import REPO
from tests.scripts import fake_venv, launches, multi_node_argv, run_script, write_exe

NODES = ("gpu-a017", "gpu-a018")
FAKE_SCONTROL = f"""#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu-a[017-018]" ]] || {{ echo "unexpected: $*" >&2; exit 1; }}
printf '%s\\n' {" ".join(NODES)}
"""
# Drops srun's own options, then runs the rest once per node, sequentially.
FAKE_SRUN = f"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "srun option $1" >&2; shift; done
nodes=({" ".join(NODES)})
for i in "${{!nodes[@]}}"; do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURMD_NODENAME=${{nodes[$i]}} "$@" || exit $?
done
"""


def slurm(tmp_path, check: bool = True, **env: str):
    """slurm/train.sbatch on the fake allocation, as sbatch would start it."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    write_exe(fake / "scontrol", FAKE_SCONTROL)
    write_exe(fake / "srun", FAKE_SRUN)
    slurm_env = {
        "SLURM_JOB_NODELIST": "gpu-a[017-018]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",  # what --gpus-per-node=8 gives each task
        **env,
    }
    script = ["bash", str(REPO / "slurm" / "train.sbatch"), "--config", "c.yaml", "a=1"]
    return run_script(tmp_path, script, None, check=check, **slurm_env)


def test_each_node_runs_one_launch_with_its_rank_in_the_named_environment(tmp_path):
    venv = fake_venv(tmp_path)
    proc = slurm(tmp_path, ACCUM_VENV=str(venv))
    per_node = launches(proc)
    assert [launch["env"]["SLURMD_NODENAME"] for launch in per_node] == list(NODES)
    for rank, launch in enumerate(per_node):
        train = ["launcher/train.py", "--config", "c.yaml", "a=1"]
        assert launch["argv"] == [*multi_node_argv(16, 29500, rank, NODES[0]), *train]
        assert launch["cwd"] == str(REPO)
        assert launch["env"]["VIRTUAL_ENV"] == str(venv)  # activated on the node, not whatever PATH held
    assert "srun option --kill-on-bad-exit=1" in proc.stderr  # one failed node ends the job
    # The preflight ran on every node before its launch, with the environment's python.
    assert (tmp_path / "python.log").read_text().splitlines() == ["-m launcher.preflight"] * 2
    assert "#SBATCH --requeue" in (REPO / "slurm" / "train.sbatch").read_text()


def test_a_missing_environment_is_one_line(tmp_path):
    proc = slurm(tmp_path, check=False, ACCUM_VENV=str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "ACCUM_VENV=" in proc.stderr and "make setup" in proc.stderr
    assert launches(proc) == []


def test_a_container_runs_through_srun(tmp_path):
    proc = slurm(tmp_path, ACCUM_CONTAINER="registry.example/accum:1")
    assert "srun option --container-image=registry.example/accum:1" in proc.stderr
    assert f"srun option --container-mounts={REPO}:{REPO}" in proc.stderr
