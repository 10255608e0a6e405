"""Checkpoints and resume, with real launches.

One module-scoped set of float64 runs (8 steps, AdamW, cosine LR with warmup, 40 samples so the epoch
has a short last window) is shared by the resume assertions: straight under 1 process (K=4, trained in this
process) and 2 processes (K=2); stopped at 4 and resumed on 1 process; on 2 processes, stopped by SIGTERM
during the save of step 4 and resumed; and healed after two killed ranks under the elastic
agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch

from launcher.launch import Job, accelerate_command, launch_env
from tests.helpers import (
    CHECKPOINTED,
    PAUSE_AT_4,
    TINY_LM,
    assert_one_error_line,
    paused_in_save,
    read_run,
    rel_l2,
    run_here,
    run_ok,
    start,
    steps_logged,
    train_in_process,
)

AUTO = "run.resume=auto"
# Rank 1 killed after step 5 of the first attempt, rank 0 after step 7 of the restart; logging to TensorBoard.
HEALING = ("run.inject_kill=1@5/0,0@7/1", "run.log_with=tensorboard")


def assert_same_run(a, b) -> None:
    assert a.weights.keys() == b.weights.keys()
    unequal = [k for k in a.weights if not torch.equal(a.weights[k], b.weights[k])]
    assert not unequal, f"weights differ: {unequal[:3]}"
    assert [m.step for m in b.metrics] == list(range(1, 9))
    assert a.losses == b.losses
    assert [m.lr for m in a.metrics] == [m.lr for m in b.metrics]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


def stopped_by_sigterm(root: Path, label: str) -> dict:
    """A 2-process run into root/label, SIGTERMed (at the agent) while rank 0 is held in the save of step 4:
    what the stop left behind, before the resumes after it change anything."""
    out = root / label
    proc = start(root, 2, f"run.output_dir={out}", *CHECKPOINTED, env=PAUSE_AT_4, log="term.log").procs[0]
    paused_in_save(out, 4)
    os.kill(proc.pid, signal.SIGTERM)  # to the launcher's agent, which forwards it to both ranks
    proc.wait(timeout=120)
    return {
        "returncode": proc.returncode,
        "log": (root / "term.log").read_text(),
        "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir()),
        "steps_logged": steps_logged(out),
        "summary_written": (out / "summary.json").exists(),
    }


@pytest.fixture(scope="module")
def runs(root) -> dict:
    found = {"straight_1": read_run(run_here(root, "straight_1", *CHECKPOINTED))}
    run_here(root, "stop4_1", *CHECKPOINTED, "run.stop_at_step=4")
    # Keep the 1 x K=4 step-4 checkpoint for the resume under 2 x K=2, then plant what a save killed half-way
    # leaves: a .tmp- folder with a partial file and no meta.json.
    shutil.copytree(root / "stop4_1" / "checkpoints" / "step-00000004", root / "ckpt_1x4_step4")
    partial = root / "stop4_1" / "checkpoints" / ".tmp-step-00000006"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    found["stop4_1"] = read_run(run_here(root, "stop4_1", *CHECKPOINTED, AUTO))

    found["straight_2"] = read_run(run_ok(root, 2, "straight_2", *CHECKPOINTED))
    # Resumed once to the end: a run resumed twice is the healed one's, whose restarts resume by themselves.
    found["term"] = stopped_by_sigterm(root, "term_2")
    found["term_2"] = read_run(run_ok(root, 2, "term_2", *CHECKPOINTED, AUTO))
    found["healed_2"] = read_run(run_ok(root, 2, "healed_2", *CHECKPOINTED, *HEALING, max_restarts=2, log="healed.log"))
    # The 1 x K=4 checkpoint, resumed under 2 processes x K=2 (same global batch), in a fresh folder; launched
    # on a busy --main_process_port to see what accelerate does with one.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        outcome = launch_on_port(
            root, port, f"run.output_dir={root / 'cross'}", *CHECKPOINTED, f"run.resume={root / 'ckpt_1x4_step4'}"
        )
    assert outcome.ok, outcome.log_text()[-3000:]
    found["cross"] = read_run(root / "cross")
    found["cross_launch"] = {"port": port, "log": outcome.log_text()}
    return found


def launch_on_port(root: Path, port: int, *overrides: str):
    cmd = [*accelerate_command(2), "--config", TINY_LM, *overrides]
    cmd[cmd.index("--main_process_port") + 1] = str(port)
    return Job([cmd], [root / "cross.log"], launch_env(root / "tmp")).start().wait(300)


@pytest.mark.launch
@pytest.mark.parametrize("label", ["stop4_1", "term_2"])
def test_resumed_run_is_bitwise_the_straight_run(runs, label):
    assert_same_run(runs[f"straight_{label[-1]}"], runs[label])


@pytest.mark.launch
def test_killed_ranks_heal_to_the_uninterrupted_run(root, runs):
    """Under `--max_restarts 2`, rank 1 SIGKILLed after step 5, then rank 0 after step 7 of the restart: each
    restart resumes the newest checkpoint by itself, and every step is logged once."""
    assert_same_run(runs["straight_2"], runs["healed_2"])
    restarts = [(r.attempt, r.previous_reached_step, r.resumed_from_step) for r in runs["healed_2"].summary.restarts]
    assert restarts == [(1, 5, 4), (2, 7, 6)]
    assert runs["healed_2"].summary.retrained_steps == 2
    log = (root / "healed.log").read_text()
    assert "restart 1: the attempt before failed after step 5" in log and "resume: step 6 from" in log


@pytest.mark.launch
def test_tensorboard_continues_the_healed_run_without_repeats(root, runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "healed_2" / "logs" / "accum-launcher"))
    events.Reload()
    # Three sessions' event files; steps 5 and 7 were logged twice and the earlier copies are purged.
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(runs["healed_2"].losses, rel=1e-6)


@pytest.mark.launch
def test_resume_under_another_launch_matches(runs):
    distance = rel_l2(runs["cross"].weights, runs["straight_1"].weights)
    assert distance <= 1e-10, f"1xK=4 checkpoint resumed under 2xK=2: relative L2 {distance:.3e}"
    assert runs["cross"].summary.resumed_from_step == 4
    assert runs["cross"].summary.world_size == 2
    # A fresh folder's metrics hold the resumed steps only.
    assert [m.step for m in runs["cross"].metrics] == [5, 6, 7, 8]
    assert runs["cross"].losses == pytest.approx(runs["straight_1"].losses[4:], rel=1e-10)


@pytest.mark.launch
def test_checkpoints_are_pruned_and_partial_saves_removed(root, runs):
    folder = root / "stop4_1" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000006", "step-00000008"]
    meta = json.loads((folder / "step-00000008" / "meta.json").read_text())
    assert (meta["step"], meta["global_batch_size"], meta["world_size"], meta["accum_steps"]) == (8, 16, 1, 4)
    assert set(meta["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt"}


@pytest.mark.launch
def test_sigkill_while_saving_resumes_from_last_complete_checkpoint(root, runs, tmp_path):
    out = tmp_path / "killed"
    proc = start(tmp_path, 1, f"run.output_dir={out}", *CHECKPOINTED, env=PAUSE_AT_4).procs[0]
    try:
        partial = paused_in_save(out, 4)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer, mid-save
        proc.wait()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    run_here(tmp_path, "killed", *CHECKPOINTED, AUTO)
    assert_same_run(runs["straight_1"], read_run(out))
    assert not partial.exists()


@pytest.mark.launch
def test_sigterm_checkpoints_and_resumes_to_the_same_weights(runs):
    term = runs["term"]
    # torchelastic re-raises the signal in its agent: the launch exits 1 whatever the ranks return.
    assert term["returncode"] == 1, term["log"][-3000:]
    assert "rank 0: got SIGTERM" in term["log"] and "rank 1: got SIGTERM" in term["log"]
    # The save in flight completes; both ranks agree (all-reduced) to stop after the next step, 5.
    assert term["checkpoints"] == ["step-00000004", "step-00000005"]
    assert term["steps_logged"] == 5 and not term["summary_written"]
    # Resumed to the straight run's weights: test_resumed_run_is_bitwise...
    assert_same_run(runs["straight_2"], runs["term_2"])


# ---- bad input: one clear line, exit 2, nothing written over ----


def train_directly(out: Path, *overrides: str) -> tuple[int, str]:
    """The trainer's main() in this process, into ``out``: (exit code, stderr)."""
    return train_in_process(f"run.output_dir={out}", *CHECKPOINTED, *overrides)


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


@pytest.mark.launch
@pytest.mark.parametrize("case", sorted(BAD_RESUMES))
def test_bad_resume_gets_one_clear_line(root, stopped_run, case):
    damage, overrides, words = BAD_RESUMES[case]
    if damage:
        damage(stopped_run / "checkpoints" / "step-00000004")
    before = snapshot(stopped_run)
    code, stderr = train_directly(stopped_run, *(o.format(root=root) for o in overrides))
    assert code == 2, stderr
    assert_one_error_line(stderr, words)
    assert snapshot(stopped_run) == before


@pytest.mark.launch
def test_busy_port_makes_accelerate_pick_another(runs):
    # accelerate launch (one machine) warns and falls back to a free port by itself; the run goes on. The
    # message is accelerate's: the launcher never sees the port.
    port, log = runs["cross_launch"]["port"], runs["cross_launch"]["log"]
    assert f"Port `{port}` is already in use" in log
