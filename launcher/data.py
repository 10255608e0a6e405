"""Datasets as token-id lists, the train/eval split, and the collate that turns sample ids into one micro-batch.

Every process builds the same datasets in memory (synthetic sets from the seed, files and hub datasets
through ``datasets``, tokenized once per machine and cached on disk: ``tokencache``); which samples a
process trains on is decided by ``batching.SampleOrder``, not by a sharding sampler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher import tokencache
from launcher.builtin import CLS, LM, SYNTHETIC_TASKS
from launcher.config import ConfigError, DataConfig, EvalConfig
from launcher.loss import IGNORE
from launcher.models import Encoded, ModelBundle, first_line

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TokenDataset:
    examples: list[list[int]]
    labels: list[int] | None  # class per example (classification) or None (causal LM)
    pad_token_id: int
    token_type_ids: list[list[int]] | None = None  # segment ids of text pairs, when the tokenizer makes them

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, ids: list[int]) -> TokenDataset:
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in ids]

        return TokenDataset(pick(self.examples), pick(self.labels), self.pad_token_id, pick(self.token_type_ids))

    def collate(self, ids: list[int], micro_batch_size: int, filler: int) -> dict[str, torch.Tensor]:
        """Pad ``ids`` to the longest sample; rows past ``len(ids)`` repeat sample ``filler`` with every label
        ignored, so a short last window keeps the same shapes on every rank and adds nothing to the loss."""
        rows = ids + [filler] * (micro_batch_size - len(ids))
        width = max(len(self.examples[i]) for i in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            tokens = self.examples[i]
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        if self.labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        else:
            labels = torch.tensor([self.labels[i] for i in rows])
        labels[len(ids) :] = IGNORE
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.token_type_ids is not None:
            token_type_ids = torch.zeros_like(input_ids)
            for row, i in enumerate(rows):
                token_type_ids[row, : len(self.token_type_ids[i])] = torch.tensor(self.token_type_ids[i])
            batch["token_type_ids"] = token_type_ids
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward: everything in a collated batch but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _synthetic_lm(cfg: DataConfig, seed: int) -> TokenDataset:
    """Arithmetic progressions mod 256 with random start, stride and length: learnable, and the
    variable lengths make per-micro-batch token counts differ, which is what token normalization is for."""
    rng = random.Random(seed)
    examples = []
    for _ in range(cfg.num_samples):
        length = rng.randint(max(4, cfg.seq_len // 4), cfg.seq_len)
        start, stride = rng.randrange(256), rng.randrange(1, 8)
        examples.append([257] + [(start + stride * t) % 256 for t in range(length - 1)])
    return TokenDataset(examples, None, pad_token_id=256)


def _synthetic_cls(cfg: DataConfig, seed: int, num_labels: int) -> TokenDataset:
    """Class c draws most tokens from its own band of the byte range: balanced and learnable."""
    rng = random.Random(seed)
    band = 256 // num_labels
    examples, labels = [], []
    for _ in range(cfg.num_samples):
        label = rng.randrange(num_labels)
        length = rng.randint(max(4, cfg.seq_len // 2), cfg.seq_len)
        tokens = [
            label * band + rng.randrange(band) if rng.random() < 0.6 else rng.randrange(256) for _ in range(length - 1)
        ]
        examples.append([257, *tokens])
        labels.append(label)
    return TokenDataset(examples, labels, pad_token_id=256)


@dataclass
class Datasets:
    train: TokenDataset
    eval: TokenDataset | None  # None: no eval set configured
    info: dict[str, Any]  # summary.json's "data": sizes, whether the tokenization cache hit, label names


@dataclass
class _Table:
    """A loaded table, its name in messages, and what identifies its content (for the tokenization cache key)."""

    table: Any  # datasets.Dataset
    name: str
    identity: dict[str, Any]


def _load_file(key: str, name: str) -> _Table:
    import datasets  # seconds of import, for file and hub data only: synthetic runs never pay it

    datasets.disable_progress_bars()
    path = Path(name).expanduser()
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        choices = "synthetic-lm, synthetic-cls, hf:<hub id> or a file" if key == "data.name" else "a file"
        raise ConfigError(f"{key}={name!r} is not known; choose {choices} ending in {', '.join(FILE_FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"{key}={name!r}: no such file")
    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # parse errors come from pyarrow/pandas under many types
        raise ConfigError(f"{key}={name!r} could not be read as {kind}: {first_line(err)}") from None
    stat = path.stat()
    return _Table(table, name, {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def _load_hub(key: str, value: str, data: DataConfig, split: str) -> _Table:
    import datasets

    datasets.disable_progress_bars()
    dataset_id = data.name.removeprefix("hf:")
    try:
        table = datasets.load_dataset(dataset_id, data.subset or None, split=split)
    except Exception as err:  # the hub raises many types: connection, missing repo, subset or split
        where = "" if key == "data.name" else f" of data.name={data.name!r}"
        raise ConfigError(
            f"{key}={value!r}{where} could not be loaded (offline or unknown?): {first_line(err)}"
        ) from None
    # The fingerprint changes with the hub revision and with any processing of the table.
    identity = {"hub": dataset_id, "subset": data.subset, "split": split, "fingerprint": table._fingerprint}
    return _Table(table, f"{data.name} ({split})", identity)


def _require_column(source: _Table, key: str, column: str) -> None:
    names = source.table.column_names
    if column not in names:
        raise ConfigError(f"{key}={column!r} is not a column of {source.name}; columns: {', '.join(names)}")


def carve(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split rows 0..num_rows-1 into (train, eval): a seeded random share ``fraction`` (rounded) goes to eval.
    Disjoint, together every row, each in ascending order; the same seed always carves the same rows."""
    shuffled = list(range(num_rows))
    # A seed of its own, so the carve is not the synthetic data's or the sample order's random stream.
    random.Random(f"eval-carve-{seed}").shuffle(shuffled)
    held = set(shuffled[: round(num_rows * fraction)])
    return [i for i in range(num_rows) if i not in held], sorted(held)


def label_ids(columns: list[list]) -> tuple[list[list[int]], list[str] | None]:
    """Class ids for the label columns of the train and eval sets. Integers are ids already; anything else
    is mapped through ONE name -> id map built from every set (sorted names), so a name has the same id in
    train and eval even when one set lacks a class. Returns the ids per column and the names (or None)."""
    values = [v for column in columns for v in column]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [list(column) for column in columns], None
    names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    return [[index[str(v)] for v in column] for column in columns], names


def _encode(
    source: _Table, rows: list[int], data: DataConfig, bundle: ModelBundle, cache_dir: Path | None
) -> tuple[Encoded, str]:
    """Tokenize the text (and pair) columns of ``rows``, or read them from the cache."""
    _require_column(source, "data.text_column", data.text_column)
    if data.text_pair_column:
        _require_column(source, "data.text_pair_column", data.text_pair_column)
    parts = {
        "source": source.identity,
        "text_column": data.text_column,
        "text_pair_column": data.text_pair_column,
        "rows": tokencache.rows_digest(rows),
        "seq_len": data.seq_len,
        "tokenizer": bundle.tokenizer_fingerprint,
    }

    def encode() -> Encoded:
        texts = [str(t) for t in _values(source, data.text_column, rows)]
        pairs = [str(t) for t in _values(source, data.text_pair_column, rows)] if data.text_pair_column else None
        return bundle.encode(texts, pairs, data.seq_len)

    return tokencache.load_or_encode(cache_dir, parts, encode)


def _values(source: _Table, column: str, rows: list[int]) -> list:
    """The column's values at ``rows``. The whole column is converted at once: reading a datasets column row
    by row costs about 0.25 ms a row (12 s for 50,000 rows, measured), this a few ms in all."""
    values = source.table.with_format("arrow")[column].to_pylist()
    return [values[i] for i in rows]


def _labels(source: _Table, rows: list[int], data: DataConfig) -> list:
    _require_column(source, "data.label_column", data.label_column)
    return _values(source, data.label_column, rows)


def _check_labels(data: DataConfig, labels: list[int], num_labels: int) -> None:
    bad = [v for v in labels if not 0 <= v < num_labels]
    if bad:
        raise ConfigError(
            f"data.label_column={data.label_column!r} holds label {bad[0]} outside [0, {num_labels}); "
            f"set model.num_labels to at least {max(labels) + 1}"
        )


def _eval_source(data: DataConfig, evaluation: EvalConfig) -> tuple[_Table, list[int]] | None:
    """The eval table and its rows for eval.file or eval.split (eval.fraction is carved by the caller)."""
    if evaluation.file:
        source = _load_file("eval.file", evaluation.file)
    elif evaluation.split:
        source = _load_hub("eval.split", evaluation.split, data, evaluation.split)
    else:
        return None
    return source, list(range(len(source.table)))


def _from_tables(
    data: DataConfig, evaluation: EvalConfig, bundle: ModelBundle, seed: int, num_labels: int
) -> tuple[TokenDataset, TokenDataset | None, str, list[str] | None]:
    hub = data.name.startswith("hf:")
    if evaluation.split and not hub:
        raise ConfigError(
            f"eval.split={evaluation.split!r} takes a split of a hub dataset, but data.name={data.name!r} is a file; "
            "use eval.file or eval.fraction"
        )
    train_source = _load_hub("data.name", data.name, data, data.split) if hub else _load_file("data.name", data.name)
    train_rows = list(range(len(train_source.table)))
    evaluated = _eval_source(data, evaluation)
    if evaluation.fraction:
        train_rows, eval_rows = carve(len(train_rows), evaluation.fraction, seed)
        evaluated = (train_source, eval_rows)
    if data.num_samples:
        train_rows = train_rows[: data.num_samples]
    sets = [(train_source, train_rows)]
    if evaluated is not None:
        eval_source, eval_rows = evaluated
        sets.append((eval_source, eval_rows[: evaluation.num_samples or None]))

    cache_dir = tokencache.resolve_cache_dir(data.cache_dir)
    encoded, statuses = [], []
    for source, rows in sets:
        tokens, status = _encode(source, rows, data, bundle, cache_dir)
        encoded.append(tokens)
        statuses.append(status)
    labels: list[list[int] | None] = [None] * len(sets)
    names = None
    if bundle.task == CLS:
        labels, names = label_ids([_labels(source, rows, data) for source, rows in sets])
        for column in labels:
            _check_labels(data, column, num_labels)
    built = []
    for tokens, column in zip(encoded, labels, strict=True):
        dataset = TokenDataset(tokens["input_ids"], column, bundle.pad_token_id, tokens.get("token_type_ids"))
        if bundle.task == LM:  # a 1-token text has no next token to predict
            dataset = dataset.subset([i for i, e in enumerate(dataset.examples) if len(e) >= 2])
        built.append(dataset)
    # One verdict for the run (both sets share the cache folder): a hit only when nothing had to be tokenized.
    status = tokencache.MISS if tokencache.MISS in statuses else statuses[0]
    return built[0], built[1] if len(built) > 1 else None, status, names


def _synthetic(
    data: DataConfig, evaluation: EvalConfig, bundle: ModelBundle, seed: int, num_labels: int
) -> tuple[TokenDataset, TokenDataset | None]:
    """Generate data.num_samples samples; eval.fraction carves the eval set out of them."""
    if SYNTHETIC_TASKS[data.name] != bundle.task:
        raise ConfigError(
            f"data.name={data.name!r} is a {SYNTHETIC_TASKS[data.name]} set but the model's task is {bundle.task}; "
            f"use data.name=synthetic-{bundle.task}"
        )
    if bundle.vocab_size < 258:
        raise ConfigError(f"data.name={data.name!r} needs the built-in byte vocabulary (tiny-gpt2, tiny-bert)")
    if data.num_samples < 1:
        raise ConfigError(f"data.num_samples={data.num_samples} must be >= 1 for {data.name}")
    for key in ("file", "split"):
        if getattr(evaluation, key):
            raise ConfigError(
                f"eval.{key}={getattr(evaluation, key)!r} needs a file or hub dataset, but data.name={data.name!r} "
                "is generated; use eval.fraction"
            )
    full = _synthetic_lm(data, seed) if bundle.task == LM else _synthetic_cls(data, seed, num_labels)
    if not evaluation.fraction:
        return full, None
    train_rows, eval_rows = carve(len(full), evaluation.fraction, seed)
    return full.subset(train_rows), full.subset(eval_rows[: evaluation.num_samples or None])


def build_datasets(
    data: DataConfig, evaluation: EvalConfig, bundle: ModelBundle, seed: int, num_labels: int
) -> Datasets:
    """The training set and the eval set (None when the eval section names none) for ``bundle``'s task."""
    names = None
    if data.name in SYNTHETIC_TASKS:
        train, evaluated = _synthetic(data, evaluation, bundle, seed, num_labels)
        status = tokencache.OFF  # generated as token ids: nothing to tokenize
    else:
        train, evaluated, status, names = _from_tables(data, evaluation, bundle, seed, num_labels)
    if not len(train):
        reason = f" after eval.fraction={evaluation.fraction} took its share" if evaluation.fraction else ""
        raise ConfigError(f"data.name={data.name!r} holds no usable training rows{reason}")
    if evaluated is not None and not len(evaluated):
        key = next(k for k in ("fraction", "file", "split") if getattr(evaluation, k))
        raise ConfigError(
            f"eval.{key}={getattr(evaluation, key)!r} gives an empty eval set; "
            + ("raise eval.fraction or data.num_samples" if key == "fraction" else "it holds no usable rows")
        )
    info = {
        "train_samples": len(train),
        "eval_samples": len(evaluated) if evaluated is not None else 0,
        "tokenized_cache": status,
        "label_names": names,
    }
    return Datasets(train, evaluated, info)
