"""Faults, with real launches: signals, NaN, a dead or hung rank, a full disk, an unwritable folder."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher.rundir import RunDir, StepRecord
from tests.helpers import (
    CHECKPOINTED,
    PAUSE_AT_4,
    assert_one_error_line,
    child_pids,
    error_lines,
    launch,
    paused_in_save,
    read_run,
    run_ok,
    start,
    steps_logged,
    train_in_process,
    wait_until,
)


def train_directly(out: Path, *overrides: str) -> tuple[int, str]:
    """The trainer's main() in this process, into ``out``: (exit code, stderr)."""
    return train_in_process(f"run.output_dir={out}", *CHECKPOINTED, *overrides)


@pytest.mark.launch
def test_sigterm_without_launcher_exits_143(tmp_path):
    out = tmp_path / "out"
    proc = start(tmp_path, 1, f"run.output_dir={out}", *CHECKPOINTED, env=PAUSE_AT_4).procs[0]
    paused_in_save(out, 4)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, (tmp_path / "launch.log").read_text()[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


@pytest.mark.launch
def test_nan_on_one_rank_is_skipped_on_all(tmp_path):
    out = run_ok(tmp_path, 2, "nan", *CHECKPOINTED, "run.inject_nan_at_step=3", "run.inject_nan_rank=1")
    run = read_run(out)
    assert [m.skipped for m in run.metrics] == [False, False, True, False, False, False, False, False]
    # Rank 1's loss is NaN; DDP's gradient all-reduce then carries its NaN into rank 0's gradients, so both
    # ranks flag the step, and the all-reduced verdict skips it on both.
    assert run.metrics[2].nonfinite_ranks == 2
    assert math.isnan(run.metrics[2].loss)
    assert run.summary.skipped_steps == [3]
    assert all(bool(torch.isfinite(w).all()) for w in run.weights.values())


def test_nan_with_on_nonfinite_stop_exits_3(tmp_path):
    code, stderr = train_directly(tmp_path / "out", "run.inject_nan_at_step=3", "run.on_nonfinite=stop")
    assert code == 3, stderr
    assert_one_error_line(stderr, ("step 3", "run.on_nonfinite=stop"))
    assert steps_logged(tmp_path / "out") == 3
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-00000002"]


@pytest.mark.launch
def test_dead_rank_fails_the_launch_quickly(tmp_path):
    out = tmp_path / "dead"
    proc = start(tmp_path, 2, f"run.output_dir={out}", *CHECKPOINTED, "run.max_steps=400").procs[0]
    wait_until(lambda: steps_logged(out) >= 3, 120, "step 3")
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: proc.poll() is not None, 30, "the launch to exit after a rank died")
    print(f"launch exited {time.monotonic() - killed:.1f} s after rank 1 was killed")
    assert proc.returncode != 0
    assert "error: rank 0: lost contact with the other processes" in (tmp_path / "launch.log").read_text()
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]


@pytest.mark.launch
def test_hung_rank_trips_the_collective_timeout(tmp_path):
    out = tmp_path / "hung"
    proc = start(
        tmp_path, 2, f"run.output_dir={out}", *CHECKPOINTED, "run.max_steps=400", "run.dist_timeout_s=3"
    ).procs[0]
    wait_until(lambda: steps_logged(out) >= 3, 120, "step 3")
    ranks = child_pids(proc.pid)
    os.kill(ranks[1], signal.SIGSTOP)  # a real hang: the rank stops answering, its sockets stay open
    log = tmp_path / "launch.log"
    wait_until(lambda: "Timed out waiting 3000ms" in log.read_text(), 30, "rank 0's collective timeout")
    # Left stopped, torchelastic SIGKILLs it after its 30 s shutdown timeout (measured); waking it lets the
    # pending SIGTERM in, and its next collective fails at once.
    os.kill(ranks[1], signal.SIGCONT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, stderr = train_directly(tmp_path / "out", f"run.output_dir={blocker / 'out'}")  # the later key wins
    assert code == 2
    assert_one_error_line(stderr, ("run.output_dir", "not writable"))


@pytest.fixture(params=["size=4m", "size=64m,nr_inodes=17"], ids=["bytes", "files"])
def small_disk(request, tmp_path):
    """A tmpfs with room for two checkpoints of the tiny model (1.4 MB and 8 files each) and not a third: out of
    bytes (refused before writing) or out of files (the disk fills up while writing)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", request.param, "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_last_checkpoint_and_resumes_once_freed(small_disk):
    out = small_disk / "run"
    args = (f"run.output_dir={out}", "run.max_steps=6", "run.checkpoint_every=2")
    code, stderr = train_in_process(*args)
    assert code == 2, stderr
    line = assert_one_error_line(stderr, (f"run.output_dir={str(out)!r}", "no room for the checkpoint of step 6"))
    assert "needs about" in line and "the earlier checkpoints are kept" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    subprocess.run(["mount", "-o", "remount,size=64m,nr_inodes=1000", str(small_disk)], check=True)
    code, stderr = train_in_process(*args, "run.resume=auto")
    assert code == 0, stderr
    assert [m.step for m in read_run(out).metrics] == list(range(1, 7))
    assert json.loads((out / "checkpoints" / "step-00000006" / "meta.json").read_text())["step"] == 6


def step_record(step: int) -> StepRecord:
    return StepRecord(step, 1.0, 0.1, 1.0, 10, 4, 0.01, 0, 0, 0, 0, False, 0)


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(step_record(s).to_json()) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    kept = RunDir(tmp_path).truncate_metrics(3)
    assert [r.step for r in kept] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


# ---- self-healing runs (`accelerate launch --max_restarts N`): the budget ----

CRASH = (*CHECKPOINTED, "run.inject_nan_at_step=6", "run.on_nonfinite=stop")  # exit 3 at step 6, every attempt


@pytest.mark.launch
def test_the_same_crash_on_two_attempts_is_not_restarted_again(tmp_path):
    out = tmp_path / "out"
    outcome = launch(tmp_path, 2, f"run.output_dir={out}", *CRASH, max_restarts=5)
    assert outcome.returncode != 0
    stops = [line for line in error_lines(outcome.log_text()) if "attempts" in line]
    assert len(stops) == 1, outcome.log_text()[-4000:]
    for words in ("attempts 0 and 1 both failed after step 6", "not restarted", "checkpoints/step-00000004"):
        assert words in stops[0], stops[0]
    assert outcome.log_text().count("plan: ") == 2, "a third attempt trained"
    assert [r.attempt for r in RunDir(out).restarts()] == [1]


def test_the_last_attempt_reports_the_budget_and_the_checkpoint(tmp_path, monkeypatch):
    # The agent's budget reaches the workers as its environment: the last of 1 restart allowed.
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, stderr = train_directly(tmp_path / "out", "run.inject_nan_at_step=6", "run.on_nonfinite=stop")
    assert code == 3
    line = assert_one_error_line(stderr, ("step 6", "restarts used up (1 of 1)"))
    assert line.endswith("the last complete checkpoint is " + str(tmp_path / "out/checkpoints/step-00000004")), line
