"""Durable writes in one place: every file aimass stores (quantized tensors, model
files, dataset indexes and splits) is written under a temporary name in the target's
directory, fsynced, renamed over the target, and the directory fsynced, so a reader
sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[str]:
    """Yields a temporary path to write; on success it replaces `path` durably, on
    error it is removed and `path` is left as it was."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def atomic_write_text(path: "str | os.PathLike", text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def sha256_file(path: "str | os.PathLike") -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
