"""Fine-tuning a local "pretrained" model on text pairs, with evaluation and the tokenization cache."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.builtin import CLS
from launcher.config import ConfigError, DataConfig, EvalConfig, ModelConfig, load_config
from launcher.data import build_datasets, carve, label_ids
from launcher.evaluate import accuracy, macro_f1
from launcher.models import ByteTokenizer, ModelBundle, build_model
from launcher.tokencache import HIT, MISS, OFF
from tests.helpers import (
    FILLER,
    SPECIAL,
    TOPICS,
    assert_one_error_line,
    pair_rows,
    read_run,
    rel_l2,
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
        "data.num_samples=0",
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
    one = read_run(run_ok(tmp, 1, "one", *common))
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


def test_carve_is_seeded_and_disjoint():
    train, held = carve(50, 0.2, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(50))
    assert train == sorted(train) and held == sorted(held)
    assert carve(50, 0.2, seed=3) == (train, held)
    assert carve(50, 0.2, seed=4)[1] != held


def test_byte_tokenizer_pair_encoding():
    tok = ByteTokenizer()
    encoded = tok.encode(["ab", "xyz"], ["c", "uvw"], max_length=6)
    bos = tok.bos_token_id
    assert encoded["input_ids"] == [[bos, 97, 98, bos, 99], [bos, 120, 121, 122, bos, 117]]
    assert tok.encode(["ab"], None, max_length=8)["input_ids"] == [[bos, 97, 98]]


def test_hf_pair_encoding_carries_segment_ids(tmp_path):
    save_tiny_pretrained_bert(tmp_path / "bert")
    bundle = build_model(ModelConfig(name=f"hf:{tmp_path / 'bert'}"), 64, torch.float32)
    encoded = bundle.encode(["the apple", "a river"], ["old apple", "red castle near"], 7)
    vocab = {word: i for i, word in enumerate(SPECIAL + TOPICS + FILLER)}
    ids = [vocab[w] for w in "[CLS] the apple [SEP] old apple [SEP]".split()]
    assert encoded["input_ids"][0] == ids
    assert encoded["token_type_ids"][0] == [0, 0, 0, 0, 1, 1, 1]  # segment 0: the first text, 1: the second
    assert len(encoded["input_ids"][1]) == 7  # truncated from 8
    assert bundle.encode(["a"], None, 8).get("token_type_ids") is None


def byte_bundle() -> ModelBundle:
    """What the datasets need of a classifier with the built-in byte tokenizer (no model)."""
    tok = ByteTokenizer()
    return ModelBundle(None, CLS, tok.vocab_size, tok.pad_token_id, tok.encode, tok.fingerprint)


def test_string_labels_map_alike_in_train_and_eval(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,no\nb,yes\nc,maybe\n")
    (tmp_path / "eval.csv").write_text("text,label\nd,yes\ne,yes\n")
    data = DataConfig(name=str(tmp_path / "train.csv"), num_samples=0, cache_dir="none")
    sets = build_datasets(data, EvalConfig(file=str(tmp_path / "eval.csv")), byte_bundle(), 0, 3)
    assert sets.info["label_names"] == ["maybe", "no", "yes"]
    assert sets.train.labels == [1, 2, 0] and sets.eval.labels == [2, 2]
    assert sets.info["tokenized_cache"] == OFF
    assert label_ids([[1, 0], [1]]) == ([[1, 0], [1]], None)


def test_fraction_carves_synthetic_and_file_data(tmp_path):
    data = DataConfig(name="synthetic-cls", num_samples=40)
    sets = build_datasets(data, EvalConfig(fraction=0.25, num_samples=7), byte_bundle(), 0, 2)
    assert (len(sets.train), len(sets.eval)) == (30, 7)
    assert sets.info["tokenized_cache"] == OFF
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    data = DataConfig(name=str(tmp_path / "t.csv"), num_samples=12, cache_dir=str(tmp_path / "cache"))
    sets = build_datasets(data, EvalConfig(fraction=0.2), byte_bundle(), 0, 2)
    # 4 rows carved out of all 20; data.num_samples caps the 16 left.
    assert (len(sets.train), len(sets.eval), sets.info["tokenized_cache"]) == (12, 4, MISS)
    eval_texts = {bytes(e[1:]).decode() for e in sets.eval.examples}
    assert not eval_texts & {bytes(e[1:]).decode() for e in sets.train.examples}
    again = build_datasets(data, EvalConfig(fraction=0.2), byte_bundle(), 0, 2)
    assert again.info["tokenized_cache"] == HIT and again.train.examples == sets.train.examples


def test_changed_file_misses_the_cache(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\nab,0\ncd,1\n")
    data = DataConfig(name=str(csv), cache_dir=str(tmp_path / "cache"))
    assert build_datasets(data, EvalConfig(), byte_bundle(), 0, 2).info["tokenized_cache"] == MISS
    csv.write_text("text,label\nab,0\nce,1\n")  # same size: the mtime_ns tells
    changed = build_datasets(data, EvalConfig(), byte_bundle(), 0, 2)
    assert changed.info["tokenized_cache"] == MISS and changed.train.examples[1][1:] == list(b"ce")


@pytest.mark.parametrize(
    ("data_name", "evaluation", "words"),
    [
        ("synthetic-cls", EvalConfig(split="validation"), ("eval.split='validation'", "generated", "eval.fraction")),
        ("file", EvalConfig(split="validation"), ("eval.split='validation'", "is a file", "eval.file")),
        ("synthetic-cls", EvalConfig(fraction=0.01), ("eval.fraction=0.01", "empty eval set")),
    ],
)
def test_eval_source_errors(tmp_path, data_name, evaluation, words):
    if data_name == "file":
        data_name = str(tmp_path / "t.csv")
        (tmp_path / "t.csv").write_text("text,label\nab,0\n")
    with pytest.raises(ConfigError) as err:
        build_datasets(DataConfig(name=data_name, num_samples=20), evaluation, byte_bundle(), 0, 2)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
