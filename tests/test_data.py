"""The data layer without launches: sources, the token store, the sample order, collate, and every bad input's
one line."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from launcher.batching import SampleOrder
from launcher.builtin import CLS, LM
from launcher.config import ConfigError, DataConfig, EvalConfig, ModelConfig
from launcher.data import build_datasets
from launcher.data.build import carve, label_ids
from launcher.data.store import HIT, MISS, OFF
from launcher.models import ByteTokenizer, ModelSpec, build_model, model_spec
from tests.helpers import FILLER, SPECIAL, TOPICS, save_tiny_pretrained_bert, save_tiny_pretrained_lm, write_jsonl


def byte_spec(task: str | None = CLS) -> ModelSpec:
    """What the datasets need of a model with the built-in byte tokenizer (no weights)."""
    return ModelSpec(ModelConfig(name="tiny-bert" if task == CLS else "tiny-gpt2"), task, ByteTokenizer().spec())


def build(data: DataConfig, evaluation: EvalConfig | None = None, spec: ModelSpec | None = None, **model):
    return build_datasets(data, evaluation or EvalConfig(), ModelConfig(**model), spec or byte_spec(), 0)


def texts(dataset) -> list[str]:
    """The rows of a byte-tokenized set as text (without the bos id)."""
    return [
        bytes(dataset.tokens[s + 1 : s + n].tolist()).decode()
        for s, n in zip(dataset.starts, dataset.lengths, strict=True)
    ]


def test_carve_is_seeded_and_disjoint():
    train, held = carve(50, 0.2, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and sorted([*train, *held]) == list(range(50))
    assert list(train) == sorted(train) and list(held) == sorted(held)
    assert all((a == b).all() for a, b in zip(carve(50, 0.2, seed=3), (train, held), strict=True))
    assert list(carve(50, 0.2, seed=4)[1]) != list(held)


@pytest.mark.parametrize("num_samples", [1, 2, 7, 40, 1000])
def test_the_order_is_a_permutation_per_epoch(num_samples):
    order = SampleOrder(num_samples, 7, seed=3)
    epochs = [
        np.concatenate([order.window(e * order.steps_per_epoch + s) for s in range(order.steps_per_epoch)])
        for e in range(2)
    ]
    assert all(sorted(epoch.tolist()) == list(range(num_samples)) for epoch in epochs)
    if num_samples > 2:
        assert epochs[0].tolist() != epochs[1].tolist()
    assert SampleOrder(num_samples, 7, seed=3).window(1).tolist() == order.window(1).tolist()  # a pure function


def test_byte_tokenizer_pair_encoding():
    tok = ByteTokenizer()
    encoded = tok.encode(["ab", "xyz"], ["c", "uvw"], max_length=6)
    bos = tok.bos_token_id
    rows = np.split(encoded.tokens, encoded.offsets[1:-1])
    assert [r.tolist() for r in rows] == [[bos, 97, 98, bos, 99], [bos, 120, 121, 122, bos, 117]]
    assert encoded.truncated == 1  # the second pair held 8 tokens
    assert tok.encode(["ab"], None, max_length=8).tokens.tolist() == [bos, 97, 98]


def test_hf_pair_encoding_carries_segment_ids_and_counts_truncation(tmp_path):
    save_tiny_pretrained_bert(tmp_path / "bert")
    tokenizer = model_spec(ModelConfig(name=f"hf:{tmp_path / 'bert'}")).tokenizer
    encoded = tokenizer.encode(["the apple", "a river"], ["old apple", "red castle near"], 7)
    vocab = {word: i for i, word in enumerate(SPECIAL + TOPICS + FILLER)}
    ids = [vocab[w] for w in "[CLS] the apple [SEP] old apple [SEP]".split()]
    assert encoded.tokens[: encoded.offsets[1]].tolist() == ids
    assert encoded.segments[: encoded.offsets[1]].tolist() == [0, 0, 0, 0, 1, 1, 1]  # 0: the first text, 1: the second
    assert int(encoded.offsets[2] - encoded.offsets[1]) == 7 and encoded.truncated == 1  # cut from 8
    assert tokenizer.encode(["a"], None, 8).segments is None


def test_string_labels_map_alike_in_train_and_eval(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,no\nb,yes\nc,maybe\n")
    (tmp_path / "eval.csv").write_text("text,label\nd,yes\ne,yes\n")
    data = DataConfig(name=str(tmp_path / "train.csv"), cache_dir="none")
    sets = build(data, EvalConfig(file=str(tmp_path / "eval.csv")))
    assert sets.info["label_names"] == ["maybe", "no", "yes"]
    assert sets.train.labels.tolist() == [1, 2, 0] and sets.eval.labels.tolist() == [2, 2]
    assert (sets.info["tokenized_cache"], sets.num_labels) == (OFF, 3)  # the classes come from the data
    ids, names = label_ids([[1, 0], [1]])
    assert [a.tolist() for a in ids] == [[1, 0], [1]] and names is None


def test_fraction_carves_synthetic_and_file_data(tmp_path):
    sets = build(DataConfig(name="synthetic-cls", num_samples=40), EvalConfig(fraction=0.25, num_samples=7))
    assert (len(sets.train), len(sets.eval), sets.info["tokenized_cache"]) == (30, 7, OFF)
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    data = DataConfig(name=str(tmp_path / "t.csv"), max_rows=12, cache_dir=str(tmp_path / "cache"))
    sets = build(data, EvalConfig(fraction=0.2))
    # 4 rows carved out of all 20; data.max_rows caps the 16 left.
    assert (len(sets.train), len(sets.eval), sets.info["tokenized_cache"]) == (12, 4, MISS)
    assert (sets.info["source_rows"], sets.info["rows_used"]) == (20, 12)
    assert not set(texts(sets.eval)) & set(texts(sets.train))
    again = build(data, EvalConfig(fraction=0.2))
    assert again.info["tokenized_cache"] == HIT and texts(again.train) == texts(sets.train)


def test_changed_file_misses_the_cache(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\nab,0\ncd,1\n")
    data = DataConfig(name=str(csv), cache_dir=str(tmp_path / "cache"))
    assert build(data).info["tokenized_cache"] == MISS
    csv.write_text("text,label\nab,0\nce,1\n")  # same size: the mtime_ns tells
    changed = build(data)
    assert changed.info["tokenized_cache"] == MISS and texts(changed.train)[1] == "ce"


def test_the_store_is_mapped_in_the_smallest_type(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    sets = build(DataConfig(name=str(tmp_path / "t.csv"), cache_dir=str(tmp_path / "cache")))
    assert isinstance(sets.train.tokens, np.memmap) and sets.train.tokens.dtype == np.uint16
    (store,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in store.iterdir()) == ["labels.npy", "offsets.npy", "store.json", "tokens.npy"]


def test_a_txt_file_is_one_document_per_line_or_paragraph(tmp_path):
    (tmp_path / "notes.txt").write_text("first line\nsecond line\n\nthird, after a blank line\n")
    lines = build(DataConfig(name=str(tmp_path / "notes.txt"), cache_dir="none"), spec=byte_spec(None))
    assert lines.task == LM and texts(lines.train) == ["first line", "second line", "third, after a blank line"]
    paragraphs = build(
        DataConfig(name=str(tmp_path / "notes.txt"), cache_dir="none", txt_documents="paragraph"), spec=byte_spec(None)
    )
    assert len(paragraphs.train) == 2


def test_the_task_comes_from_the_data_for_a_base_model(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nab,0\ncd,1\nef,2\n")
    sets = build(DataConfig(name=str(tmp_path / "t.csv"), cache_dir="none"), spec=byte_spec(None))
    assert (sets.task, sets.num_labels) == (CLS, 3)
    (tmp_path / "u.csv").write_text("text\nabc\ndef\n")
    assert build(DataConfig(name=str(tmp_path / "u.csv"), cache_dir="none"), spec=byte_spec(None)).task == LM


def test_packing_joins_documents_into_blocks(tmp_path):
    (tmp_path / "docs.txt").write_text("".join(f"document {i}\n" for i in range(30)))
    sets = build(
        DataConfig(name=str(tmp_path / "docs.txt"), cache_dir="none", packing=True, seq_len=8), spec=byte_spec(LM)
    )
    stream = sum(1 + len(f"document {i}") + 1 for i in range(30))  # bos, the text, and eos after each document
    assert sets.layout == "blocks" and len(sets.train) == (stream - 1) // 8
    batch = sets.train.collate([0, 1], 2, 0)
    assert batch["input_ids"].shape == (2, 9) and bool(batch["attention_mask"].all())
    assert batch["input_ids"][0, -1] == batch["input_ids"][1, 0]  # blocks overlap by the one target
    # The generated documents pack the same way (every step the same work: the benchmark's data).
    rows = build(DataConfig(name="synthetic-lm", num_samples=40, seq_len=16), spec=byte_spec(LM)).train
    packed = build(DataConfig(name="synthetic-lm", num_samples=40, seq_len=16, packing=True), spec=byte_spec(LM))
    assert packed.layout == "blocks" and len(packed.train) == (len(rows.tokens) - 1) // 16
    assert packed.train.collate([0, 1], 2, 0)["input_ids"].shape == (2, 17)
    with pytest.raises(ConfigError, match="data.packing=true packs documents for a language model"):
        build(DataConfig(name="synthetic-cls", packing=True))


def write_bin(path, tokens) -> None:
    np.asarray(tokens, dtype=np.uint16).tofile(path)


def test_a_flat_token_file_is_read_in_blocks(tmp_path):
    write_bin(tmp_path / "train.bin", np.arange(100) % 250)
    sets = build(DataConfig(name=str(tmp_path / "train.bin"), seq_len=8, cache_dir="none"), spec=byte_spec(LM))
    assert (sets.task, sets.layout, len(sets.train)) == (LM, "blocks", 99 // 8)
    assert sets.train.items([0, 1], LM) == 16  # seq_len targets per block
    assert sets.train.collate([2], 1, 0)["input_ids"][0].tolist() == list(range(16, 25))


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x01\x00\x02", ("3 bytes, an odd number", "uint16")),
        (b"", ("is empty",)),
        (np.asarray([5, 300], dtype=np.uint16).tobytes(), ("token id 300", "258 ids")),
    ],
    ids=["odd_size", "empty", "id_above_vocabulary"],
)
def test_bad_token_files_get_one_line(tmp_path, content, words):
    (tmp_path / "train.bin").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        build(DataConfig(name=str(tmp_path / "train.bin"), seq_len=4, cache_dir="none"), spec=byte_spec(LM))
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_a_store_written_by_another_tokenizer_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nab,0\ncd,1\n")
    build(DataConfig(name=str(tmp_path / "t.csv"), cache_dir=str(tmp_path / "cache")))
    (store,) = (tmp_path / "cache").iterdir()
    save_tiny_pretrained_bert(tmp_path / "bert")
    other = model_spec(ModelConfig(name=f"hf:{tmp_path / 'bert'}"))
    with pytest.raises(ConfigError, match="written by another tokenizer"):
        build(DataConfig(name=str(store)), spec=other)
    assert len(build(DataConfig(name=str(store))).train) == 2  # the tokenizer that wrote it reads it


def test_a_full_disk_keeps_the_cache_intact(tmp_path, monkeypatch):
    (tmp_path / "t.csv").write_text("text,label\nab,0\ncd,1\n")
    data = DataConfig(name=str(tmp_path / "t.csv"), cache_dir=str(tmp_path / "cache"))
    real_save = np.save

    def no_space(path, array):
        real_save(path, array)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(ConfigError) as err:
        build(data)
    assert "data.cache_dir=" in str(err.value) and "bytes free" in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []  # the half-written store is gone


@pytest.mark.parametrize(
    ("data_name", "evaluation", "words"),
    [
        ("synthetic-cls", EvalConfig(split="validation"), ("eval.split='validation'", "generated", "eval.fraction")),
        ("file", EvalConfig(split="validation"), ("eval.split='validation'", "is a file", "eval.file")),
        ("synthetic-cls", EvalConfig(fraction=0.01), ("eval.fraction=0.01", "empty eval set")),
        ("file.tsv", EvalConfig(), ("data.name=", ".tsv", "is not known", ".csv")),
        ("file", EvalConfig(file="/nonexistent/eval.csv"), ("eval.file='/nonexistent/eval.csv'", "no such file")),
    ],
)
def test_eval_source_errors(tmp_path, data_name, evaluation, words):
    if data_name.startswith("file"):
        data_name = str(tmp_path / data_name.replace("file", "t").replace("t.tsv", "t.tsv"))
        (tmp_path / "t.csv").write_text("text,label\nab,0\n")
        data_name = data_name if data_name.endswith(".tsv") else str(tmp_path / "t.csv")
    with pytest.raises(ConfigError) as err:
        build(DataConfig(name=data_name, num_samples=20), evaluation)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_labels_outside_num_labels_are_refused_before_a_model_loads(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nab,0\ncd,2\n")
    with pytest.raises(ConfigError) as err:
        build(DataConfig(name=str(tmp_path / "t.csv"), cache_dir="none"), num_labels=2)
    assert "label 2 outside [0, 2)" in str(err.value) and "model.num_labels" in str(err.value)


def test_a_jsonl_file_reads_its_text_column(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"body": f"line {i}"} for i in range(5)])
    sets = build(DataConfig(name=str(tmp_path / "t.jsonl"), text_column="body", cache_dir="none"), spec=byte_spec(LM))
    assert texts(sets.train) == [f"line {i}" for i in range(5)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "mlp-bn", "hf:local"])
def test_dropout_sets_every_dropout(tmp_path, name):
    if name == "hf:local":
        save_tiny_pretrained_lm(tmp_path / "lm")
        name = f"hf:{tmp_path / 'lm'}"
    spec = model_spec(ModelConfig(name=name, dropout=0.3))
    model = build_model(spec, spec.task, 2, max_positions=16, dtype=torch.float32)
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.3 for p in dropouts)
    if spec.hf_config is not None:  # and in the config a pretrained model saves
        probs = {k: v for k, v in vars(model.config).items() if isinstance(v, float) and "drop" in k}
        assert probs and all(v == 0.3 for v in probs.values()), probs
