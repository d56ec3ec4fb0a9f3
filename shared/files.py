"""Durable file writes and checksums shared by the token-shard and teacher-cache formats."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory: makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write via ``.{name}.tmp-{pid}``, fsync, rename: readers see the old file or the new, never half.

    The temporary file is created fresh (``O_EXCL | O_NOFOLLOW``; a leftover name of a killed writer
    of this pid, or a planted link, is removed first), so a symlink there can never redirect it.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def replace_folder(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target`` (a sibling); an existing ``target`` is moved
    aside first and removed after, so ``target`` is always either the old folder or the new one."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old)


def is_temp_file(name: str) -> bool:
    """A leftover of :func:`atomic_write` from a killed writer."""
    return name.startswith(".") and ".tmp-" in name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
