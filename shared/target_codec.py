"""Compact teacher targets: coded top-k and sampled ids, for the cache and the wire (issue 17).

A *block* codes ``R`` target rows ``indices [R, k]``, ``logprobs [R, k]`` (float, ``-inf`` = zero mass
or padding), ``tail_logprob [R]`` into bytes, and decodes them back into the same three arrays the
trainer consumes (:class:`shared.cache_reader.CachedRow`, :class:`student_trainer.teachers.targets.TeacherTargets`).

Two kinds:

- ``topk_coded``: per row the entries with mass, optionally cut once the kept mass reaches ``1 - eps``
  (the dropped mass is folded exactly into the tail, in float64), so peaked rows carry few ids. Ids
  are stored as a *set* (ascending, delta-coded: the loss is order-free, and a set saves
  ``log2(k!)`` bits a row over a ranking); log-probs are quantised on a companded grid (below); the
  tail is float32, exact. Decoding sorts each row back by descending probability.
- ``sampled`` (Anshumann et al., ACL 2025): ``n`` ids drawn from the teacher's distribution, stored
  as unique ids + counts; they decode as ``logprobs = log(count / n)``, ``tail = -inf``, which makes
  the forward-KL gradient an unbiased estimate of the dense one (``tests/test_target_codec_sampled.py``).

Log-prob grid (``topk_coded``), with ``x = -logprob >= 0``, ``step`` and ``knee`` (nats)::

    code = rint(knee * log1p(x / knee) / step)        (uint16, clipped at 65534)
    x'   = knee * expm1(code * step / knee)           (decoded; knee = 0 means uniform: x' = code * step)
    |x' - x| <= step / 2 * (1 + x / knee) * exp(step / (2 * knee))      (uniform: step / 2)

so the top of a row (``x`` near 0) is as fine as ``step`` and the error grows only where the mass
is small (``p * |dlogp|`` falls like ``x * exp(-x)``). Defaults ``step = 1/64``, ``knee = 0.5``: the bound
is 0.008 nats at the top, 0.09 at ``x = 5``, 0.32 at ``x = 20`` (measured on SmolLM2 targets, this
beats ``step = 1/16``, ``knee = 4`` on both size and total variation; ``benchmarks/bench_codec.py``).

Layout: a 48-byte header ``<4sBBHIIffHBB5I`` = magic ``RDTC``, version, kind, k, rows, vocab_size,
step, knee, n (sampled), index bytes (2 or 3), raw-section flags, section sizes, then a CRC32 (over
header and payload) and the payload: five sections (row lengths, id deltas as byte planes, log-prob
codes as byte planes (one plane when every code is < 256: header flag bit 5), tail float32 as
byte planes, counts), each a zstd frame, or the raw bytes
where zstd would not make them smaller (flag bit ``i``), or nothing when empty. :func:`decode` checks the magic, version,
sizes, the CRC, every frame's length, row lengths <= k, ids ascending and < vocab_size, counts
summing to ``n``, and raises :class:`TargetCodecError` on any mismatch, so corrupt bytes are
refused, never decoded into wrong targets.
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from typing import NamedTuple

import numpy as np
import zstandard

from shared.cache_format import DEFAULT_CODE_KNEE, DEFAULT_CODE_STEP, CacheCorrupted

MAGIC = b"RDTC"
VERSION = 1
KINDS = {"topk_coded": 1, "sampled": 2}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
_HEADER = struct.Struct("<4sBBHIIffHBB5I")
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _CRC.size
DEFAULT_STEP = DEFAULT_CODE_STEP
DEFAULT_KNEE = DEFAULT_CODE_KNEE
DEFAULT_LEVEL = 9
_MAX_CODE = 65534  # code 65535 marks a padding entry while decoding (it decodes to -inf)
_PAD_CODE = 65535
_ONE_BYTE_CODES_BIT = 5  # header flag: every log-prob code is < 256 and is stored in one byte plane
_POSITIVE_TOLERANCE = 1e-2  # log-probs a little above 0 are log_softmax rounding noise


class TargetCodecError(CacheCorrupted):
    """Coded targets are truncated, altered or inconsistent: refused, never decoded."""


class Targets(NamedTuple):
    """Decoded rows: ``indices [R, k]`` (uint16 or int32), ``logprobs [R, k]`` float32, ``tail_logprob [R]`` float32."""

    indices: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray


def index_bytes(vocab_size: int) -> int:
    """Bytes per coded id: 2 when every id fits 16 bits, else 3 (vocab_size <= 2**24)."""
    if not 1 <= vocab_size <= 1 << 24:
        raise ValueError(f"vocab_size must be in [1, 2**24], found {vocab_size}")
    return 2 if vocab_size <= 1 << 16 else 3


def error_bound(logprobs: np.ndarray, step: float, knee: float) -> np.ndarray:
    """The documented bound on ``|decoded - original|`` for finite ``logprobs [...]`` (module docstring)."""
    if knee == 0:
        return np.full(np.shape(logprobs), step / 2)
    x = np.maximum(-np.asarray(logprobs, dtype=np.float64), 0.0)
    return step / 2 * (1 + x / knee) * np.exp(step / (2 * knee))


def quantize(logprobs: np.ndarray, step: float, knee: float) -> np.ndarray:
    """Finite log-probs ``[E]`` -> uint16 codes ``[E]`` on the companded grid."""
    x = np.maximum(-logprobs.astype(np.float64), 0.0)
    y = x if knee == 0 else knee * np.log1p(x / knee)
    return np.minimum(np.rint(y / step), _MAX_CODE).astype("<u2")


@functools.lru_cache(maxsize=16)
def _code_table(step: float, knee: float) -> np.ndarray:
    """float32 ``[65536]``: the log-prob of each code; the padding code decodes to ``-inf``."""
    y = np.arange(_PAD_CODE + 1, dtype=np.float64) * step
    with np.errstate(over="ignore"):
        x = y if knee == 0 else knee * np.expm1(y / knee)
        table = (-x).astype(np.float32)  # overflow -> -inf: zero mass, as it was
    table[_PAD_CODE] = -np.inf
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=16)
def _count_table(n: int) -> np.ndarray:
    """float32 ``[65536]``: sampled rank code ``255 - count`` -> ``log(count / n)``; padding -> ``-inf``."""
    table = np.full(_PAD_CODE + 1, -np.inf, dtype=np.float32)
    with np.errstate(divide="ignore"):
        table[:256] = np.log((255 - np.arange(256, dtype=np.float64)) / n).astype(np.float32)
    table.setflags(write=False)
    return table


def dequantize(codes: np.ndarray, step: float, knee: float) -> np.ndarray:
    """uint16 codes ``[E]`` -> float32 log-probs ``[E]`` (a table lookup)."""
    return _code_table(float(np.float32(step)), float(np.float32(knee)))[codes]


# ------------------------------------------------------------------------------ byte helpers


def _planes(values: np.ndarray, nbytes: int) -> bytes:
    """Little-endian ``values [E]`` -> their low ``nbytes`` bytes, plane after plane (byte 0 of all, ...)."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), values.dtype.itemsize)
    return np.ascontiguousarray(raw[:, :nbytes].T).tobytes()


def _unplanes(data: bytes, count: int, nbytes: int, dtype: str) -> np.ndarray:
    """Inverse of :func:`_planes` into a ``dtype`` array ``[count]`` (upper bytes zero)."""
    width = np.dtype(dtype).itemsize
    out = (np.empty if width == nbytes else np.zeros)((count, width), dtype=np.uint8)
    planes = np.frombuffer(data, dtype=np.uint8).reshape(nbytes, count)
    for j in range(nbytes):  # one contiguous plane at a time: much faster than a 2-D transposed copy
        out[:, j] = planes[j]
    return out.view(dtype).reshape(count)


def _row_starts(lengths: np.ndarray) -> np.ndarray:
    """``[R + 1]`` int64 offsets of each row's first entry in the flat arrays."""
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def _delta_code(ids: np.ndarray, starts: np.ndarray, nbytes: int) -> bytes:
    """Ascending ids per row ``[E]`` -> deltas (the first of a row is the id itself) as byte planes."""
    deltas = ids.astype("<i4")
    deltas[1:] -= ids[:-1]
    first = starts[:-1][starts[:-1] < starts[1:]]
    deltas[first] = ids[first]
    return _planes(deltas, nbytes)


def _frame(data: bytes, level: int) -> tuple[bytes, bool]:
    """``(stored bytes, raw)``: a zstd frame, or ``data`` itself when that is no longer (small sections)."""
    if not data:
        return b"", True
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    return (data, True) if len(frame) >= len(data) else (frame, False)


_LOCAL = threading.local()  # one zstd context per thread: contexts are not thread-safe, and costly to make


def _unframe(frame: bytes, expected: int, what: str, raw: bool = False) -> bytes:
    if raw:
        if len(frame) != expected:
            raise TargetCodecError(f"coded targets: the {what} section holds {len(frame)} bytes, expected {expected}")
        return frame
    if not hasattr(_LOCAL, "dctx"):
        _LOCAL.dctx = zstandard.ZstdDecompressor()
    try:
        data = _LOCAL.dctx.decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise TargetCodecError(f"coded targets: the {what} section does not decompress ({exc})") from None
    if len(data) != expected:
        raise TargetCodecError(f"coded targets: the {what} section holds {len(data)} bytes, expected {expected}")
    return data


def _pack(kind: str, k: int, rows: int, vocab_size: int, step: float, knee: float, n: int,
          sections: list[bytes], level: int, one_byte_codes: bool = False) -> bytes:
    stored = [_frame(s, level) for s in sections]
    flags = sum(1 << i for i, (_, raw) in enumerate(stored) if raw) | (int(one_byte_codes) << _ONE_BYTE_CODES_BIT)
    header = _HEADER.pack(MAGIC, VERSION, KINDS[kind], k, rows, vocab_size, step, knee, n,
                          index_bytes(vocab_size), flags, *(len(f) for f, _ in stored))
    payload = b"".join(f for f, _ in stored)
    return header + _CRC.pack(zlib.crc32(payload, zlib.crc32(header))) + payload


def _check_inputs(indices: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> None:
    if indices.ndim != 2 or logprobs.shape != indices.shape:
        raise ValueError(f"expected indices and logprobs of one shape [R, k], found {list(indices.shape)} and "
                         f"{list(logprobs.shape)}")
    if indices.dtype.kind not in "iu" or logprobs.dtype.kind != "f":
        raise ValueError(f"expected integer indices and float logprobs, found {indices.dtype} and {logprobs.dtype}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= vocab_size):
        raise ValueError(f"indices must be in [0, {vocab_size}), found [{indices.min()}, {indices.max()}]")
    bad = np.isnan(logprobs) | (logprobs > _POSITIVE_TOLERANCE)
    if bad.any():
        raise ValueError(f"logprobs must be log-probabilities (<= 0 or -inf), found {int(bad.sum())} NaN or "
                         f"positive values such as {logprobs[bad].flat[0]}")


def _set_rows(indices: np.ndarray, keep: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each row's kept entries by id: ``(order [R, k], lengths [R], flat kept mask [R, k])``."""
    key = np.where(keep, indices.astype(np.int64), vocab_size)  # dropped entries sort last
    order = np.argsort(key, axis=1, kind="stable")
    lengths = keep.sum(axis=1)
    packed = np.arange(indices.shape[1]) < lengths[:, None]
    sorted_ids = np.take_along_axis(indices, order, axis=1)[packed]
    starts = _row_starts(lengths)
    same = sorted_ids[1:] == sorted_ids[:-1]
    inner = starts[1:-1]
    same[inner[(inner > 0) & (inner < len(sorted_ids))] - 1] = False  # a row may start with its predecessor's last id
    if same.any():
        raise ValueError("each row's indices must be unique among its entries with mass; found a repeated id "
                         f"{sorted_ids[1:][same][0]} (sampled targets: pass unique ids and counts)")
    return order, lengths, packed


# ------------------------------------------------------------------------------------ top-k


def encode_topk(indices: np.ndarray, logprobs: np.ndarray, tail_logprob: np.ndarray, vocab_size: int,
                step: float = DEFAULT_STEP, knee: float = DEFAULT_KNEE, eps: float = 0.0,
                level: int = DEFAULT_LEVEL) -> bytes:
    """Code ``indices [R, k]``, ``logprobs [R, k]``, ``tail_logprob [R]`` as a ``topk_coded`` block.

    Entries with ``-inf`` log-prob are dropped (they are no bucket of the loss). ``eps > 0``: per row,
    the least probable entries are dropped while their summed probability stays ``<= eps``, and
    that mass is added to the tail: ``tail' = log(exp(tail) + dropped)`` in float64.
    """
    indices, logprobs = np.asarray(indices), np.asarray(logprobs)
    tail = np.asarray(tail_logprob, dtype=np.float32)
    step, knee = float(np.float32(step)), float(np.float32(knee))  # as the header stores them
    _check_inputs(indices, logprobs, vocab_size)
    rows, k = indices.shape
    if tail.shape != (rows,) or np.isnan(tail).any() or (tail > _POSITIVE_TOLERANCE).any():
        raise ValueError(f"tail_logprob must be [{rows}] log-probabilities, found shape {list(tail.shape)}")
    if not (0 < step <= 1 and knee >= 0 and 0 <= eps < 1 and k <= 65535):
        raise ValueError(f"need 0 < step <= 1, knee >= 0, 0 <= eps < 1 and k <= 65535; found step={step}, "
                         f"knee={knee}, eps={eps}, k={k}")
    keep = np.isfinite(logprobs)
    if eps > 0 and rows:
        by_mass = np.argsort(-logprobs, axis=1, kind="stable")
        p = np.exp(np.take_along_axis(logprobs, by_mass, axis=1).astype(np.float64))
        suffix = np.cumsum(p[:, ::-1], axis=1)[:, ::-1]  # mass from each rank to the end
        cut = (suffix <= eps) & (np.arange(k) > 0)  # the top entry always stays
        dropped = np.where(cut, p, 0.0).sum(axis=1)
        np.put_along_axis(keep, by_mass, np.take_along_axis(keep, by_mass, axis=1) & ~cut, axis=1)
        folded = np.logaddexp(tail.astype(np.float64), np.log(np.where(dropped > 0, dropped, 1.0)))
        tail = np.where(dropped > 0, np.minimum(folded, 0.0), tail).astype(np.float32)
    order, lengths, packed = _set_rows(indices, keep, vocab_size)
    ids = np.take_along_axis(indices, order, axis=1)[packed]
    codes = quantize(np.take_along_axis(logprobs, order, axis=1)[packed], step, knee)
    nbytes = index_bytes(vocab_size)
    length_dtype = "<u1" if k <= 255 else "<u2"
    one_byte = not codes.size or int(codes.max()) < 256  # always, with the default grid, for x < 1450 nats
    sections = [lengths.astype(length_dtype).tobytes(), _delta_code(ids, _row_starts(lengths), nbytes),
                _planes(codes, 1 if one_byte else 2), _planes(tail, 4), b""]
    return _pack("topk_coded", k, rows, vocab_size, step, knee, 0, sections, level, one_byte)


# ---------------------------------------------------------------------------------- sampled


def encode_sampled(indices: np.ndarray, counts: np.ndarray, n: int, vocab_size: int,
                   level: int = DEFAULT_LEVEL) -> bytes:
    """Code sampled targets: unique ``indices [R, m]`` with ``counts [R, m]`` (0 = padding), each row's counts summing to ``n``."""
    indices, counts = np.asarray(indices), np.asarray(counts)
    if counts.shape != indices.shape or counts.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise ValueError(f"expected integer indices and counts of one shape [R, m], found {list(indices.shape)} "
                         f"{indices.dtype} and {list(counts.shape)} {counts.dtype}")
    if not 1 <= n <= 255 or indices.ndim != 2 or indices.shape[1] > n:
        raise ValueError(f"need 1 <= n <= 255 draws and at most n columns, found n={n}, shape {list(indices.shape)}")
    rows = indices.shape[0]
    if counts.size and (counts.min() < 0 or (counts.sum(axis=1) != n).any()):
        raise ValueError(f"counts must be >= 0 and sum to n={n} in every row; found row sums "
                         f"{np.unique(counts.sum(axis=1))[:5]}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= vocab_size):
        raise ValueError(f"indices must be in [0, {vocab_size}), found [{indices.min()}, {indices.max()}]")
    order, lengths, packed = _set_rows(indices, counts > 0, vocab_size)
    ids = np.take_along_axis(indices, order, axis=1)[packed]
    kept = np.take_along_axis(counts, order, axis=1)[packed].astype("<u1")
    sections = [lengths.astype("<u1").tobytes(), _delta_code(ids, _row_starts(lengths), index_bytes(vocab_size)),
                b"", b"", kept.tobytes()]
    return _pack("sampled", n, rows, vocab_size, 0.0, 0.0, n, sections, level)


def sampled_from_targets(indices: np.ndarray, logprobs: np.ndarray, n: int) -> np.ndarray:
    """Counts ``[R, k]`` back from sampled targets given as ``logprobs = log(count / n)`` (``-inf`` = 0).

    Raises:
        ValueError: a log-prob is not ``log(c / n)`` for an integer ``c`` (these are not sampled targets).
    """
    counts_f = n * np.exp(np.asarray(logprobs, dtype=np.float64))
    counts = np.rint(counts_f)
    if not np.allclose(counts_f, counts, rtol=0, atol=1e-2):
        raise ValueError(f"sampled targets must have logprobs = log(count / {n}) for integer counts; found "
                         f"n * p = {counts_f[np.abs(counts_f - counts) > 1e-2][:3]}; were they made with another n?")
    return counts.astype(np.int64)


# ----------------------------------------------------------------------------------- decode


def read_header(block: bytes) -> dict:
    """The header fields of a coded block, after checking magic, version, kind, sizes and the CRC."""
    if len(block) < HEADER_BYTES:
        raise TargetCodecError(f"coded targets: {len(block)} bytes, shorter than the {HEADER_BYTES}-byte header "
                               "(truncated)")
    fields = _HEADER.unpack_from(block)
    magic, version, kind, k, rows, vocab, step, knee, n, nbytes, flags = fields[:11]
    sizes = list(fields[11:])
    if magic != MAGIC:
        raise TargetCodecError(f"coded targets: magic {magic!r}, expected {MAGIC!r} (not a target block)")
    if version != VERSION:
        raise TargetCodecError(f"coded targets: version {version}, this code reads version {VERSION}; "
                               "rewrite them with this version")
    if kind not in _KIND_NAMES:
        raise TargetCodecError(f"coded targets: kind {kind}, expected one of {sorted(_KIND_NAMES)}")
    if len(block) != HEADER_BYTES + sum(sizes):
        raise TargetCodecError(f"coded targets: {len(block)} bytes, the header says {HEADER_BYTES + sum(sizes)} "
                               "(truncated or padded)")
    (crc,) = _CRC.unpack_from(block, _HEADER.size)
    payload = memoryview(block)[HEADER_BYTES:]
    if zlib.crc32(payload, zlib.crc32(memoryview(block)[:_HEADER.size])) != crc:
        raise TargetCodecError("coded targets: CRC32 mismatch, the bytes were altered; rewrite or resend them")
    if nbytes != index_bytes(vocab) or (kind == KINDS["sampled"] and n != k) or flags >> (_ONE_BYTE_CODES_BIT + 1):
        raise TargetCodecError(f"coded targets: inconsistent header (index bytes {nbytes}, vocab {vocab}, n {n}, k {k})")
    return {"kind": _KIND_NAMES[kind], "k": k, "rows": rows, "vocab_size": vocab, "step": step, "knee": knee,
            "n": n, "index_bytes": nbytes, "sizes": sizes, "raw": [bool(flags >> i & 1) for i in range(5)],
            "code_bytes": 1 if flags >> _ONE_BYTE_CODES_BIT & 1 else 2}


def decode(block: bytes, order: str = "rank") -> Targets:
    """Decode a block into ``indices [R, k]``, ``logprobs [R, k]`` float32, ``tail_logprob [R]`` float32.

    Rows shorter than ``k`` are padded with id 0 and ``-inf``. ``order="rank"`` sorts each row by
    descending probability (the wire and trainer contract); ``"id"`` leaves ids ascending (faster;
    the loss is order-free but its top-1 agreement metric reads column 0).

    Raises:
        TargetCodecError: anything about the block is inconsistent (see the module docstring).
    """
    if order not in ("rank", "id"):
        raise ValueError(f"order must be 'rank' or 'id', found {order!r}")
    h = read_header(block)
    rows, k, vocab, nbytes = h["rows"], h["k"], h["vocab_size"], h["index_bytes"]
    sampled, raw = h["kind"] == "sampled", h["raw"]
    frames, at = [], HEADER_BYTES
    for size in h["sizes"]:
        frames.append(block[at: at + size])
        at += size
    length_dtype = "<u1" if k <= 255 else "<u2"
    lengths = np.frombuffer(_unframe(frames[0], rows * np.dtype(length_dtype).itemsize, "row lengths", raw[0]),
                            dtype=length_dtype)
    if lengths.size and int(lengths.max()) > k:
        raise TargetCodecError(f"coded targets: a row holds {int(lengths.max())} entries, more than k={k}")
    starts = _row_starts(lengths)
    total = int(starts[-1])
    deltas = _unplanes(_unframe(frames[1], total * nbytes, "ids", raw[1]), total, nbytes, "<u2" if nbytes == 2 else "<u4")
    firsts = starts[:-1][lengths > 0]
    if np.count_nonzero(deltas == 0) != np.count_nonzero(deltas[firsts] == 0):
        raise TargetCodecError("coded targets: a row's ids are not strictly ascending (repeated id)")
    key_dtype, shift = (np.uint32, 16) if nbytes == 2 else (np.uint64, 24)
    full = total == rows * k and rows > 0  # every row holds k ids (top-k without a cutoff): no padding
    if full:  # a cumsum per row: no row offsets to subtract; cannot overflow (k * 2**shift < 2**(8 * key bytes))
        ids = np.cumsum(deltas.reshape(rows, k), axis=1, dtype=key_dtype).reshape(total)
    else:
        ids = np.cumsum(deltas, dtype=np.int64)
        ids -= np.repeat(np.concatenate([[0], ids])[starts[:-1]], lengths)
    if total and int(ids[starts[1:][lengths > 0] - 1].max()) >= vocab:  # rows ascend: their last id is the largest
        raise TargetCodecError(f"coded targets: an id is >= vocab_size {vocab}")
    if sampled:
        counts = np.frombuffer(_unframe(frames[4], total, "counts", raw[4]), dtype=np.uint8)
        sums = np.add.reduceat(counts.astype(np.int64), firsts) if total else np.zeros(0, np.int64)
        if len(firsts) != rows or (sums != h["n"]).any() or (counts == 0).any():
            raise TargetCodecError(f"coded targets: sampled counts must be >= 1 and sum to n={h['n']} in every row")
        rank_codes, table = 255 - counts, _count_table(h["n"])
        tail = np.full(rows, -np.inf, dtype=np.float32)
    else:
        cb = h["code_bytes"]
        coded = _unframe(frames[2], total * cb, "log-prob codes", raw[2])
        rank_codes = np.frombuffer(coded, dtype=np.uint8) if cb == 1 else _unplanes(coded, total, 2, "<u2")
        if cb == 2 and total and int(rank_codes.max()) > _MAX_CODE:
            raise TargetCodecError(f"coded targets: a log-prob code is above {_MAX_CODE}")
        table = _code_table(float(np.float32(h["step"])), float(np.float32(h["knee"])))
        tail = _unplanes(_unframe(frames[3], rows * 4, "tail", raw[3]), rows, 4, "<f4")
        if np.isnan(tail).any() or (tail > _POSITIVE_TOLERANCE).any():
            raise TargetCodecError("coded targets: the tail holds NaN or positive log-probs")
    # One key per entry, (rank code << shift) | id, so a single integer sort orders a row by descending
    # probability (ascending code) and carries the id along; padding sorts last and decodes to (0, -inf).
    flat = ids.astype(key_dtype, copy=False)
    flat |= rank_codes.astype(key_dtype) << key_dtype(shift)
    if full:
        keys = flat.reshape(rows, k)
    else:
        keys = np.full((rows, k), key_dtype(_PAD_CODE) << key_dtype(shift), dtype=key_dtype)
        keys[np.arange(k) < lengths[:, None]] = flat
    if order == "rank" and k > 1:
        keys.sort(axis=1)
    if nbytes == 2:  # little-endian uint32 keys are (id, code) uint16 pairs: split them without shifting
        pairs = keys.view("<u2").reshape(rows, k, 2)
        return Targets(np.ascontiguousarray(pairs[..., 0]), np.take(table, pairs[..., 1]), tail)
    out_ids = (keys & key_dtype((1 << shift) - 1)).astype("<i4")
    return Targets(out_ids, np.take(table, keys >> key_dtype(shift)), tail)
