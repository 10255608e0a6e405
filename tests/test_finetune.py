"""Fine-tuning a local "pretrained" model on text pairs, with evaluation and the tokenization cache."""

from __future__ import annotations

import json

import pytest

from launcher.config import load_config
from launcher.data.store import HIT, MISS
from launcher.evaluate import accuracy, macro_f1
from tests.helpers import (
    assert_one_error_line,
    pair_rows,
    read_run,
    rel_l2,
    run_here,
    run_ok,
    save_tiny_pretrained_bert,
    train_in_process,
)

EVAL_ROWS = 37  # not a multiple of 2 processes x eval batch 4: a duplicated or dropped sample would show


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The same fine-tuning under 1 process (K=4) and 2 processes (K=2), sharing one tokenization cache."""
    tmp = tmp_path_factory.mktemp("finetune")
    save_tiny_pretrained_bert(tmp / "bert")
    (tmp / "train.csv").write_text("\n".join(pair_rows(120, seed=1)) + "\n")
    (tmp / "eval.csv").write_text("\n".join(pair_rows(EVAL_ROWS, seed=2)) + "\n")
    common = (
        f"model.name=hf:{tmp / 'bert'}",
        f"data.name={tmp / 'train.csv'}",
        "data.text_column=sentence1",
        "data.text_pair_column=sentence2",
        "data.seq_len=24",
        f"data.cache_dir={tmp / 'cache'}",
        f"eval.file={tmp / 'eval.csv'}",
        "eval.batch_size=4",
        "run.dtype=float64",
        "run.max_steps=5",
        "model.dropout=0",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=2",
        "optim.lr=0.001",
    )
    # The 1-process run fills the cache (a miss), so the 2-process run must hit it.
    one = read_run(run_here(tmp, "one", *common))  # in this process
    two = read_run(run_ok(tmp, 2, "two", *common))
    return one, two


@pytest.mark.launch
def test_eval_counts_every_sample_once(finetuned):
    for run in finetuned:
        result = run.summary.eval
        assert result["num_samples"] == EVAL_ROWS
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
        assert result["step"] == 5 and result["loss"] > 0
        assert run.summary.data.train_samples == 120 and run.summary.data.eval_samples == EVAL_ROWS
        assert run.summary.data.label_names == ["no", "yes"]
        # every_steps=0: evaluated after the last step only, on that step's metrics line.
        assert [m.step for m in run.metrics if m.eval] == [5]
        assert run.metrics[-1].eval == result


@pytest.mark.launch
def test_one_and_two_processes_agree(finetuned):
    one, two = finetuned
    assert (one.summary.accum_steps, two.summary.accum_steps) == (4, 2)
    assert one.summary.eval["accuracy"] == two.summary.eval["accuracy"]
    assert one.summary.eval["loss"] == pytest.approx(two.summary.eval["loss"], rel=1e-9)
    assert rel_l2(two.weights, one.weights) < 1e-10


@pytest.mark.launch
def test_second_run_hits_the_tokenization_cache(finetuned):
    one, two = finetuned
    assert one.summary.data.tokenized_cache == MISS
    assert two.summary.data.tokenized_cache == HIT


def test_unknown_architecture_is_one_line(tmp_path):
    folder = tmp_path / "strange"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuch"]}))
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", f"model.name=hf:{folder}")
    assert code == 2
    assert_one_error_line(stderr, ("model.name=", "strange", "'no-such-arch'", "does not know"))


def test_mrpc_template_loads_and_validates():
    cfg = load_config("configs/runs/mrpc_bert.yaml")
    assert cfg.model.name == "hf:bert-base-uncased" and cfg.data.name == "hf:nyu-mll/glue"
    assert (cfg.data.subset, cfg.data.text_column, cfg.data.text_pair_column) == ("mrpc", "sentence1", "sentence2")
    assert cfg.eval.split == "validation" and cfg.batch.global_batch_size == 20
    assert (cfg.optim.lr, cfg.model.dropout) == (2e-5, 0.1)


# ----------------------------------------------------------------------------------------- pure functions


def test_macro_f1_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 1, 1]  # class 2 is never predicted
    # class 0: tp 2, fp 0, fn 1 -> 4/5; class 1: tp 2, fp 2, fn 0 -> 4/6; class 2: tp 0, fn 1 -> 0
    assert macro_f1(labels, predictions) == pytest.approx((4 / 5 + 4 / 6 + 0) / 3)
    assert accuracy(labels, predictions) == pytest.approx(4 / 6)
    # A class only predicted (never a label) counts too, as scikit-learn counts it.
    assert macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)
