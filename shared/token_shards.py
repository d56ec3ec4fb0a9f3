"""Pre-tokenized token shards on disk (the format `retnet-distill preprocess` writes): writer and reader.

Layout of a shard set (one folder): ``manifest.json`` plus, per split and shard,
``{split}-{i:05d}.tokens.npy`` (int32 ``[rows, L]``), ``.mask.npy`` (uint8 ``[rows, L]``,
``mask[t] = 1`` when token ``t`` is a training target) and ``.lengths.npy`` (int32 ``[rows]``,
real tokens per row; the rest is right padding). Files are plain ``.npy`` so numpy memory-maps
them; a shard file appears only when complete (temp name, fsync, rename).

Numpy only (no torch): the teacher server's cache writer reads the same shards as the trainer.
"""

from __future__ import annotations

import bisect
import errno
import io
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from shared.files import atomic_write, sha256_file

MANIFEST = "manifest.json"
FORMAT_NAME = "retnet-distill-shards"
FORMAT_VERSION = 1
_FILES = ("tokens", "mask", "lengths")
_FAULT_AROUND_BYTES = 2 << 20


class ShardError(RuntimeError):
    """A shard set that is missing, truncated, corrupted or inconsistent with its manifest."""


def _save_npy(path: Path, array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())
    return sha256_file(path)


class ShardWriter:
    """Collects rows of one split and writes them as shards of ``rows_per_shard`` rows."""

    def __init__(self, folder: Path, split: str, seq_len: int, pad_id: int, rows_per_shard: int) -> None:
        self.folder, self.split, self.seq_len, self.pad_id = folder, split, seq_len, pad_id
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict[str, Any]] = []
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._lengths: list[int] = []

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Add one row of at most ``seq_len`` tokens; it is right-padded with ``pad_id`` and mask 0."""
        n = len(tokens)
        assert 0 < n <= self.seq_len and len(mask) == n
        row = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        row[:n] = tokens
        row_mask = np.zeros(self.seq_len, dtype=np.uint8)
        row_mask[:n] = mask
        self._tokens.append(row)
        self._masks.append(row_mask)
        self._lengths.append(n)
        if len(self._lengths) == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._lengths:
            return
        index = len(self.shards)
        arrays = {
            "tokens": np.stack(self._tokens),
            "mask": np.stack(self._masks),
            "lengths": np.asarray(self._lengths, dtype=np.int32),
        }
        record: dict[str, Any] = {"rows": len(self._lengths), "files": {}, "sha256": {}}
        for name, array in arrays.items():
            filename = f"{self.split}-{index:05d}.{name}.npy"
            record["sha256"][name] = _save_npy(self.folder / filename, array)
            record["files"][name] = filename
        self.shards.append(record)
        self._tokens, self._masks, self._lengths = [], [], []


def _open_nofollow(path: Path) -> int:
    """A read-only descriptor of ``path`` that refuses a symlink there (servers confined to a root)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ShardError(f"{path.name} is a symlink; only regular files are read here") from None
        raise ShardError(f"{path.name} cannot be opened ({exc.strerror})") from None


def read_manifest(folder: str | Path, follow_symlinks: bool = True) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: expected a shard folder written by `retnet-distill preprocess`")
    if follow_symlinks:
        manifest = json.loads(path.read_text())
    else:
        with os.fdopen(_open_nofollow(path), "rb") as fh:
            manifest = json.loads(fh.read())
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return manifest


class _ShardFiles:
    """Memory maps of one shard."""

    def __init__(self, folder: Path, record: dict[str, Any], seq_len: int, follow_symlinks: bool = True) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        shapes = {"tokens": (record["rows"], seq_len), "mask": (record["rows"], seq_len), "lengths": (record["rows"],)}
        for name in _FILES:
            path = folder / record["files"][name]
            if not path.is_file():
                raise ShardError(f"shard file {path} is missing")
            try:
                if follow_symlinks:
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
                else:  # map the very file opened without following a link (a swap cannot redirect it)
                    fd = _open_nofollow(path)
                    try:
                        array = np.load(f"/proc/self/fd/{fd}", mmap_mode="r", allow_pickle=False)
                    finally:
                        os.close(fd)  # the mapping keeps the file
            except (ValueError, OSError) as exc:
                raise ShardError(f"shard file {path} is truncated or corrupted: {exc}") from exc
            if array.shape != shapes[name]:
                raise ShardError(f"shard file {path} has shape {array.shape}, the manifest says {shapes[name]}")
            self.arrays[name] = array

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        tokens = np.array(self.arrays["tokens"][i])  # copies: the caller owns its row
        mask = np.array(self.arrays["mask"][i])
        return tokens, mask, int(self.arrays["lengths"][i])

    def release(self) -> None:
        """Drop this process's mapped pages (they stay in the page cache, so re-reading is cheap)."""
        for array in self.arrays.values():
            raw = getattr(array, "_mmap", None)
            if raw is not None:
                raw.madvise(mmap.MADV_DONTNEED)


class TokenShardReader:
    """Random access to the rows of one split of a shard folder, memory-mapped, with flat RSS.

    Rows are copied out of memory maps whose pages are released every ``release_bytes`` of
    reads, so RAM stays flat however large the data.

    Args:
        folder: a folder written by ``retnet-distill preprocess``.
        split: ``train`` or ``val``.
        verify: check every shard file's sha256 against the manifest (reads all data once).
        release_bytes: how much is read between releases of mapped pages.
        follow_symlinks: False refuses a symlinked manifest or shard file, and maps the files it
            opened (the teacher service's cache jobs, confined to ``TEACHER_DATA_ROOT``; Linux).
    """

    def __init__(self, folder: str | Path, split: str = "train", verify: bool = False, release_bytes: int = 64 << 20,
                 follow_symlinks: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, follow_symlinks)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ShardError(f"{self.folder} has no split {split!r}; it has {sorted(splits)}")
        self.split = split
        self.seq_len: int = self.manifest["max_seq_length"]
        records = splits[split]["shards"]
        if verify:
            for record in records:
                for name in _FILES:
                    path = self.folder / record["files"][name]
                    if not path.is_file():
                        raise ShardError(f"shard file {path} is missing")
                    if sha256_file(path) != record["sha256"][name]:
                        raise ShardError(f"shard file {path} is corrupted: its sha256 does not match the manifest")
        self._shards = [_ShardFiles(self.folder, record, self.seq_len, follow_symlinks) for record in records]
        self.release_bytes = release_bytes
        self._read_since_release = 0
        self._starts = list(np.cumsum([0] + [record["rows"] for record in records])[:-1])
        self._rows = sum(record["rows"] for record in records)

    def __len__(self) -> int:
        return self._rows

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``(tokens [L] int32, mask [L] uint8, length)`` of row ``index`` (copies the caller owns)."""
        if not 0 <= index < self._rows:
            raise IndexError(f"row {index} out of range for {self._rows} rows")
        shard = bisect.bisect_right(self._starts, index) - 1
        tokens, mask, length = self._shards[shard].row(index - self._starts[shard])
        # A page fault can map a whole large folio of the page cache (up to 2 MB) into this
        # process, so each array access counts as that much RSS until the next release.
        self._read_since_release += tokens.nbytes + mask.nbytes + 2 * _FAULT_AROUND_BYTES
        if self._read_since_release >= self.release_bytes:
            for each in self._shards:
                each.release()
            self._read_since_release = 0
        return tokens, mask, length

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]
