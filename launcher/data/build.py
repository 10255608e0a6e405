"""The training and eval sets of a run, for the model's tokenizer; the task and the classes when only the data
can tell them. Every process builds the same sets; on each machine the first process tokenizes into the token
store while the others wait, then every process maps it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.builtin import CLS, LM, SYNTHETIC_TASKS
from launcher.config import ConfigError, DataConfig, EvalConfig, ModelConfig
from launcher.data.dataset import TokenDataset, blocks_dataset, rows_dataset
from launcher.data.sources import (
    Source,
    Table,
    check_table,
    eval_source,
    file_source,
    load_table,
    read_store_meta,
    read_token_file,
    text_column,
    train_source,
)
from launcher.data.store import (
    HIT,
    MISS,
    OFF,
    TokenStore,
    cached_store,
    open_store,
    packed_stream,
    resolve_cache_dir,
    store_key,
    token_dtype,
    write_store,
)
from launcher.data.synthetic import synthetic_cls, synthetic_lm
from launcher.files import write_json_atomic
from launcher.models import ENCODE_CHUNK_ROWS, ModelSpec, concatenated
from launcher.terminal import RowProgress

SCAN_CHUNK_TOKENS = 1 << 22  # ids read at a time when a token file is checked against the vocabulary


@dataclass
class Datasets:
    train: TokenDataset
    eval: TokenDataset | None  # None: no eval set configured
    task: str
    num_labels: int  # classes of a classifier (0 for a language model)
    layout: str  # rows (padded per micro-batch) or blocks (seq_len + 1 tokens over a stream)
    info: dict  # summary.json's "data"

    def positions(self, seq_len: int) -> int:
        """The positions a model needs for these samples: a block holds seq_len + 1 tokens."""
        return seq_len + (1 if self.layout == "blocks" else 0)


def carve(num_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows 0..num_rows-1 into (train, eval): a seeded random share ``fraction`` (rounded) goes to eval.
    Disjoint, together every row, each in ascending order; the same seed always carves the same rows."""
    # A stream of its own, so the carve is not the synthetic data's or the sample order's.
    held = np.random.default_rng([seed, 0xEA1]).permutation(num_rows)[: round(num_rows * fraction)]
    mask = np.zeros(num_rows, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def label_ids(values: list[list]) -> tuple[list[np.ndarray], list[str] | None]:
    """Class ids for the label columns of the train and eval sets. Integers are ids already; anything else
    is mapped through ONE name -> id map built from every set (sorted names), so a name has the same id in
    train and eval even when one set lacks a class. Returns the ids per column and the names (or None)."""
    flat = [v for column in values for v in column]
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in flat):
        return [np.asarray(column, dtype=np.int64) for column in values], None
    names = sorted({str(v) for v in flat})
    index = {name: i for i, name in enumerate(names)}
    return [np.asarray([index[str(v)] for v in column], dtype=np.int64) for column in values], names


def _tokenize(
    table: Table, data: DataConfig, spec: ModelSpec, max_length: int | None, labels: bool, progress: bool
) -> TokenStore:
    """Encode the table in chunks, with a progress view on this machine's first process when there are several."""
    started = time.perf_counter()
    texts = [str(t) for t in table.values(text_column(table.source, data))]
    pairs = [str(t) for t in table.values(data.text_pair_column)] if data.text_pair_column else None
    view = RowProgress(table.source.name, len(texts)) if progress and len(texts) > ENCODE_CHUNK_ROWS else None
    parts = []
    for start in range(0, len(texts), ENCODE_CHUNK_ROWS):
        end = start + ENCODE_CHUNK_ROWS
        parts.append(spec.tokenizer.encode(texts[start:end], pairs[start:end] if pairs else None, max_length))
        if view is not None:
            view.update(min(end, len(texts)))
    if view is not None:
        view.close()
    encoded = concatenated(parts)
    label_values = table.values(data.label_column) if labels else None
    return TokenStore(
        tokens=encoded.tokens.astype(token_dtype(spec.tokenizer.vocab_size)),
        offsets=encoded.offsets,
        segments=encoded.segments,
        labels=np.asarray(label_values, dtype=object) if label_values is not None else None,
        meta={
            "rows": len(texts),
            "truncated_rows": encoded.truncated,
            "tokens": len(encoded.tokens),
            "tokenize_s": time.perf_counter() - started,
        },
    )


def _store_of(
    source: Source, data: DataConfig, spec: ModelSpec, max_length: int | None, task: str | None, progress: bool
) -> tuple[TokenStore, str]:
    """The token store of a table or hub source: from the cache, or tokenized now (and cached)."""
    if source.kind == "store":
        store = open_store(source.path)
        if store.meta.get("tokenizer") != spec.tokenizer.fingerprint:
            raise ConfigError(
                f"data.name={source.value!r} is a token store written by another tokenizer than model.name="
                f"{spec.cfg.name!r}'s; tokenize the data again with this model (point data.name at the text)"
            )
        return store, HIT
    cache_dir = resolve_cache_dir(data.cache_dir)
    parts = {
        "source": source.identity(),
        "text": text_column(source, data),
        "pair": data.text_pair_column,
        "label": data.label_column if task != LM else "",
        "max_length": max_length,
        "txt_documents": data.txt_documents,
        "tokenizer": spec.tokenizer.fingerprint,
    }
    key = store_key(parts) if source.kind != "hub" else None  # a hub table's key needs its fingerprint
    found = cached_store(cache_dir, key) if key else None
    if found is not None:
        return found, HIT
    table = load_table(source, data)
    has_labels = check_table(table, data, want_labels=task == CLS) and task != LM
    if key is None:
        key = store_key({**parts, "source": table.identity})
        found = cached_store(cache_dir, key)
        if found is not None:
            return found, HIT
    store = _tokenize(table, data, spec, max_length, has_labels, progress)
    store = _with_label_codes(store)
    store.meta.update({"source": table.identity, "tokenizer": spec.tokenizer.fingerprint, "kind": "rows"})
    if cache_dir is None:
        return store, OFF
    return write_store(cache_dir, key, store), MISS


def _with_label_codes(store: TokenStore) -> TokenStore:
    """Integer labels as they are; any other labels as codes into their sorted names (kept in the store)."""
    if store.labels is None:
        return store
    (codes,), names = label_ids([list(store.labels)])
    store.labels = codes
    store.meta["label_names"] = names
    return store


def _labels_of(stores: list[TokenStore]) -> tuple[list[np.ndarray], list[str] | None]:
    """Every set's class ids under one name -> id map: a store keeps string labels as codes into its own sorted
    names, so the train and eval sets are mapped again through the names of both."""
    names = [s.meta.get("label_names") for s in stores]
    if all(group is None for group in names):
        return [s.labels for s in stores], None
    # Each set's labels as names: its own names for string labels, the integers' text otherwise.
    as_names = [
        np.asarray(group)[s.labels] if group else s.labels.astype(str) for s, group in zip(stores, names, strict=True)
    ]
    ids, merged = label_ids([list(column) for column in as_names])
    return ids, merged


def _check_vocab(tokens: np.ndarray, source: Source, spec: ModelSpec, cache_dir: Path | None) -> None:
    """Every id of a token file below the model's vocabulary; read in chunks (a memory map would make the whole
    file resident in this process), the verdict cached beside the stores."""
    record = cache_dir / f"tokens-{store_key(source.identity())}.json" if cache_dir else None
    if record is not None and record.is_file():
        highest = json.loads(record.read_text())["max_id"]
    else:
        highest = 0
        chunk = np.empty(SCAN_CHUNK_TOKENS, dtype=tokens.dtype)  # one buffer, refilled: the scan's only memory
        with open(source.path, "rb", buffering=0) as f:
            f.seek(0 if source.path.suffix == ".bin" else tokens.offset)
            while read := f.readinto(chunk):
                highest = max(highest, int(chunk[: read // chunk.itemsize].max()))
        if record is not None:
            write_json_atomic(record, {"max_id": highest, **source.identity()})
    if highest >= spec.vocab_size:
        raise ConfigError(
            f"data.name={source.value!r} holds token id {highest}, at or above the vocabulary of model.name="
            f"{spec.cfg.name!r} ({spec.vocab_size} ids); use the tokenizer the file was written with"
        )


def _select(
    rows: int, evaluation: EvalConfig, data: DataConfig, seed: int, carve_eval: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Training rows (after eval.fraction's carve and data.max_rows) and the carved eval rows (or None)."""
    train, held = np.arange(rows), None
    if carve_eval and evaluation.fraction:
        train, held = carve(rows, evaluation.fraction, seed)
    if data.max_rows:
        train = train[: data.max_rows]
    return train, held


def resolve_task(spec: ModelSpec, has_labels: bool | None, source: Source) -> str:
    """The model's task, or the data's where the architecture does not say (a base model folder): a label
    column makes it a classifier, text alone a language model."""
    if spec.task is not None:
        return spec.task
    if has_labels is None:
        raise ConfigError(
            f"model.task=auto cannot tell the task of model.name={spec.cfg.name!r} from {source.name}; set "
            "model.task=lm or model.task=cls"
        )
    return CLS if has_labels else LM


def num_classes(model: ModelConfig, labels: list[np.ndarray | None], names: list[str] | None) -> int:
    """model.num_labels, or the classes of the data; a label outside [0, num_labels) is one line, before any
    model is loaded."""
    found = len(names) if names else int(max(int(a.max()) for a in labels if a is not None and len(a))) + 1
    if not model.num_labels:
        return max(found, 2)
    for column in labels:
        bad = column[(column < 0) | (column >= model.num_labels)] if column is not None else []
        if len(bad):
            raise ConfigError(
                f"data.label_column holds label {int(bad[0])} outside [0, {model.num_labels}); set model.num_labels "
                f"to at least {found}, or 0 to take the number of classes from the data"
            )
    return model.num_labels


def build_datasets(
    data: DataConfig, evaluation: EvalConfig, model: ModelConfig, spec: ModelSpec, seed: int, progress: bool = False
) -> Datasets:
    """The training set and the eval set (None when the eval section names none); ``progress``: show the
    tokenization of a large table (each machine's first process)."""
    source = train_source(data)
    held_out = eval_source(data, evaluation, source)
    if source.kind == "synthetic":
        return _synthetic(data, evaluation, model, spec, seed)
    if source.kind == "tokens":
        return _token_file(source, data, evaluation, spec, seed)
    max_length = None if data.packing else data.seq_len
    cache_statuses = []
    store, status = _store_of(source, data, spec, max_length, spec.task, progress)
    cache_statuses.append(status)
    stores = [store]
    if held_out is not None:
        eval_store, status = _store_of(held_out, data, spec, max_length, spec.task, progress)
        cache_statuses.append(status)
        stores.append(eval_store)
    task = resolve_task(spec, store.labels is not None, source)
    if task == CLS and any(s.labels is None for s in stores):
        raise ConfigError(f"data.label_column={data.label_column!r} is not a column of {source.name}")
    labels, names = _labels_of(stores) if task == CLS else ([None] * len(stores), None)
    classes = num_classes(model, labels, names) if task == CLS else 0
    train_rows, carved = _select(store.rows, evaluation, data, seed, held_out is None)
    sets = [(store, train_rows, labels[0])]
    if held_out is not None:
        sets.append((stores[1], np.arange(stores[1].rows), labels[1]))
    elif carved is not None:
        sets.append((store, carved, labels[0]))
    if len(sets) > 1 and evaluation.num_samples:
        sets[1] = (sets[1][0], sets[1][1][: evaluation.num_samples], sets[1][2])
    built = [_rows_or_blocks(s, rows, lab, task, data, spec) for s, rows, lab in sets]
    status = MISS if MISS in cache_statuses else cache_statuses[0]
    info = {
        "source_rows": store.rows,
        "rows_used": len(train_rows),
        "truncated_rows": int(store.meta.get("truncated_rows", 0)),
        "tokens": int(store.meta.get("tokens", len(store.tokens))),
        "tokenize_s": 0.0 if status == HIT else float(store.meta.get("tokenize_s", 0.0)),
    }
    return _datasets(built, task, classes, "blocks" if data.packing else "rows", status, names, info, evaluation)


def _rows_or_blocks(
    store: TokenStore, rows: np.ndarray, labels: np.ndarray | None, task: str, data: DataConfig, spec: ModelSpec
) -> TokenDataset:
    pad = spec.tokenizer.pad_token_id
    if data.packing:
        if task != LM:
            raise ConfigError("data.packing=true packs documents for a language model; a classifier trains on rows")
        eos = spec.tokenizer.eos_token_id if spec.tokenizer.eos_token_id is not None else pad
        return blocks_dataset(packed_stream(store, rows, eos).tokens, data.seq_len, pad)
    full = rows_dataset(store.tokens, store.offsets, pad, labels, store.segments)
    if task == LM:  # a 1-token text has no next token to predict
        rows = rows[full.sample_lengths(rows) >= 2]
    return full.subset(rows)


def _datasets(
    built: list[TokenDataset],
    task: str,
    classes: int,
    layout: str,
    status: str,
    names: list[str] | None,
    info: dict,
    evaluation: EvalConfig,
) -> Datasets:
    train, held = built[0], built[1] if len(built) > 1 else None
    if not len(train):
        reason = f" after eval.fraction={evaluation.fraction} took its share" if evaluation.fraction else ""
        raise ConfigError(f"data.name holds no usable training rows{reason}")
    if held is not None and not len(held):
        key = next(k for k in ("fraction", "file", "split") if getattr(evaluation, k))
        raise ConfigError(
            f"eval.{key}={getattr(evaluation, key)!r} gives an empty eval set; "
            + ("raise eval.fraction or data.num_samples" if key == "fraction" else "it holds no usable rows")
        )
    info = {
        "train_samples": len(train),
        "eval_samples": len(held) if held is not None else 0,
        "tokenized_cache": status,
        "label_names": names,
        **info,
    }
    return Datasets(train, held, task, classes, layout, info)


def _synthetic(data: DataConfig, evaluation: EvalConfig, model: ModelConfig, spec: ModelSpec, seed: int) -> Datasets:
    """Generate data.num_samples samples; eval.fraction carves the eval set out of them."""
    task = SYNTHETIC_TASKS[data.name]
    if spec.task is not None and spec.task != task:
        raise ConfigError(
            f"data.name={data.name!r} is a {task} set but the model's task is {spec.task}; "
            f"use data.name=synthetic-{spec.task}"
        )
    if spec.tokenizer.vocab_size < 258:
        raise ConfigError(f"data.name={data.name!r} needs the built-in byte vocabulary (tiny-gpt2, tiny-bert, mlp-bn)")
    classes = model.num_labels or 2 if task == CLS else 0
    if data.packing and task != LM:
        raise ConfigError("data.packing=true packs documents for a language model; a classifier trains on rows")
    full = synthetic_lm(data, seed) if task == LM else synthetic_cls(data, seed, classes)
    if data.packing:  # each document starts with its bos, which separates it from the one before
        full = blocks_dataset(full.tokens, data.seq_len, spec.tokenizer.pad_token_id)
    built = [full]
    if evaluation.fraction:
        train_rows, held = carve(len(full), evaluation.fraction, seed)
        built = [full.subset(train_rows), full.subset(held[: evaluation.num_samples or None])]
    info = {"source_rows": len(full), "rows_used": len(built[0]), "truncated_rows": 0, "tokens": len(full.tokens)}
    return _datasets(built, task, classes, "blocks" if data.packing else "rows", OFF, None, info, evaluation)


def _token_file(source: Source, data: DataConfig, evaluation: EvalConfig, spec: ModelSpec, seed: int) -> Datasets:
    """A flat token file in blocks of data.seq_len + 1 tokens; eval.fraction holds the last blocks out."""
    if spec.task == CLS:
        raise ConfigError(f"data.name={source.value!r} is a flat token file, for a language model; model.task is cls")
    tokens = read_token_file(source).tokens
    _check_vocab(tokens, source, spec, resolve_cache_dir(data.cache_dir))
    pad = spec.tokenizer.pad_token_id
    blocks = blocks_dataset(tokens, data.seq_len, pad)
    if not len(blocks):
        raise ConfigError(
            f"data.name={source.value!r} holds {len(tokens)} tokens, fewer than one block of data.seq_len + 1 = "
            f"{data.seq_len + 1}"
        )
    # eval.fraction holds out the file's last blocks, and data.max_rows keeps its first: a contiguous cut keeps
    # both sets views of the mapped file, with nothing per block in memory (a random carve would need a billion
    # indices for a 2 GB file).
    held = round(len(blocks) * evaluation.fraction) if evaluation.fraction else 0
    kept = len(blocks) - held
    built = [blocks.first(min(kept, data.max_rows or kept))]
    if held:
        tail = blocks_dataset(tokens[kept * data.seq_len :], data.seq_len, pad)
        built.append(tail.first(evaluation.num_samples or held))
    info = {"source_rows": len(blocks), "rows_used": len(built[0]), "truncated_rows": 0, "tokens": len(tokens)}
    return _datasets(built, LM, 0, "blocks", OFF, None, info, evaluation)


__all__ = ["Datasets", "build_datasets", "carve", "file_source", "label_ids", "read_store_meta"]
