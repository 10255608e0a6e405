"""The generated datasets: learnable, offline, and the same for every seed on every machine."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from launcher.config import DataConfig
from launcher.data.dataset import TokenDataset, rows_dataset
from launcher.models import encoded_from_rows

BYTE_PAD, BYTE_BOS = 256, 257  # the built-in byte tokenizer's pad and bos ids
DEFAULT_SAMPLES = 256


def synthetic_lm(data: DataConfig, seed: int) -> TokenDataset:
    """Arithmetic progressions mod 256 with random start, stride and length: learnable, and the variable
    lengths make per-micro-batch token counts differ, which is what token normalization is for."""
    rng = random.Random(seed)
    examples = []
    for _ in range(data.num_samples or DEFAULT_SAMPLES):
        length = rng.randint(max(4, data.seq_len // 4), data.seq_len)
        start, stride = rng.randrange(256), rng.randrange(1, 8)
        examples.append([BYTE_BOS] + [(start + stride * t) % 256 for t in range(length - 1)])
    encoded = encoded_from_rows(examples, None, 0)
    return rows_dataset(encoded.tokens.astype(np.uint16), encoded.offsets, BYTE_PAD)


def synthetic_cls(data: DataConfig, seed: int, num_labels: int) -> TokenDataset:
    """Class c draws most tokens from its own band of the byte range: balanced and learnable."""
    rng = random.Random(seed)
    band = 256 // num_labels
    examples, labels = [], []
    for _ in range(data.num_samples or DEFAULT_SAMPLES):
        label = rng.randrange(num_labels)
        length = rng.randint(max(4, data.seq_len // 2), data.seq_len)
        tokens = [
            label * band + rng.randrange(band) if rng.random() < 0.6 else rng.randrange(256) for _ in range(length - 1)
        ]
        examples.append([BYTE_BOS, *tokens])
        labels.append(label)
    encoded = encoded_from_rows(examples, None, 0)
    return rows_dataset(encoded.tokens.astype(np.uint16), encoded.offsets, BYTE_PAD, np.asarray(labels, np.int64))


def write_token_file(path: Path, num_tokens: int, vocab_size: int = 256, seed: int = 0) -> Path:
    """A flat uint16 token file of ``num_tokens`` ids (as nanoGPT writes ``.bin``), for rehearsing data at scale:
    one block of random ids written over and over, so that a file larger than memory is never in memory and
    costs the disk's time, not the generator's."""
    block = np.random.default_rng(seed).integers(0, vocab_size, min(num_tokens, 1 << 24), dtype=np.uint16)
    with open(path, "wb") as f:
        for start in range(0, num_tokens, len(block)):
            block[: num_tokens - start].tofile(f)
    return path
