"""Bad input: one clear line naming the key and value, exit code non-zero, no traceback, nothing lost.

The error paths run the trainer's own ``main()`` in this process; two launches check what only a real
process shows: the exit code of ``python launcher/train.py``, and the one line under a 2-process launch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.launch import REPO, launch_env
from tests.helpers import TINY_LM, TRAIN, assert_one_error_line, launch, train_in_process

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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_line(tmp_path, case):
    overrides, words = CASES[case]
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", *overrides)
    assert code == 2
    assert_one_error_line(stderr, words)
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
    code, stderr = train_in_process(
        f"run.output_dir={tmp_path / 'out'}", "model.name=tiny-bert", f"data.name={csv}", *overrides
    )
    assert code == 2
    assert_one_error_line(stderr, words)


def test_missing_config_file(tmp_path):
    code, stderr = train_in_process(config="configs/runs/nope.yaml")
    assert code == 2
    assert_one_error_line(stderr, ("configs/runs/nope.yaml", "no such file"))


def test_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "done"
    assert train_in_process(f"run.output_dir={out}", "run.max_steps=2")[0] == 0
    # Every file, the final checkpoint's included.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stderr = train_in_process(f"run.output_dir={out}", "run.max_steps=3")
    assert code == 2
    assert_one_error_line(stderr, ("run.output_dir", "already holds a run", "run.overwrite=true"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_half_set_launch_environment(tmp_path, monkeypatch):
    # WORLD_SIZE without the rest of a launcher's environment: refuse in one line instead of training alone.
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}")
    assert code == 2
    assert_one_error_line(stderr, ("WORLD_SIZE=2", "MASTER_ADDR"))


@pytest.mark.launch
def test_the_process_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, TRAIN, "--config", TINY_LM, f"run.output_dir={tmp_path / 'out'}", "optim.lr=-1"],
        cwd=REPO,
        env=launch_env(tmp_path / "tmp"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, ("optim.lr=-1.0", ">= 0"))


@pytest.mark.launch
def test_error_under_a_two_process_launch(tmp_path):
    # Rank 0 reads the file first and fails while rank 1 waits for it; the launcher then stops rank 1. The one
    # line comes from rank 0, and rank 1 says nothing of a checkpoint: it was never training. `accelerate
    # launch` itself then reports the failed child, which is the launcher's own output, not ours.
    csv = tmp_path / "train.csv"
    csv.write_text("review,label\ngood,1\nbad,0\n")
    outcome = launch(tmp_path, 2, f"run.output_dir={tmp_path / 'out'}", "model.name=tiny-bert", f"data.name={csv}")
    assert outcome.returncode not in (0, None)
    assert outcome.error_lines() == [f"data.text_column='text' is not a column of {csv}; columns: review, label"]
    log = outcome.log_text()
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log
    assert "checkpoint" not in log


def test_missing_column_is_a_clear_error(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("review,label\ngood,1\nbad,0\n")
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", "model.name=tiny-bert", f"data.name={csv}")
    assert code == 2
    assert_one_error_line(stderr, ("data.text_column='text'", "columns: review, label"))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", f"model.name=hf:{tmp_path}/absent")
    assert code == 2
    assert_one_error_line(stderr, ("model.name", "absent", "no such folder"))
