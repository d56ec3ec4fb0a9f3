"""Memory-mapped reading of a teacher cache v1 (format in :mod:`shared.cache_format`).

Each shard file is parsed by hand (safetensors: 8-byte little-endian header size, a JSON header of
``{name: {"dtype", "shape", "data_offsets"}}``, then the data buffer) and mapped once; tensors are
numpy views into that mapping, so a lookup touches only the pages of the rows it reads. Shards are
mapped on first use, but every file's size and header are checked when the reader opens.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from shared.cache_format import (
    CODED_TARGET_TYPES,
    CacheCorrupted,
    CacheMismatch,
    CacheMiss,
    CacheSpec,
    dequantize_q8,
    index_dtype,
    read_manifest,
    sha256_file,
)

# safetensors dtype names -> little-endian numpy dtypes (only what a cache may hold).
_DTYPES = {name: np.dtype(code) for name, code in
           {"U8": "<u1", "U16": "<u2", "I32": "<i4", "I64": "<i8", "F16": "<f2", "F32": "<f4"}.items()}
_MAX_HEADER_BYTES = 100 << 20  # the safetensors limit; a bigger "size" means a corrupted file


class CachedRow(NamedTuple):
    """One cached dataset row; unpacks as ``(input_ids, length, indices, logprobs, tail_logprob)``.

    Attributes:
        input_ids: ``[L]`` int32, the dataset row with its right padding.
        length: real tokens in the row (``n``).
        indices: ``[n, k]`` uint16 or int32 (as stored) teacher ids.
        logprobs: ``[n, k]`` float32 (fp16 widened, q8 dequantised), ``-inf`` kept.
        tail_logprob: ``[n]`` float32.
    """

    input_ids: np.ndarray
    length: int
    indices: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file, every tensor's extent checked against the file.

    Returns the JSON header (``__metadata__`` included) and the file offset of the data buffer.

    Raises:
        CacheCorrupted: naming ``path``, when the file is too short, the header is not JSON, a dtype
            is unknown, or a tensor's ``data_offsets`` disagree with its shape or the file size.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CacheCorrupted(f"{path}: {size} bytes, too short for a safetensors file (truncated)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CacheCorrupted(f"{path}: header claims {header_len} bytes but the file has {size} "
                                 "(truncated or corrupted)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheCorrupted(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CacheCorrupted(f"{path}: safetensors header is not a JSON object")
    data_start, buffer_len = 8 + header_len, size - 8 - header_len
    end_of_data = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheCorrupted(f"{path}: tensor {name!r} has a bad header entry {info!r}") from exc
        if not 0 <= begin <= end <= buffer_len or end - begin != math.prod(shape) * dtype.itemsize:
            raise CacheCorrupted(f"{path}: tensor {name!r} {info['dtype']}{shape} at bytes [{begin}, {end}) does not "
                                 f"fit the {buffer_len}-byte data buffer (truncated or corrupted)")
        end_of_data = max(end_of_data, end)
    if end_of_data != buffer_len:
        raise CacheCorrupted(f"{path}: tensors end at byte {end_of_data} of a {buffer_len}-byte data buffer")
    return header, data_start


class VerifiedStamps:
    """``verified.json``: shards whose sha256 was checked, by file name, with the size and mtime they had.

    A rewritten or altered file changes its size or mtime and is checked again. Written atomically
    (temporary file + rename); a read-only cache folder keeps the stamps in memory only.
    """

    NAME = "verified.json"

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.NAME
        try:
            loaded = json.loads(self.path.read_text())
            self.entries: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def _identity(path: Path, sha256: str) -> dict[str, Any]:
        stat = path.stat()
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}

    def covers(self, path: Path, sha256: str) -> bool:
        return self.entries.get(path.name) == self._identity(path, sha256)

    def add(self, path: Path, sha256: str) -> None:
        self.entries[path.name] = self._identity(path, sha256)
        staging = self.path.with_name(f".{self.NAME}.{os.getpid()}.tmp")
        try:
            staging.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
            os.replace(staging, self.path)
        except OSError:  # read-only cache: remember for this process only
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)


class _Shard:
    """One shard's tensors, checked against the manifest at open, mapped on first use."""

    def __init__(self, directory: Path, record: dict[str, Any], spec: CacheSpec, verify: bool | str) -> None:
        self.path, self.record = directory / record["file"], record
        self.stamps: VerifiedStamps | None = None  # set by the reader when the sha256 is checked at first read
        self.first, self.count = int(record["first"]), int(record["count"])
        if not self.path.is_file():
            raise CacheCorrupted(f"{self.path} is listed in the manifest but missing; "
                                 "resume the cache writer to rewrite it")
        size = self.path.stat().st_size
        if size != record["bytes"]:
            raise CacheCorrupted(f"{self.path} has {size} bytes, the manifest says {record['bytes']} (truncated or "
                                 "overwritten); resume the cache writer to rewrite it")
        if verify is True:
            self.verify()
        self.header, self.data_start = read_safetensors_header(self.path)
        rows, k, width = int(record["rows"]), spec.k, spec.max_seq_length
        logprobs = ("logprobs_q8", "U8") if spec.target_type == "topk_q8" else ("logprobs", "F16")
        ids = "U16" if index_dtype(spec.vocab_size).itemsize == 2 else "I32"
        expected = {"input_ids": ("I32", [self.count, width]), "lengths": ("I32", [self.count]),
                    "indices": (ids, [rows, k]), logprobs[0]: (logprobs[1], [rows, k]), "tail_logprob": ("F32", [rows])}
        if spec.target_type in CODED_TARGET_TYPES:  # one codec block per sequence (shared.cache_coded)
            expected = {"input_ids": expected["input_ids"], "lengths": expected["lengths"],
                        "targets_coded": ("U8", [record.get("target_bytes")]), "target_offsets": ("I64", [self.count + 1])}
        found = {n: (i["dtype"], i["shape"]) for n, i in self.header.items() if n != "__metadata__"}
        if found != expected:
            raise CacheCorrupted(f"{self.path}: tensors {found} do not match the manifest's {expected}")
        self.step, self.spec = spec.q8_step, spec
        self.tensors: dict[str, np.ndarray] | None = None
        self.offsets: np.ndarray | None = None

    def verify(self) -> None:
        """Check the file's sha256 against the manifest (the page cache keeps it for the mapping)."""
        digest = sha256_file(self.path)
        if digest != self.record["sha256"]:
            raise CacheCorrupted(f"{self.path}: sha256 {digest} does not match the manifest's {self.record['sha256']}; "
                                 "the file was altered: delete it and resume the cache writer")

    def _map(self) -> dict[str, np.ndarray]:
        if self.stamps is not None:  # first read: verify once (a stamp remembers it for later runs)
            if not self.stamps.covers(self.path, self.record["sha256"]):
                self.verify()
                self.stamps.add(self.path, self.record["sha256"])
            self.stamps = None
        with open(self.path, "rb") as fh:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        tensors = {}
        for name, info in self.header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                dtype = _DTYPES[info["dtype"]]
                count, offset = (end - begin) // dtype.itemsize, self.data_start + begin
                tensors[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(info["shape"])
        self.offsets = np.concatenate([[0], np.cumsum(tensors["lengths"], dtype=np.int64)])
        if self.offsets[-1] != self.record["rows"]:
            raise CacheCorrupted(f"{self.path}: lengths sum to {self.offsets[-1]}, "
                                 f"the manifest says {self.record['rows']} rows")
        self.tensors = tensors
        return tensors

    def _coded_row(self, tensors: dict[str, np.ndarray], i: int, rows: int) -> tuple[np.ndarray, ...]:
        from shared.cache_coded import decode_sequence

        offsets, blob = tensors["target_offsets"], tensors["targets_coded"]
        start, stop = int(offsets[i]), int(offsets[i + 1])
        if not 0 <= start <= stop <= blob.size:
            raise CacheCorrupted(f"{self.path}: sequence {self.first + i}'s coded block [{start}, {stop}) lies outside "
                                 f"the {blob.size}-byte targets; delete the shard and resume the cache writer")
        return tuple(decode_sequence(self.spec, blob[start:stop].tobytes(), rows, f"{self.path} row {self.first + i}"))

    def unmap(self) -> None:
        self.tensors, self.offsets = None, None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers: send the small header, never the mapped data.
        return {**self.__dict__, "tensors": None, "offsets": None}

    def row(self, i: int) -> CachedRow:
        """Row ``i`` of this shard (``0 <= i < count``), copied out of the mapping."""
        tensors = self.tensors if self.tensors is not None else self._map()
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if "targets_coded" in tensors:
            return CachedRow(np.array(tensors["input_ids"][i]), b - a, *self._coded_row(tensors, i, b - a))
        if "logprobs_q8" in tensors:
            logprobs = dequantize_q8(tensors["logprobs_q8"][a:b], self.step)
        else:
            logprobs = tensors["logprobs"][a:b].astype(np.float32)
        return CachedRow(np.array(tensors["input_ids"][i]), b - a, np.array(tensors["indices"][a:b]), logprobs,
                         np.array(tensors["tail_logprob"][a:b]))


class CacheReader:
    """Looks teacher targets up by dataset row index in the cache at ``directory``.

    Args:
        directory: a cache written by :class:`shared.cache_format.CacheWriter` (complete or not).
        verify: ``True``: check every shard's sha256 against the manifest now (reads all data);
            ``"first_read"``: check each shard when its first row is read, and only once per file
            version: a ``verified.json`` stamp beside the manifest (when the folder is writable)
            records the size, mtime and sha256 of shards already checked, so a later run does not
            hash a 0.4 TB cache again before training; ``False``: sizes and headers only.

    Raises:
        CacheError: no manifest or another format/version; CacheCorrupted: a listed shard is
            missing, has the wrong size, a broken header, or (``verify``) the wrong sha256.
    """

    def __init__(self, directory: str | Path, verify: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.spec = CacheSpec.from_manifest(self.manifest)
        self._shards: dict[int, _Shard] = {}
        if verify not in (True, False, "first_read"):
            raise ValueError(f"verify must be True, False or 'first_read', found {verify!r}")
        stamps = VerifiedStamps(self.directory) if verify == "first_read" else None
        for record in self.manifest.get("shards", []):
            shard = _Shard(self.directory, record, self.spec, verify)
            shard.stamps = stamps
            if (shard.first, shard.count) != self.spec.shard_range(int(record["index"])):
                raise CacheCorrupted(f"{shard.path}: rows {shard.first}+{shard.count} disagree with "
                                     f"shard_size {self.spec.shard_size}")
            self._shards[int(record["index"])] = shard

    @property
    def complete(self) -> bool:
        return len(self._shards) == self.spec.num_shards

    def __len__(self) -> int:
        """Rows in the dataset split (cached or not)."""
        return self.spec.num_sequences

    def has_row(self, row_index: int) -> bool:
        return 0 <= row_index < self.spec.num_sequences and row_index // self.spec.shard_size in self._shards

    def lookup(self, row_index: int) -> CachedRow:
        """Teacher targets of dataset row ``row_index`` (see :class:`CachedRow` for shapes).

        Raises:
            CacheMiss: the row is outside the split or its shard has not been written yet.
        """
        spec = self.spec
        row_index = int(row_index)
        if not 0 <= row_index < spec.num_sequences:
            raise CacheMiss(f"row {row_index} is outside split {spec.split!r} of the cached dataset "
                            f"({spec.num_sequences} rows, fingerprint {spec.dataset_fingerprint[:12]})")
        index = row_index // spec.shard_size
        shard = self._shards.get(index)
        if shard is None:
            first, count = spec.shard_range(index)
            raise CacheMiss(f"row {row_index} is in shard {index} (rows {first}..{first + count - 1}), which "
                            f"{self.directory} does not have: the cache is incomplete ({len(self._shards)}/"
                            f"{spec.num_shards} shards); resume the cache writer or train without the cache")
        return shard.row(row_index - shard.first)

    def lookup_many(self, row_indices: list[int] | np.ndarray) -> list[CachedRow]:
        """:meth:`lookup` for each index, in the given order (read in row order, for locality)."""
        order = sorted(range(len(row_indices)), key=lambda j: int(row_indices[j]))
        out: list[CachedRow | None] = [None] * len(order)
        for j in order:
            out[j] = self.lookup(row_indices[j])
        return out  # type: ignore[return-value]

    def check_input_ids(self, row_index: int, input_ids: np.ndarray) -> None:
        """Raise :class:`CacheMismatch` unless the cached row equals the dataset's ``input_ids [L]``."""
        cached = self.lookup(row_index).input_ids
        given = np.asarray(input_ids).reshape(-1)
        if cached.shape != given.shape or not np.array_equal(cached, given):
            where = "shape" if cached.shape != given.shape else f"position {int(np.flatnonzero(cached != given)[0])}"
            raise CacheMismatch(f"dataset row {row_index} differs from the cached one ({where}): the cache at "
                                f"{self.directory} was made for another dataset; rebuild it for this one")

    def check_compatible(self, **expected: Any) -> None:
        """Raise :class:`CacheMismatch` naming every spec field that differs from ``expected``.

        Example: ``reader.check_compatible(k=32, temperature=1.0, tokenizer_sha256=sha)`` raises
        "cache was made for k=64, this run asks for k=32" when the cache holds k = 64.
        """
        known = set(CacheSpec.__dataclass_fields__)
        unknown = set(expected) - known
        if unknown:
            raise TypeError(f"check_compatible got unknown field(s) {sorted(unknown)}; "
                            f"expected some of {sorted(known)}")
        diffs = [f"cache was made for {name}={getattr(self.spec, name)!r}, this run asks for {name}={value!r}"
                 for name, value in expected.items() if getattr(self.spec, name) != value]
        if diffs:
            raise CacheMismatch(f"teacher cache {self.directory} does not fit this run: " + "; ".join(diffs)
                                + ". Rebuild the cache with these settings, or change the run to match it")

    def close(self) -> None:
        """Drop the mappings (rows handed out are copies, so nothing dangles); a later lookup maps again."""
        for shard in self._shards.values():
            shard.unmap()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
