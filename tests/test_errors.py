"""Bad input: one clear line naming the key and value, exit code non-zero, no traceback, nothing lost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.launch import launch_env
from tests.conftest import REPO, TINY_LM, TRAIN, launch, run_ok

CASES = {
    # overrides: words the one error line must contain
    "non_divisible": (
        ("batch.global_batch_size=10", "batch.micro_batch_size=4"),
        ("batch.global_batch_size=10", "not divisible", "batch.micro_batch_size=4"),
    ),
    "unknown_key": (("optim.learning_rate=0.1",), ("optim.learning_rate", "unknown key", "lr")),
    "unknown_section": (("trainer.steps=3",), ("trainer", "unknown key")),
    "wrong_type": (("run.max_steps=ten",), ("run.max_steps", "'ten'", "int")),
    "missing_file": (
        ("model.name=tiny-bert", "data.name=/nonexistent/train.csv"),
        ("data.name", "/nonexistent/train.csv", "no such file"),
    ),
    "hub_dataset_offline": (
        ("model.name=tiny-bert", "data.name=hf:nobody/no-such-dataset"),
        ("data.name='hf:nobody/no-such-dataset'", "could not be loaded"),
    ),
    "negative_lr": (("optim.lr=-0.1",), ("optim.lr", "-0.1", ">= 0")),
    "bad_choice": (("batch.sync=sometimes",), ("batch.sync", "sometimes", "no_sync, every_step")),
    "two_of_three": (("batch.global_batch_size=null", "batch.accum_steps=null"), ("set two of",)),
}


def train_directly(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, TRAIN, "--config", TINY_LM, f"run.output_dir={tmp_path / 'out'}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(tmp_path / "tmp"), capture_output=True, text=True, timeout=120)


def assert_one_clear_line(proc: subprocess.CompletedProcess, words: tuple[str, ...]) -> None:
    assert proc.returncode > 0, proc.returncode
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_line(tmp_path, case):
    overrides, words = CASES[case]
    proc = train_directly(tmp_path, *overrides)
    assert_one_clear_line(proc, words)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# Errors about data files: (overrides, with {csv} for a CSV of columns text,other,label) -> words of the line.
DATA_FILE_CASES = {
    "eval_file_missing": (
        ("eval.file=/nonexistent/eval.csv",),
        ("eval.file='/nonexistent/eval.csv'", "no such file"),
    ),
    "pair_column_missing": (
        ("data.text_pair_column=sentence2",),
        ("data.text_pair_column='sentence2'", "not a column", "columns: text, other, label"),
    ),
}


@pytest.mark.parametrize("case", sorted(DATA_FILE_CASES))
def test_bad_data_file_input_gets_one_clear_line(tmp_path, case):
    csv = tmp_path / "train.csv"
    csv.write_text("text,other,label\ngood,x,1\nbad,y,0\n")
    overrides, words = DATA_FILE_CASES[case]
    proc = train_directly(tmp_path, "model.name=tiny-bert", f"data.name={csv}", *overrides)
    assert_one_clear_line(proc, words)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, TRAIN, "--config", "configs/runs/nope.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_clear_line(proc, ("configs/runs/nope.yaml", "no such file"))


def test_error_under_a_two_process_launch(tmp_path):
    # The children print the one line (rank 0 only) and exit non-zero; `accelerate launch` itself
    # then reports the failed child, which is the launcher's own output, not ours.
    proc = launch(tmp_path, 2, f"run.output_dir={tmp_path / 'out'}", "optim.lr=-1")
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert lines == ["error: optim.lr=-1.0 is not valid: must be >= 0"]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_finished_run_is_not_overwritten(tmp_path):
    out = run_ok(tmp_path, 1, "done", "run.max_steps=2")
    # Every file, the final checkpoint's included.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = train_directly(tmp_path, f"run.output_dir={out}", "run.max_steps=3")
    assert_one_clear_line(proc, ("run.output_dir", "already holds a run", "run.overwrite=true"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_half_set_launch_environment(tmp_path):
    # WORLD_SIZE without the rest of a launcher's environment: refuse in one line instead of training alone.
    env = {**launch_env(tmp_path / "tmp"), "WORLD_SIZE": "2"}
    proc = subprocess.run(
        [sys.executable, TRAIN, "--config", TINY_LM, f"run.output_dir={tmp_path / 'out'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_clear_line(proc, ("WORLD_SIZE=2", "MASTER_ADDR"))
    assert "Traceback" not in proc.stderr
