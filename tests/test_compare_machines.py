"""compare with a mode on 2 machines: one `accelerate launch` per machine rank, all on this host over loopback.

One comparison (float64, 3 steps): the reference is 1 machine x 2 processes; the other mode is 2 machines x
1 process each, meeting at one rendezvous on 127.0.0.1. Same world size, same split: the same model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.compare import ModeOutcome
from launcher.launch import REPO, Machine, accelerate_command, launch_env
from tests.conftest import child_pids, read_run, wait_until
from tests.test_compare import compare, compared, write_config

MODES = {
    "one_machine": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 2}},
    "two_machines": {"num_processes": 2, "num_machines": 2, "overrides": {"batch.micro_batch_size": 2}},
}


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    return compared(tmp_path_factory.mktemp("compare_machines"), MODES)


def test_two_machines_train_the_same_model(machines):
    mode = machines["modes"]["two_machines"]
    assert mode["num_machines"] == 2 and mode["verdict"] == "agrees"
    assert mode["agreement"]["weights_rel_l2"] <= 1e-10, mode["agreement"]
    summary = read_run(machines["out"] / "modes" / "two_machines")["summary"]
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert len(summary["peak_mem_bytes_per_rank"]) == 2  # one figure per process, gathered over both machines


def test_every_machine_keeps_its_log_and_only_the_main_process_writes(machines):
    run_dir = machines["out"] / "modes" / "two_machines"
    mode = machines["modes"]["two_machines"]
    assert mode["machine_logs"] == [str(run_dir / "train.log"), str(run_dir / "train.machine1.log")]
    assert all((run_dir / name).is_file() for name in ("train.log", "train.machine1.log"))
    # One writer: one line per step, none repeated by a second "main" process on machine 1.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert "| two_machines | 2m x 1p x mb2 x K=2 |" in (machines["out"] / "report.md").read_text()


def test_num_processes_must_divide_over_the_machines(tmp_path):
    proc = compare(tmp_path, write_config(tmp_path, MODES), "modes.two_machines.num_processes=3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "modes.two_machines.num_processes=3" in errors[0] and "multiple of num_machines=2" in errors[0]
    assert not (tmp_path / "out").exists()  # refused before any launch


def test_each_machine_launch_names_its_rank_and_the_shared_rendezvous():
    cmd = accelerate_command(4, machine=Machine(num_machines=2, machine_rank=1, main_process_port=29555))
    flags = ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")
    # --num_processes counts the processes of all machines, as accelerate does
    assert [cmd[cmd.index(flag) + 1] for flag in flags] == ["4", "2", "1", "127.0.0.1", "29555"]
    assert "--multi_gpu" in cmd
    with pytest.raises(ValueError, match="num_processes=3 does not divide over num_machines=2"):
        accelerate_command(3, machine=Machine(num_machines=2, machine_rank=0, main_process_port=29555))


def test_a_failed_machine_is_named_with_its_own_error_line(tmp_path):
    logs = [tmp_path / "train.log", tmp_path / "train.machine1.log"]
    logs[0].write_text("compare: stopped because machine 1 failed\n")
    logs[1].write_text("error: rank 1: lost contact with the other processes\nTraceback ...\n")
    outcome = ModeOutcome(returncode=4, launch_wall_s=1.0, logs=logs, failed_machine=1)
    assert outcome.log == logs[1]
    assert outcome.reason() == "machine 1 exited 4: rank 1: lost contact with the other processes"


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        children = child_pids(todo.pop())
        found.update(children)
        todo += children
    return found


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_stops_every_machine_launch(tmp_path):
    """A scheduler's SIGTERM to compare, mid-mode: every machine's launch and worker is stopped, exit 130."""
    config = write_config(tmp_path, {"two_machines": MODES["two_machines"]})
    cmd = [sys.executable, "-m", "launcher.compare", "--config", str(config), "overrides.run.max_steps=100000"]
    with open(tmp_path / "compare.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(tmp_path / "tmp"), stdout=log, stderr=log)
    try:
        metrics = tmp_path / "out" / "modes" / "two_machines" / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 120, "training steps")
        workers = descendants(proc.pid)
        assert len(workers) >= 4  # 2 agents and their 2 workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130, (tmp_path / "compare.log").read_text()[-3000:]
        wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the launches to end")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "compare interrupted" in (tmp_path / "compare.log").read_text()
