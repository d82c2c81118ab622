"""Writing files that readers in other processes may be reading: the kernel cache, meta-training checkpoints, the
benchmark's run store."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes | Callable[[Path], object]) -> None:
    """Write ``path`` (``data``'s bytes, or what ``data(temporary_path)`` writes) through a temporary file of its
    own in the same folder (a dot file: folder listings skip it), flushed to disk and then renamed over ``path``.

    A reader sees the old file or the new one, never part of either; two writers of one path never share a
    temporary file; a crash leaves no short file under ``path`` (the data is on disk before the rename). The
    temporary file is removed if writing fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if callable(data):
            data(Path(tmp))
        else:
            Path(tmp).write_bytes(data)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
