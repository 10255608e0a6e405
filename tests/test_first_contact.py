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
    read_run,
    run_ok,
    save_tiny_pretrained_bert,
    save_tiny_pretrained_lm,
    train_in_process,
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


def test_the_time_breakdown_can_be_turned_off(tmp_path):
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", "run.max_steps=2", "run.time_breakdown=none")
    assert code == 0, stderr
    run = RunDir(tmp_path / "out")
    assert [m.time_breakdown for m in run.read_metrics()] == [None, None]
    assert run.read_summary().median_time_breakdown is None


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A BertModel folder (no head) and a CSV of names for labels, fine-tuned on 2 processes."""
    tmp = tmp_path_factory.mktemp("labelled")
    save_tiny_pretrained_bert(tmp / "base", head=False)
    rows = [f"the {COLORS[i % 3]} apple near the river,{COLORS[i % 3]}" for i in range(30)]
    (tmp / "colors.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    out = run_ok(
        tmp,
        2,
        "finetuned",
        f"model.name=hf:{tmp / 'base'}",
        f"data.name={tmp / 'colors.csv'}",
        "data.seq_len=6",
        "run.max_epochs=0",
        "run.max_steps=2",
        "run.final_checkpoint=false",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=2",
        f"data.cache_dir={tmp / 'cache'}",
        config="configs/runs/finetune_cls.yaml",
    )
    return read_run(out), (tmp / "launch.log").read_text(), out


@pytest.mark.launch
def test_a_base_model_on_labelled_rows_becomes_a_classifier(labelled):
    """The task and the three classes come from the data, decided before the model loads."""
    run, log, _ = labelled
    assert run.summary.task == "cls" and run.summary.data.label_names == ["blue", "green", "red"]
    assert run.weights["classifier.weight"].shape == (3, 32)  # a head for the data's three classes
    assert run.summary.data.source_rows == 30 and run.summary.data.rows_used == 27  # eval.fraction=0.1 held out 3
    assert run.summary.data.truncated_rows == 30  # every row is longer than 6 tokens: the plan line says so
    assert "27 of 30 rows used, 30 cut at data.seq_len=6, task=cls with 3 classes" in log


@pytest.mark.launch
def test_a_csv_classifier_trains_under_two_processes(labelled):
    run, _, out = labelled
    assert (run.summary.world_size, run.summary.accum_steps) == (2, 2)
    # Classification counts samples: every step's items equal its samples.
    assert all(m.items == m.samples == 8 for m in run.metrics)
    assert not (out / "checkpoints").exists()  # run.final_checkpoint=false


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A local "pretrained" GPT-2 on a .txt file (one document per line), stopped after step 3 and resumed,
    logging to TensorBoard, for 1.5 epochs."""
    tmp = tmp_path_factory.mktemp("text")
    save_tiny_pretrained_lm(tmp / "gpt2")
    (tmp / "notes.txt").write_text("".join(make_text(i, 3 + i % 7) + "\n" for i in range(50)))
    common = (
        f"model.name=hf:{tmp / 'gpt2'}",
        f"data.name={tmp / 'notes.txt'}",
        "data.cache_dir=none",
        "run.log_with=tensorboard",
        "run.max_epochs=1.5",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=4",
        "batch.accum_steps=null",
    )
    out = run_ok(tmp, 1, "text", *common, "run.stop_at_step=3")
    stopped = {"log": (tmp / "launch.log").read_text(), "summary": (out / "summary.json").exists()}
    run_ok(tmp, 1, "text", *common, "run.resume=auto")
    return out, read_run(out), stopped


@pytest.mark.launch
def test_own_text_trains_a_local_pretrained_lm(text):
    """Every line is a document and every line is used: tiny_lm.yaml's data.num_samples sizes synthetic sets."""
    _, run, stopped = text
    assert "50 of 50 rows used" in stopped["log"]
    assert run.summary.task == "lm" and run.summary.accum_steps == 2 and run.summary.data.rows_used == 50
    # The saved weights are the pretrained architecture's (a 32-wide GPT-2 block), trained.
    assert run.weights["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)


@pytest.mark.launch
def test_a_planned_stop_says_where_its_checkpoint_is(text):
    out, run, stopped = text
    line = f"stopped after step 3; checkpoint {out / 'checkpoints' / 'step-00000003'}; resume with run.resume=auto"
    assert line in stopped["log"]
    assert not stopped["summary"]  # a planned stop: the run is not finished


@pytest.mark.launch
def test_tensorboard_gets_every_step_across_a_resume(text):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, run, _ = text
    # 50 rows / 8 per step = 7 steps per epoch; 1.5 epochs -> 11 steps; stopped after 3, then resumed.
    assert run.summary.max_steps == 11 and run.summary.resumed_from_step == 3
    assert run.summary.epochs == pytest.approx((50 + 4 * 8) / 50)  # a whole epoch (its last window short), 4 steps
    assert [m.step for m in run.metrics] == list(range(1, 12))
    events = EventAccumulator(str(out / "logs" / "accum-launcher"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(loss) == list(range(1, 12))  # both sessions' event files
    assert [loss[m.step] for m in run.metrics] == pytest.approx(run.losses, rel=1e-6)
    assert {"lr", "grad_norm", "step_time_s"} <= set(events.Tags()["scalars"])


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
