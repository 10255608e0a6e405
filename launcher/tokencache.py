"""Tokenized datasets cached on disk, keyed by everything that decides the token ids.

A key covers the source (a file's path, size and mtime_ns, or a hub dataset's id, subset, split and the
loaded table's fingerprint), the columns, the rows selected, seq_len and the tokenizer's fingerprint, so a
changed input can never be served stale ids. Each entry is one ``torch.save`` file of plain tensors (read
back with ``weights_only=True``: no pickle code runs), written to a temporary file and renamed into place:
two processes that miss at once both write a whole file, and the last rename wins.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher.config import ConfigError
from launcher.files import atomic_output
from launcher.models import Encoded

CACHE_FORMAT = 1  # part of every key: bump it when the stored layout changes
HIT, MISS, OFF = "hit", "miss", "off"


def resolve_cache_dir(setting: str) -> Path | None:
    """``data.cache_dir``: ``none`` = no cache, ``auto`` = $ACCUM_CACHE or ~/.cache/accum-launcher, else a folder."""
    if setting == "none":
        return None
    if setting == "auto":
        return Path(os.environ.get("ACCUM_CACHE") or Path.home() / ".cache" / "accum-launcher")
    return Path(setting).expanduser()


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of the key's parts (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()


def rows_digest(rows: list[int]) -> str:
    """A short hash of the selected row indices (their order included)."""
    return hashlib.sha256(",".join(map(str, rows)).encode()).hexdigest()


def _pack(encoded: Encoded) -> dict[str, torch.Tensor]:
    """Ragged rows as one flat tensor per field plus the row lengths: compact, and loadable without pickle."""
    packed = {"lengths": torch.tensor([len(row) for row in encoded["input_ids"]], dtype=torch.int64)}
    for name, rows in encoded.items():
        packed[name] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.int32)  # ids < 2**31
    return packed


def _unpack(packed: dict[str, torch.Tensor]) -> Encoded:
    lengths = packed["lengths"].tolist()
    out: Encoded = {}
    for name, flat in packed.items():
        if name == "lengths":
            continue
        values, rows, start = flat.tolist(), [], 0
        for length in lengths:
            rows.append(values[start : start + length])
            start += length
        out[name] = rows
    return out


def load_or_encode(cache_dir: Path | None, parts: dict[str, Any], encode: Callable[[], Encoded]) -> tuple[Encoded, str]:
    """The encoded rows for ``parts``, from the cache when an entry exists, else from ``encode()`` (then stored);
    and whether the cache was hit, missed or off."""
    if cache_dir is None:
        return encode(), OFF
    path = cache_dir / f"{cache_key(parts)}.pt"
    if path.is_file():
        try:
            return _unpack(torch.load(path, weights_only=True)), HIT
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError):
            pass  # an unreadable entry (a disk error, an older layout) is a miss: it is rewritten below
    encoded = encode()
    packed = _pack(encoded)
    try:
        atomic_output(path, lambda tmp: torch.save(packed, tmp))
    except OSError as err:
        raise ConfigError(
            f"data.cache_dir={str(cache_dir)!r} cannot hold the tokenized data ({err.strerror}); "
            "choose another folder or set data.cache_dir=none"
        ) from None
    return encoded, MISS
