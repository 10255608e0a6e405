"""The token store: a tokenized dataset as flat arrays on disk, memory-mapped by every rank.

    <cache_dir>/<key>/tokens.npy     every row's ids one after the other, in the smallest unsigned type that
                                     holds the vocabulary (uint16 up to 65,536 ids)
    <cache_dir>/<key>/offsets.npy    int64, rows + 1: row i is tokens[offsets[i]:offsets[i + 1]]
    <cache_dir>/<key>/labels.npy     int64 per row, when the source has a label column
    <cache_dir>/<key>/segments.npy   uint8 like tokens (text pairs: 0 first text, 1 second), when made
    <cache_dir>/<key>/store.json     what it holds and how it was made; written last

The key hashes everything that decides the ids: the source (a file's path, size and modification time; a
hub table's fingerprint), the columns, the length limit and the tokenizer's fingerprint, so a changed input
is a miss, never stale ids. A store is written into a temporary folder and renamed: two machines that miss
at once each write a whole store, and the last rename wins. Memory-mapped arrays cost a rank no memory of
its own: the page cache holds one copy for every process of a machine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.config import ConfigError
from launcher.data.sources import STORE_META
from launcher.files import fsync_path, umask

FORMAT = 2  # part of every key: the tokenization cache of format 1 (one .pt file per entry) is never read
HIT, MISS, OFF = "hit", "miss", "off"
ARRAYS = ("tokens", "offsets", "labels", "segments")


def resolve_cache_dir(setting: str) -> Path | None:
    """``data.cache_dir``: ``none`` = no cache, ``auto`` = $ACCUM_CACHE or ~/.cache/accum-launcher, else a folder."""
    if setting == "none":
        return None
    if setting == "auto":
        return Path(os.environ.get("ACCUM_CACHE") or Path.home() / ".cache" / "accum-launcher")
    return Path(setting).expanduser()


def store_key(parts: dict[str, Any]) -> str:
    """A stable hash of the key's parts (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenStore:
    tokens: np.ndarray
    offsets: np.ndarray | None  # None for a stream of packed documents (read as blocks)
    labels: np.ndarray | None = None
    segments: np.ndarray | None = None
    meta: dict[str, Any] | None = None
    path: Path | None = None  # None when built in memory (data.cache_dir=none)

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1 if self.offsets is not None else 0

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


def open_store(path: Path) -> TokenStore:
    """A store folder, memory-mapped."""
    meta = json.loads((path / STORE_META).read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return TokenStore(meta=meta, path=path, **{name: arrays.get(name) for name in ARRAYS})


def _no_room(cache_dir: Path, needed: int) -> ConfigError:
    free = shutil.disk_usage(cache_dir).free
    return ConfigError(
        f"data.cache_dir={str(cache_dir)!r} has {free:,} bytes free, the token store needs {needed:,}: free some "
        "space, choose another data.cache_dir, or set data.cache_dir=none (tokenized in memory)"
    )


def write_store(cache_dir: Path, key: str, store: TokenStore) -> TokenStore:
    """Write ``store`` as ``cache_dir/key`` atomically, and return it opened from there."""
    final = cache_dir / key
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"data.cache_dir={str(cache_dir)!r} cannot be created: {err.strerror}") from None
    needed = store.nbytes + 4096 * (len(store.arrays()) + 1)
    if shutil.disk_usage(cache_dir).free < needed:
        raise _no_room(cache_dir, needed)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}."))
    try:
        for name, array in store.arrays().items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
            fsync_path(tmp / f"{name}.npy")
        meta = {**(store.meta or {}), "format": FORMAT, "arrays": list(store.arrays())}
        (tmp / STORE_META).write_text(json.dumps(meta, indent=1) + "\n")  # last: a folder with it is complete
        fsync_path(tmp / STORE_META)
        tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide the store from the other users of a cache
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same store first
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise _no_room(cache_dir, needed) from None
        raise ConfigError(f"data.cache_dir={str(cache_dir)!r} cannot hold the token store: {err.strerror}") from None
    return open_store(final)


def cached_store(cache_dir: Path | None, key: str) -> TokenStore | None:
    """The complete store of ``key``, if one was written (an unreadable one is a miss, rewritten)."""
    if cache_dir is None or not (cache_dir / key / STORE_META).is_file():
        return None
    try:
        return open_store(cache_dir / key)
    except (OSError, ValueError, KeyError):
        return None


def packed_stream(store: TokenStore, rows: np.ndarray, eos: int) -> TokenStore:
    """``rows``'s documents, each followed by ``eos``, as one stream of ids (data.packing)."""
    offsets = store.offsets
    lengths = offsets[rows + 1] - offsets[rows]
    out = np.empty(int(lengths.sum() + len(rows)), dtype=store.tokens.dtype)
    ends = np.cumsum(lengths + 1)
    for row, end, length in zip(rows.tolist(), ends.tolist(), lengths.tolist(), strict=True):
        out[end - length - 1 : end - 1] = store.tokens[offsets[row] : offsets[row] + length]
    out[ends - 1] = eos
    return TokenStore(out, None, meta={"kind": "stream", "documents": len(rows)})
