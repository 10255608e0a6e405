"""What a newcomer meets first: the bare command, --help, a base model on their own labelled file, their own
text for a language model, a planned stop, the inputs checked before a comparison launches, the report when
the reference fails, and results every user can read."""

from __future__ import annotations

import contextlib
import io
import json
import stat
import sys
from pathlib import Path

import pytest

from launcher.config import Config, flatten
from launcher.files import umask
from launcher.launch import TRAIN_SCRIPT, Job, launch_env
from launcher.rundir import RunDir
from tests.helpers import (
    assert_one_error_line,
    compare_in_process,
    compared,
    make_text,
    run_ok,
    save_tiny_pretrained_bert,
    write_compare_config,
)

COLORS = ["red", "green", "blue"]


@pytest.mark.launch
def test_the_bare_command_trains_the_embedded_default(tmp_path):
    """`accelerate launch launcher/train.py`, nothing else, from a folder of the user's."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", str(TRAIN_SCRIPT)]
    outcome = Job([command], [tmp_path / "bare.log"], launch_env(tmp_path / "tmp"), cwd=tmp_path).start().wait(300)
    assert outcome.ok, outcome.log_text()[-3000:]
    out = RunDir(tmp_path / "runs" / "default")
    summary = out.read_summary()
    assert (summary.global_batch_size, summary.micro_batch_size, summary.steps, summary.task) == (16, 4, 20, "lm")
    # Results are written with the umask's mode, like any other file: readable by the other users of a cluster.
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        mode = stat.S_IMODE((out.path / name).stat().st_mode)
        assert mode == 0o666 & ~umask(), (name, oct(mode))


def test_help_lists_every_config_key(capsys):
    from launcher.train import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for key in flatten(Config().to_dict()):
        assert f"  {key}: " in text, key
    assert "{no_sync,every_step} = 'no_sync'" in text  # choices and the default


def test_print_config_resolves_without_training(tmp_path):
    from launcher.train import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["--print-config", "batch.micro_batch_size=2", f"run.output_dir={tmp_path / 'out'}"]) == 0
    assert "micro_batch_size: 2" in stdout.getvalue() and "accum_steps=8 = global_batch_size=16" in stdout.getvalue()
    assert not (tmp_path / "out").exists()


@pytest.mark.launch
def test_a_base_model_on_labelled_rows_becomes_a_classifier(tmp_path):
    """A BertModel folder (no head) and a CSV of names for labels: the task and the three classes come from the
    data, decided before the model loads; nothing beyond the final weights is written when asked."""
    save_tiny_pretrained_bert(tmp_path / "base", head=False)
    rows = [f"the {COLORS[i % 3]} apple near the river,{COLORS[i % 3]}" for i in range(30)]
    (tmp_path / "colors.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    out = run_ok(
        tmp_path,
        1,
        "finetuned",
        f"model.name=hf:{tmp_path / 'base'}",
        f"data.name={tmp_path / 'colors.csv'}",
        "data.seq_len=6",
        "run.max_epochs=0",
        "run.max_steps=2",
        "run.final_checkpoint=false",
        f"data.cache_dir={tmp_path / 'cache'}",
        config="configs/runs/finetune_cls.yaml",
    )
    summary = RunDir(out).read_summary()
    assert summary.task == "cls" and summary.data.label_names == ["blue", "green", "red"]
    assert summary.data.source_rows == 30 and summary.data.rows_used == 27  # eval.fraction=0.1 held out 3
    assert summary.data.truncated_rows == 30  # every row is longer than 6 tokens: the plan line says so
    assert (
        "27 of 30 rows used, 30 cut at data.seq_len=6, task=cls with 3 classes" in (tmp_path / "launch.log").read_text()
    )
    assert not (out / "checkpoints").exists()  # run.final_checkpoint=false


@pytest.mark.launch
def test_own_text_for_a_language_model_and_a_planned_stop(tmp_path):
    """A .txt file, one document per line, every line used; a planned stop says where its checkpoint is."""
    (tmp_path / "notes.txt").write_text("".join(make_text(i, 3 + i % 7) + "\n" for i in range(50)))
    common = ("model.name=tiny-gpt2", f"data.name={tmp_path / 'notes.txt'}", "data.cache_dir=none", "run.max_steps=4")
    out = run_ok(tmp_path, 1, "text", *common, "run.stop_at_step=2")
    log = (tmp_path / "launch.log").read_text()
    assert (
        f"stopped after step 2; checkpoint {out / 'checkpoints' / 'step-00000002'}; resume with run.resume=auto" in log
    )
    assert "50 of 50 rows used" in log  # tiny_lm.yaml's data.num_samples sizes synthetic sets only
    run_ok(tmp_path, 1, "text", *common, "run.resume=auto")
    assert RunDir(out).read_summary().data.rows_used == 50


def test_compare_checks_every_mode_s_inputs_before_launching(tmp_path):
    modes = {
        "a": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 4}},
        "b": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 2, "data.name": str(tmp_path / "t.tsv")}},
    }
    config = write_compare_config(tmp_path, modes, {"batch.global_batch_size": 8, "batch.accum_steps": None})
    code, stderr = compare_in_process("--config", str(config))
    assert code == 2
    assert_one_error_line(stderr, ("mode 'b'", "t.tsv", "is not known", ".csv"))
    (tmp_path / "t.csv").write_text("review\nfine\n")
    code, stderr = compare_in_process("--config", str(config), f"modes.b.overrides.data.name={tmp_path / 't.csv'}")
    assert code == 2
    assert_one_error_line(stderr, ("mode 'b'", "data.text_column='text' is not a column", "columns: review"))
    assert not (tmp_path / "out").exists()  # nothing launched, nothing written


@pytest.mark.launch
def test_the_report_tells_the_truth_when_the_reference_fails(tmp_path):
    modes = {
        "ref": {"num_processes": 1, "overrides": {"run.inject_nan_at_step": 1, "run.on_nonfinite": "stop"}},
        "other": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 2}},
    }
    common = {
        "batch.global_batch_size": 8,
        "batch.micro_batch_size": 4,
        "batch.accum_steps": None,
        "eval.fraction": 0.2,
    }
    found = compared(tmp_path, write_compare_config(tmp_path, modes, common), returncode=1)
    result = found["result"]
    assert result.mode("other").error == "not run: the reference failed"
    report = (found["out"] / "report.md").read_text()
    assert "the reference 'ref' failed: nothing could be judged (exited 3: non-finite loss" in report
    assert "The modes have an eval set, but no mode that has one finished" in report
    assert "optimizer steps per mode" not in report and "30 optimizer steps" in report
    assert "model `tiny-gpt2` on data `synthetic-lm`" in report
    assert "No artists with labels found" not in found["proc"].stderr
    assert json.loads((found["out"] / "compare.json").read_text())["failed"] == ["ref", "other"]
