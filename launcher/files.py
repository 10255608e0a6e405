"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it.

A crash (or a kill) never leaves half a file under the final name; a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_output(path: Path, produce: Callable[[str], None]) -> None:
    """Let ``produce`` write a temporary file beside ``path``, then rename it over ``path``. The file gets the
    mode any new file would (mkstemp's 0600 would hide results from the other users of a cluster, and files
    written in a container from the host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        produce(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def produce(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_output(path, produce)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def fsync_path(path: Path) -> None:
    """Flush a file or a folder entry to disk; a rename is only durable once both are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
