"""Datasets as token-id lists, and the collate that turns sample ids into one micro-batch.

Every process builds the same dataset in memory (synthetic sets from the seed,
files through ``datasets``); which samples a process trains on is decided by
``batching.SampleOrder``, not by a sharding sampler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.config import ConfigError, DataConfig
from launcher.models import CLS, LM, ModelBundle

IGNORE = -100  # label value that contributes no loss and is not counted
FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TokenDataset:
    examples: list[list[int]]
    labels: list[int] | None  # class per example (classification) or None (causal LM)
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.examples)

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
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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


def _load_table(cfg: DataConfig):
    import datasets

    datasets.disable_progress_bars()
    if cfg.name.startswith("hf:"):
        try:
            return datasets.load_dataset(cfg.name.removeprefix("hf:"), split=cfg.split)
        except Exception as err:  # the hub raises many types: connection, missing repo, bad split
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"data.name={cfg.name!r} could not be loaded (offline or unknown?): {first}") from None
    path = Path(cfg.name).expanduser()
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"data.name={cfg.name!r} is not known; choose synthetic-lm, synthetic-cls, hf:<hub id> or a file ending "
            f"in {', '.join(FILE_FORMATS)}"
        )
    if not path.is_file():
        raise ConfigError(f"data.name={cfg.name!r}: no such file")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # parse errors come from pyarrow/pandas under many types
        raise ConfigError(f"data.name={cfg.name!r} could not be read as {kind}: {str(err).splitlines()[0]}") from None


def _column(table, key: str, column: str, source: str) -> list:
    if column not in table.column_names:
        raise ConfigError(f"{key}={column!r} is not a column of {source}; columns: {', '.join(table.column_names)}")
    return table[column]


def _from_table(cfg: DataConfig, bundle: ModelBundle, num_labels: int) -> TokenDataset:
    table = _load_table(cfg)
    if cfg.num_samples:
        table = table.select(range(min(cfg.num_samples, len(table))))
    texts = _column(table, "data.text_column", cfg.text_column, cfg.name)
    examples = [bundle.encode(str(text), cfg.seq_len) for text in texts]
    labels = None
    if bundle.task == CLS:
        raw = _column(table, "data.label_column", cfg.label_column, cfg.name)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            labels = list(raw)
        else:  # string labels: a stable id per distinct value
            names = sorted({str(v) for v in raw})
            labels = [names.index(str(v)) for v in raw]
        bad = [v for v in labels if not 0 <= v < num_labels]
        if bad:
            raise ConfigError(
                f"data.label_column={cfg.label_column!r} holds label {bad[0]} outside [0, {num_labels}); "
                f"set model.num_labels to at least {max(labels) + 1}"
            )
    short = sum(len(e) < 2 for e in examples)
    if bundle.task == LM and short:
        examples = [e for e in examples if len(e) >= 2]  # a 1-token text has no next token to predict
    return TokenDataset(examples, labels, bundle.pad_token_id)


def build_dataset(cfg: DataConfig, bundle: ModelBundle, seed: int, num_labels: int) -> TokenDataset:
    """The training set for ``bundle``'s task; synthetic sets need the built-in byte vocabulary."""
    synthetic = {"synthetic-lm": LM, "synthetic-cls": CLS}
    if cfg.name in synthetic:
        if synthetic[cfg.name] != bundle.task:
            raise ConfigError(
                f"data.name={cfg.name!r} is a {synthetic[cfg.name]} set but the model's task is {bundle.task}; "
                f"use data.name=synthetic-{bundle.task}"
            )
        if bundle.vocab_size < 258:
            raise ConfigError(f"data.name={cfg.name!r} needs the built-in byte vocabulary (tiny-gpt2, tiny-bert)")
        if cfg.num_samples < 1:
            raise ConfigError(f"data.num_samples={cfg.num_samples} must be >= 1 for {cfg.name}")
        return _synthetic_lm(cfg, seed) if bundle.task == LM else _synthetic_cls(cfg, seed, num_labels)
    dataset = _from_table(cfg, bundle, num_labels)
    if not len(dataset):
        raise ConfigError(f"data.name={cfg.name!r} holds no usable rows")
    return dataset
