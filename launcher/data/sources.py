"""Where the rows come from: a generated set, a text file or table, a hub dataset, a flat token file, or a token
store written earlier. No torch: compare checks every mode's sources before its first launch.

Each source is checked when it is named (suffix, existence) and when it is opened (columns), each mistake in
one line naming the key, the value and what would be valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.builtin import SYNTHETIC_TASKS
from launcher.config import ConfigError, DataConfig, EvalConfig

# Tables read through `datasets`; a .txt file is one document per line (data.txt_documents=line) or per
# paragraph, paragraphs being separated by blank lines (paragraph).
TABLE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# Flat token ids for a language model, cut into blocks of data.seq_len + 1: nanoGPT's uint16 .bin, or any
# one-dimensional integer .npy.
TOKEN_FORMATS = (".bin", ".npy")
STORE_META = "store.json"  # marks a token store folder (launcher.data.store)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type): library errors run to many lines."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@dataclass(frozen=True)
class Source:
    key: str  # the config key that named it, for messages: data.name, eval.file, eval.split
    value: str  # what the user wrote
    kind: str  # synthetic | table | hub | tokens | store
    path: Path | None = None
    split: str = ""  # of a hub dataset

    @property
    def name(self) -> str:
        """How messages call it."""
        return f"{self.value} ({self.split})" if self.kind == "hub" else self.value

    def identity(self) -> dict[str, Any]:
        """What decides its content, for a token store's key: a file's path, size and modification time."""
        if self.path is not None:
            stat = self.path.stat()
            return {"file": str(self.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return {"kind": self.kind, "value": self.value, "split": self.split}


def _known(key: str) -> str:
    if key == "data.name":
        return "synthetic-lm, synthetic-cls, hf:<hub id>, a token store folder, or a file ending in " + ", ".join(
            [*TABLE_FORMATS, *TOKEN_FORMATS]
        )
    return f"a file ending in {', '.join(TABLE_FORMATS)}"


def file_source(key: str, value: str) -> Source:
    path = Path(value).expanduser()
    if path.is_dir() and (path / STORE_META).is_file() and key == "data.name":
        return Source(key, value, "store", path)
    suffix = path.suffix.lower()
    tokens = suffix in TOKEN_FORMATS and key == "data.name"
    if suffix not in TABLE_FORMATS and not tokens:
        raise ConfigError(f"{key}={value!r} is not known; choose {_known(key)}")
    if not path.is_file():
        raise ConfigError(f"{key}={value!r}: no such file")
    return Source(key, value, "tokens" if tokens else "table", path)


def train_source(data: DataConfig) -> Source:
    if data.name in SYNTHETIC_TASKS:
        return Source("data.name", data.name, "synthetic")
    if data.name.startswith("hf:"):
        return Source("data.name", data.name, "hub", split=data.split)
    return file_source("data.name", data.name)


def eval_source(data: DataConfig, evaluation: EvalConfig, train: Source) -> Source | None:
    """The eval set's own source (eval.file or eval.split); None for eval.fraction (carved from the training
    rows) and for no eval set."""
    if evaluation.split and train.kind != "hub":
        how = (
            "is generated; use eval.fraction"
            if train.kind == "synthetic"
            else "is a file; use eval.file or eval.fraction"
        )
        raise ConfigError(
            f"eval.split={evaluation.split!r} takes a split of a hub dataset, but data.name={data.name!r} {how}"
        )
    if evaluation.file and train.kind == "synthetic":
        raise ConfigError(
            f"eval.file={evaluation.file!r} needs a file or hub dataset, but data.name={data.name!r} is generated; "
            "use eval.fraction"
        )
    if evaluation.file:
        return file_source("eval.file", evaluation.file)
    if evaluation.split:
        return Source("eval.split", data.name, "hub", split=evaluation.split)
    return None


@dataclass
class Table:
    """A loaded table (datasets.Dataset) and its source."""

    source: Source
    table: Any
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    def require(self, key: str, column: str) -> None:
        if column not in self.columns:
            raise ConfigError(
                f"{key}={column!r} is not a column of {self.source.name}; columns: {', '.join(self.columns)}"
            )

    def values(self, column: str) -> list:
        """A whole column at once: reading a datasets column row by row costs about 0.25 ms a row (12 s for
        50,000 rows, measured), this a few ms in all."""
        return self.table.with_format("arrow")[column].to_pylist()

    def __len__(self) -> int:
        return len(self.table)


def load_table(source: Source, data: DataConfig) -> Table:
    import datasets  # seconds of import, for file and hub data only: synthetic runs never pay it

    datasets.disable_progress_bars()
    if source.kind == "hub":
        try:
            table = datasets.load_dataset(source.value.removeprefix("hf:"), data.subset or None, split=source.split)
        except Exception as err:  # the hub raises many types: connection, missing repo, subset or split
            where = "" if source.key == "data.name" else f" of data.name={data.name!r}"
            value = source.value if source.key == "data.name" else source.split
            raise ConfigError(
                f"{source.key}={value!r}{where} could not be loaded (offline or unknown?): {first_line(err)}"
            ) from None
        # The fingerprint changes with the hub revision and with any processing of the table.
        return Table(source, table, {**source.identity(), "subset": data.subset, "fingerprint": table._fingerprint})
    kind = TABLE_FORMATS[source.path.suffix.lower()]
    options = {"sample_by": data.txt_documents} if kind == "text" else {}
    try:
        table = datasets.load_dataset(kind, data_files=str(source.path), split="train", **options)
    except Exception as err:  # parse errors come from pyarrow/pandas under many types
        raise ConfigError(f"{source.key}={source.value!r} could not be read as {kind}: {first_line(err)}") from None
    if kind == "text":
        table = table.filter(lambda row: bool(row["text"].strip()))  # blank lines are no documents
    return Table(source, table, {**source.identity(), "txt_documents": data.txt_documents if kind == "text" else ""})


def text_column(source: Source, data: DataConfig) -> str:
    """A .txt file's documents are in datasets' ``text`` column, whatever data.text_column says."""
    return "text" if source.path is not None and source.path.suffix.lower() == ".txt" else data.text_column


def check_table(table: Table, data: DataConfig, want_labels: bool) -> bool:
    """Check the columns a table must have; returns whether it has labels (a classification set)."""
    table.require("data.text_column", text_column(table.source, data))
    if data.text_pair_column:
        table.require("data.text_pair_column", data.text_pair_column)
    has_labels = data.label_column in table.columns
    if want_labels and not has_labels:
        table.require("data.label_column", data.label_column)
    return has_labels


def check_sources(data: DataConfig, evaluation: EvalConfig, task: str | None) -> None:
    """Everything about a run's data that can be known without a tokenizer: names, files, columns. For compare,
    before any launch (the trainer checks the same as it loads)."""
    train = train_source(data)
    sources = [train, eval_source(data, evaluation, train)]
    for source in sources:
        if source is not None and source.kind in ("table", "hub"):
            check_table(load_table(source, data), data, want_labels=task == "cls")
        if source is not None and source.kind == "tokens":
            read_token_file(source)


@dataclass(frozen=True)
class TokenFile:
    """A flat token file's ids, memory-mapped (the page cache is shared by every rank of a machine)."""

    source: Source
    tokens: Any  # numpy memmap, one dimension


def read_token_file(source: Source) -> TokenFile:
    import numpy as np

    path, where = source.path, f"{source.key}={source.value!r}"
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"{where} is empty")
    if path.suffix.lower() == ".bin":
        if size % 2:
            raise ConfigError(
                f"{where} has {size} bytes, an odd number: a .bin holds uint16 token ids (2 bytes each), so the "
                "file is truncated or of another format"
            )
        return TokenFile(source, np.memmap(path, dtype=np.uint16, mode="r"))
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ConfigError(f"{where} is not a readable .npy file: {first_line(err)}") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or not len(tokens):
        raise ConfigError(
            f"{where} holds a {tokens.dtype} array of shape {tuple(tokens.shape)}; a token file is one "
            "non-empty dimension of integer ids"
        )
    return TokenFile(source, tokens)


def read_store_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / STORE_META).read_text())
