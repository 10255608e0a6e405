"""slurm/train.sbatch on a fake 2-node allocation: the `accelerate launch` each node would run.

A fake `scontrol` lists the allocation's hosts, a fake `srun` runs its command once per node with
that node's Slurm variables (as Slurm does with one task per node), and the fake `accelerate` from
tests/scripts.py prints each node's argv.
"""

from __future__ import annotations

from launcher.launch import REPO
from tests.scripts import launches, multi_node_argv, run_script, write_exe

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


def test_each_node_runs_one_launch_with_its_rank(tmp_path):
    fake = tmp_path / "fakebin"
    fake.mkdir()
    write_exe(fake / "scontrol", FAKE_SCONTROL)
    write_exe(fake / "srun", FAKE_SRUN)
    slurm_env = {
        "SLURM_JOB_NODELIST": "gpu-a[017-018]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }  # what --gpus-per-node=8 gives each task
    proc = run_script(
        tmp_path, ["bash", str(REPO / "slurm" / "train.sbatch"), "--config", "c.yaml", "a=1"], None, **slurm_env
    )
    per_node = launches(proc)
    assert [launch["env"]["SLURMD_NODENAME"] for launch in per_node] == list(NODES)
    for rank, launch in enumerate(per_node):
        train = ["launcher/train.py", "--config", "c.yaml", "a=1"]
        assert launch["argv"] == [*multi_node_argv(16, 29500, rank, NODES[0]), *train]
        assert launch["cwd"] == str(REPO)
    assert "srun option --kill-on-bad-exit=1" in proc.stderr  # one failed node ends the job
    # The preflight ran on every node before its launch.
    assert (tmp_path / "python.log").read_text().splitlines() == ["-m launcher.preflight"] * 2
