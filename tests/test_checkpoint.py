"""Issue 4: checkpoints, resume and faults, with real launches.

One module-scoped set of float64 runs (8 steps, AdamW, cosine LR with warmup, 40 samples so the epoch
has a short last window) is shared by the resume assertions: straight, stopped at 4 and resumed, and
stopped at 3 and 6 and resumed, each under 1 process (K=4) and 2 processes (K=2).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.launch import accelerate_command, launch_env
from tests.conftest import (
    REPO,
    TINY_LM,
    TRAIN,
    child_pids,
    read_run,
    rel_l2,
    run_ok,
    start,
    steps_logged,
    wait_until,
)

COMMON = (
    "run.dtype=float64",
    "model.dropout=0.0",
    "optim.name=adamw",  # moments and step count in the optimizer state: the resume must restore them
    "optim.lr=0.01",
    "optim.schedule=cosine",
    "optim.warmup_steps=2",
    "optim.grad_clip=0",
    "data.num_samples=40",
    "run.max_steps=8",
    "batch.global_batch_size=16",
    "batch.micro_batch_size=4",
    "batch.accum_steps=null",
    "run.checkpoint_every=2",
)
AUTO = "run.resume=auto"
# name: list of launches into the same output folder, each a tuple of overrides
CHAINS = {
    "straight": [()],
    "stop4": [("run.stop_at_step=4",), (AUTO,)],
    "stop3_6": [("run.stop_at_step=3",), (AUTO, "run.stop_at_step=6"), (AUTO,)],
}


def losses(run: dict) -> list[float]:
    return [m["loss"] for m in run["metrics"]]


def assert_same_run(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    unequal = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
    assert not unequal, f"weights differ: {unequal[:3]}"
    assert [m["step"] for m in b["metrics"]] == list(range(1, 9))
    assert losses(a) == losses(b)
    assert [m["lr"] for m in a["metrics"]] == [m["lr"] for m in b["metrics"]]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def runs(root) -> dict:
    found = {}
    for nproc in (1, 2):
        for name, chain in CHAINS.items():
            label = f"{name}_{nproc}"
            for i, overrides in enumerate(chain):
                out = root / label
                if label == "stop4_1" and i == 1:
                    # Keep the 1 x K=4 step-4 checkpoint for the resume under 2 x K=2, then plant what a
                    # save killed half-way leaves: a .tmp- folder with a partial file and no meta.json.
                    shutil.copytree(out / "checkpoints" / "step-00000004", root / "ckpt_1x4_step4")
                    partial = out / "checkpoints" / ".tmp-step-00000006"
                    partial.mkdir()
                    (partial / "model.safetensors").write_bytes(b"\0" * 100)
                train(root, nproc, label, *COMMON, *overrides)
            found[label] = read_run(root / label)
    # The 1 x K=4 checkpoint, resumed under 2 processes x K=2 (same global batch), in a fresh folder; launched
    # on a busy --main_process_port to see what accelerate does with one.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = launch_on_port(
            root, port, f"run.output_dir={root / 'cross'}", *COMMON, f"run.resume={root / 'ckpt_1x4_step4'}"
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found["cross"] = read_run(root / "cross")
    found["cross_launch"] = {"port": port, "stderr": proc.stderr}
    return found


def train(root: Path, nproc: int, name: str, *overrides: str) -> Path:
    """One run into root/name: one process runs train.py directly (no launcher: ~3 s less), more go through
    `accelerate launch`."""
    if nproc > 1:
        return run_ok(root, nproc, name, *overrides)
    proc = train_directly(root / name, *overrides)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stderr[-5000:]}"
    return root / name


def launch_on_port(root: Path, port: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [*accelerate_command(2), "--config", TINY_LM, *overrides]
    cmd[cmd.index("--main_process_port") + 1] = str(port)
    return subprocess.run(cmd, cwd=REPO, env=launch_env(root / "tmp"), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("chain", ["stop4", "stop3_6"])
def test_resumed_run_is_bitwise_the_straight_run(runs, chain, nproc):
    assert_same_run(runs[f"straight_{nproc}"], runs[f"{chain}_{nproc}"])


def test_resume_under_another_launch_matches(runs):
    distance = rel_l2(runs["cross"]["weights"], runs["straight_1"]["weights"])
    assert distance <= 1e-10, f"1xK=4 checkpoint resumed under 2xK=2: relative L2 {distance:.3e}"
    assert runs["cross"]["summary"]["resumed_from_step"] == 4
    assert runs["cross"]["summary"]["world_size"] == 2
    # A fresh folder's metrics hold the resumed steps only.
    assert [m["step"] for m in runs["cross"]["metrics"]] == [5, 6, 7, 8]
    assert losses(runs["cross"]) == pytest.approx(losses(runs["straight_1"])[4:], rel=1e-10)


def test_checkpoints_are_pruned_and_partial_saves_removed(root, runs):
    folder = root / "stop4_1" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000006", "step-00000008"]
    meta = json.loads((folder / "step-00000008" / "meta.json").read_text())
    assert (meta["step"], meta["global_batch_size"], meta["world_size"], meta["accum_steps"]) == (8, 16, 1, 4)
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt"}


def test_sigkill_while_saving_resumes_from_last_complete_checkpoint(root, runs, tmp_path):
    out = tmp_path / "killed"
    proc = start(tmp_path, 1, f"run.output_dir={out}", *COMMON, extra_env=PAUSE_AT_4)
    try:
        partial = paused_in_save(out, 4)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its rank, mid-save
        proc.wait()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    train(tmp_path, 1, "killed", *COMMON, AUTO)
    assert_same_run(runs["straight_1"], read_run(out))
    assert not partial.exists()


PAUSE_AT_4 = {"ACCUM_TEST_PAUSE_IN_SAVE_AT_STEP": "4"}  # holds rank 0 in the save of step 4 until a signal


def paused_in_save(out: Path, step: int) -> Path:
    """Wait until rank 0 is held in the save of ``step`` (files written, not renamed); returns the temp folder."""
    partial = out / "checkpoints" / f".tmp-step-{step:08d}"
    wait_until(lambda: (partial / "rng.pt").exists(), 120, f"the held save of step {step}")
    time.sleep(0.5)  # from the last file to signal.pause() is microseconds; leave it a wide margin
    return partial


def test_sigterm_checkpoints_and_resumes_to_the_same_weights(runs, tmp_path):
    out = tmp_path / "term"
    proc = start(tmp_path, 2, f"run.output_dir={out}", *COMMON, extra_env=PAUSE_AT_4)
    paused_in_save(out, 4)
    os.kill(proc.pid, signal.SIGTERM)  # to the launcher's agent, which forwards it to both ranks
    proc.wait(timeout=120)
    log = (tmp_path / "launch.log").read_text()
    # torchelastic re-raises the signal in its agent: the launch exits 1 whatever the ranks return.
    assert proc.returncode == 1, log
    assert "rank 0: got SIGTERM" in log and "rank 1: got SIGTERM" in log
    # The save in flight completes; both ranks agree (all-reduced) to stop after the next step, 5.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert steps_logged(out) == 5
    assert not (out / "summary.json").exists()
    train(tmp_path, 2, "term", *COMMON, AUTO)
    assert_same_run(runs["straight_2"], read_run(out))


def test_sigterm_without_launcher_exits_143(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, TRAIN, "--config", TINY_LM, f"run.output_dir={out}", *COMMON]
    env = {**launch_env(tmp_path / "tmp"), **PAUSE_AT_4}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    paused_in_save(out, 4)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_nan_on_one_rank_is_skipped_on_all(tmp_path):
    out = run_ok(tmp_path, 2, "nan", *COMMON, "run.inject_nan_at_step=3", "run.inject_nan_rank=1")
    run = read_run(out)
    assert [m["skipped"] for m in run["metrics"]] == [False, False, True, False, False, False, False, False]
    # Rank 1's loss is NaN; DDP's gradient all-reduce then carries its NaN into rank 0's gradients, so both
    # ranks flag the step, and the all-reduced verdict skips it on both.
    assert run["metrics"][2]["nonfinite_ranks"] == 2
    assert math.isnan(run["metrics"][2]["loss"])
    assert run["summary"]["skipped_steps"] == [3]
    assert all(bool(torch.isfinite(w).all()) for w in run["weights"].values())


def test_nan_with_on_nonfinite_stop_exits_3(tmp_path):
    proc = train_directly(tmp_path / "out", "run.inject_nan_at_step=3", "run.on_nonfinite=stop")
    assert proc.returncode == 3, proc.stderr
    assert_one_error_line(proc, ("step 3", "run.on_nonfinite=stop"))
    assert steps_logged(tmp_path / "out") == 3
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-00000002"]


def test_dead_rank_fails_the_launch_quickly(tmp_path):
    out = tmp_path / "dead"
    proc = start(tmp_path, 2, f"run.output_dir={out}", *COMMON, "run.max_steps=400")
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


def test_hung_rank_trips_the_collective_timeout(tmp_path):
    out = tmp_path / "hung"
    proc = start(tmp_path, 2, f"run.output_dir={out}", *COMMON, "run.max_steps=400", "run.dist_timeout_s=3")
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


# ---- bad input: one clear line, exit 2, nothing written over ----


def train_directly(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """train.py as one process without a launcher, into ``out``."""
    cmd = [sys.executable, TRAIN, "--config", TINY_LM, f"run.output_dir={out}", *COMMON, *overrides]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=launch_env(out.parent / "tmp")
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, words: tuple[str, ...]) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def stopped_run(root, runs, tmp_path) -> Path:
    """A copy of a run stopped at step 4 of 8 (its step-4 checkpoint, the metrics of 4 steps)."""
    out = tmp_path / "out"
    shutil.copytree(root / "stop4_1", out)
    shutil.rmtree(out / "checkpoints")
    shutil.copytree(root / "ckpt_1x4_step4", out / "checkpoints" / "step-00000004")
    return out


def damage_truncate(ckpt: Path) -> None:
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(1000)


def damage_meta(ckpt: Path) -> None:
    (ckpt / "meta.json").write_text('{"step": 4, "fil')


BAD_RESUMES = {
    # name: (damage to the step-4 checkpoint, overrides, words of the error line)
    "missing": (None, ("run.resume=/nonexistent/step-4",), ("run.resume", "/nonexistent/step-4", "no such")),
    "truncated": (damage_truncate, (AUTO,), ("truncated", "model.safetensors", "expected")),
    "torn_meta": (damage_meta, (AUTO,), ("incomplete", "meta.json")),
    "other_model": (None, (AUTO, "model.hidden_size=32"), ("another model", "model.hidden_size=64", "32")),
    "other_batch": (
        None,
        (AUTO, "batch.global_batch_size=32"),
        ("global_batch_size=16", "32", "run.allow_batch_change=true"),
    ),
    # A checkpoint from another folder resumes into a fresh folder only, never over a run.
    "foreign_into_a_run": (None, ("run.resume={root}/ckpt_1x4_step4",), ("already holds a run", "run.overwrite")),
}


@pytest.mark.parametrize("case", sorted(BAD_RESUMES))
def test_bad_resume_gets_one_clear_line(root, stopped_run, case):
    damage, overrides, words = BAD_RESUMES[case]
    if damage:
        damage(stopped_run / "checkpoints" / "step-00000004")
    before = snapshot(stopped_run)
    proc = train_directly(stopped_run, *(o.format(root=root) for o in overrides))
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc, words)
    assert snapshot(stopped_run) == before


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = train_directly(tmp_path / "out", f"run.output_dir={blocker / 'out'}")  # the later key wins
    assert proc.returncode == 2
    assert_one_error_line(proc, ("run.output_dir", "not writable"))


def test_busy_port_makes_accelerate_pick_another(runs):
    # accelerate launch (one machine) warns and falls back to a free port by itself; the run goes on. The
    # message is accelerate's: the launcher never sees the port.
    port, stderr = runs["cross_launch"]["port"], runs["cross_launch"]["stderr"]
    assert f"Port `{port}` is already in use" in stderr


def test_full_disk_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    # In-process: a save that hits ENOSPC is reported in one line and removes its temporary folder.
    import errno

    from launcher import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_files", no_space)
    from accelerate import Accelerator

    from launcher.batching import BatchPlan
    from launcher.config import load_config

    cfg = load_config(REPO / TINY_LM, [f"run.output_dir={tmp_path}"])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device; the earlier checkpoints are kept"):
        checkpoint.save_checkpoint(Accelerator(cpu=True), model, optimizer, cfg, BatchPlan(1, 4, 4), 2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    from launcher.metrics import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    kept = truncate_jsonl(path, 3)
    assert [r["step"] for r in kept] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize(
    "override, words",
    [
        ("run.keep_checkpoints=0", ("run.keep_checkpoints", ">= 1")),
        ("run.checkpoint_every=-1", ("run.checkpoint_every", ">= 0")),
        ("run.on_nonfinite=ignore", ("run.on_nonfinite", "skip, stop")),
        ("run.max_consecutive_nonfinite=0", ("run.max_consecutive_nonfinite", ">= 1")),
    ],
)
def test_checkpoint_keys_are_validated(override, words):
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(REPO / TINY_LM, [override])
    for word in words:
        assert word in str(err.value)
