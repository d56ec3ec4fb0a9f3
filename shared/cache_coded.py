"""Coded target types of the teacher cache (``topk_coded``, ``sampled``): one codec block per sequence.

A shard of a coded type stores, instead of ``indices`` / ``logprobs`` / ``tail_logprob``:

==================  =====================  ==========================================================
name                dtype, shape           meaning
==================  =====================  ==========================================================
``targets_coded``   uint8 ``[bytes]``      the sequences' :mod:`shared.target_codec` blocks, back to back
``target_offsets``  int64 ``[n + 1]``      block ``i`` is ``targets_coded[offsets[i]:offsets[i + 1]]``
==================  =====================  ==========================================================

A block per sequence keeps a lookup cheap (the reader decodes only the rows it returns) and lets
every block's CRC32 guard its own rows, so a flipped byte is refused at read time even when the
shard's sha256 is not checked. The reader hands back the same ``CachedRow`` arrays as for the
other types, so the trainer's cached teacher needs no change.
"""

from __future__ import annotations

import numpy as np

from shared import target_codec as tc
from shared.cache_format import CacheCorrupted, CacheSpec

CODED_TYPES = ("topk_coded", "sampled")


def encode_shard_targets(spec: CacheSpec, lengths: np.ndarray, indices: np.ndarray, logprobs: np.ndarray,
                         tail: np.ndarray) -> dict[str, np.ndarray]:
    """The ``targets_coded`` and ``target_offsets`` tensors of one shard.

    Args:
        spec: a spec whose ``target_type`` is in :data:`CODED_TYPES`.
        lengths: ``[n]`` rows per sequence; indices, logprobs: ``[R, k]``; tail: ``[R]``, ``R = sum(lengths)``.
            For ``sampled``, ``logprobs`` must be ``log(count / k)`` (``k`` = draws ``n``) and the tail ``-inf``,
            as :func:`teacher_server.engines.topk_math.topk_from_hidden` returns them with ``sample_n = k``.

    Raises:
        ValueError: sampled targets that are not counts out of ``k`` draws, or bad values (see the codec).
    """
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if spec.target_type == "sampled":
        if not np.all(np.isneginf(tail)):
            raise ValueError("sampled targets carry no tail: expected tail_logprob = -inf on every row, found "
                             f"{int((~np.isneginf(tail)).sum())} finite tails; were these top-k targets?")
        counts = tc.sampled_from_targets(indices, logprobs, spec.k)
        bad = counts.sum(axis=1) != spec.k
        if bad.any():
            raise ValueError(f"sampled targets: every row's counts must sum to k = n = {spec.k} draws, found sums "
                             f"{np.unique(counts.sum(axis=1)[bad])[:5]}")
    blocks = []
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        if spec.target_type == "sampled":
            blocks.append(tc.encode_sampled(indices[a:b], counts[a:b], spec.k, spec.vocab_size))
        else:
            blocks.append(tc.encode_topk(indices[a:b], logprobs[a:b], tail[a:b], spec.vocab_size,
                                         step=spec.code_step, knee=spec.code_knee, eps=spec.mass_cutoff))
    offsets = np.zeros(len(blocks) + 1, dtype="<i8")
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    return {"targets_coded": np.frombuffer(b"".join(blocks), dtype=np.uint8), "target_offsets": offsets}


def decode_sequence(spec: CacheSpec, block: bytes, rows: int, where: str) -> tc.Targets:
    """Decode one sequence's block and check it is what ``spec`` says (kind, k, vocab, ``rows`` rows).

    Raises:
        CacheCorrupted: naming ``where``, when the block is corrupt or describes other targets.
    """
    try:
        header = tc.read_header(block)
        expected = (spec.target_type, spec.k, spec.vocab_size, rows)
        found = (header["kind"], header["k"], header["vocab_size"], header["rows"])
        if found != expected:
            raise CacheCorrupted(f"the coded block holds (type, k, vocab, rows) = {found}, the manifest says {expected}")
        return tc.decode(block)
    except CacheCorrupted as exc:
        raise CacheCorrupted(f"{where}: {exc}; delete the shard and resume the cache writer") from None
