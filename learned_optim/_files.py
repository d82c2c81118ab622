"""Writing files that readers in other processes may be reading: the kernel cache, meta-training checkpoints, the
benchmark's run store."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes | Callable[[Path], object]) -> None:
    """Write ``path`` (``data``'s bytes, or what ``data(temporary_path)`` writes) through a temporary file of its
    own in the same folder (a dot file: folder listings skip it), flushed to disk and then renamed over ``path``.

    A reader sees the old file or the new one, never part of either; two writers of one path never share a
    temporary file; a crash leaves no short file under ``path`` (the data is on disk before the rename). The file
    gets the permissions ``open`` gives a new file (``0666`` less the umask). The temporary file is removed if
    writing fails."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # another writer's name: draw again
            continue
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
