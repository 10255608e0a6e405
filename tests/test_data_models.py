"""User data and pretrained models from local files, offline; dropout control."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.config import ModelConfig
from launcher.models import build_model, model_spec
from tests.helpers import assert_one_error_line, make_text, read_run, run_ok, save_tiny_pretrained_lm, train_in_process


@pytest.mark.launch
def test_csv_classification_under_two_processes(tmp_path):
    csv = tmp_path / "train.csv"
    rows = ["sentence,sentiment"] + [f"{make_text(i, 3 + i % 9)},{'pos' if i % 2 else 'neg'}" for i in range(48)]
    csv.write_text("\n".join(rows) + "\n")
    out = run_ok(
        tmp_path,
        2,
        "cls",
        "model.name=tiny-bert",
        f"data.name={csv}",
        "data.text_column=sentence",
        "data.label_column=sentiment",
        "run.max_steps=4",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=2",
    )
    run = read_run(out)
    assert run.summary.task == "cls" and run.summary.world_size == 2
    assert run.summary.accum_steps == 2
    # Classification counts samples: every step's items equal its samples.
    assert all(m.items == m.samples == 8 for m in run.metrics)


@pytest.mark.launch
def test_pretrained_local_folder_trains_offline_on_jsonl(tmp_path):
    folder = tmp_path / "tiny-pretrained"
    save_tiny_pretrained_lm(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"body": make_text(i, 4 + i % 11)}) + "\n" for i in range(40)))
    out = run_ok(
        tmp_path,
        1,
        "hf",
        f"model.name=hf:{folder}",
        f"data.name={data}",
        "data.text_column=body",
        "run.max_steps=3",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=4",
    )
    run = read_run(out)
    assert run.summary.task == "lm" and run.summary.accum_steps == 2
    assert len(run.metrics) == 3
    # The saved weights are the pretrained architecture's (a 32-wide GPT-2 block), trained.
    assert run.weights["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)


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


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_dropout_sets_every_dropout(name):
    spec = model_spec(ModelConfig(name=name, dropout=0.3))
    model = build_model(spec, spec.task, 2, max_positions=16, dtype=torch.float32)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.3 for p in dropouts)
    probs = {k: v for k, v in vars(model.config).items() if isinstance(v, float) and "drop" in k}
    assert probs and all(v == 0.3 for v in probs.values()), probs
