"""Wire contract v1.2: a coded reply encoding for ``POST /v1/topk``, negotiated per request (issue 17).

Request fields (optional; without them the reply is the v1 reply, byte for byte):

- ``target_encoding``: ``"fp16"`` (the default, v1 tensors) or ``"coded"``: the reply carries the
  top-k targets as one :mod:`shared.target_codec` block (ids as delta-coded sets, log-probs on the
  codec's companded grid, exact float32 tail, zstd, CRC32) instead of ``indices`` / ``logprobs`` /
  ``tail_logprob``; msgpack only (the block is binary).
- ``mass_cutoff``: with ``"coded"``, drop each row's least likely ids while their mass stays ``<=``
  this (``[0, 1)``, default 0), their mass folded exactly into the tail.
- ``target_encoding: "sampled"`` (with ``sample_seed``, an integer in ``[0, 2**63)``, default 0):
  instead of the top k, ``k`` ids drawn per position from the teacher's distribution at the request's
  temperature (sparse logit sampling; ``k <= 255``), returned as one block of distinct ids + counts
  that decodes to ``logprobs = log(count / k)`` with no tail. The same body (ids, k, temperature, seed)
  draws the same ids, so a retried request gets the same targets.

A coded reply has ``"target_encoding": "coded"`` and ``"targets_coded": <bin>``; the client checks
the block's CRC32 and structure (:func:`shared.target_codec.decode`) and that it holds
``sum(lengths)`` rows of ``k`` for ``vocab_size``, and refuses anything else with
:class:`shared.errors.MalformedBody`, so a corrupted reply never turns into targets.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shared import target_codec as tc
from shared.errors import InvalidRequest, MalformedBody
from shared.wire_checks import describe

CODED_FIELDS = ("target_encoding", "mass_cutoff", "sample_seed")
ENCODINGS = ("fp16", "coded", "sampled")
MAX_SAMPLED_K = 255  # counts travel as one byte
_KINDS = {"coded": "topk_coded", "sampled": "sampled"}  # wire encoding -> codec block kind


def sample_seed_from_body(obj: dict[str, Any], encoding: str) -> int:
    """The request's ``sample_seed`` (default 0); only with ``target_encoding: "sampled"``."""
    seed = obj.get("sample_seed")
    if seed is None:
        return 0
    if encoding != "sampled":
        raise InvalidRequest("sample_seed goes with target_encoding 'sampled'; leave it out or ask for 'sampled'")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidRequest(f"sample_seed must be an integer in [0, 2**63), found {describe(seed)}")
    return seed


def encoding_from_body(obj: dict[str, Any], fmt: str) -> tuple[str, float]:
    """``(target_encoding, mass_cutoff)`` of a request body (defaults ``"fp16"``, 0).

    Raises:
        InvalidRequest: an unknown encoding, ``"coded"`` or ``"sampled"`` in a JSON body, or a bad ``mass_cutoff``.
    """
    encoding = obj.get("target_encoding", "fp16")
    if encoding is None:
        encoding = "fp16"
    if encoding not in ENCODINGS:
        raise InvalidRequest(f"target_encoding must be one of {list(ENCODINGS)}, found {describe(encoding)}")
    if encoding != "fp16" and fmt != "msgpack":
        raise InvalidRequest(f"target_encoding {encoding!r} replies are binary: send the request as application/msgpack")
    cutoff = obj.get("mass_cutoff")
    if cutoff is None:
        return encoding, 0.0
    if encoding != "coded":
        raise InvalidRequest("mass_cutoff goes with target_encoding 'coded'; leave it out or ask for 'coded'")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not (
            math.isfinite(cutoff) and 0 <= cutoff < 1):
        raise InvalidRequest(f"mass_cutoff must be a number in [0, 1) (0 = no cutoff), found {describe(cutoff)}")
    return encoding, float(cutoff)


def encode_coded_reply(indices: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int,
                       mass_cutoff: float) -> bytes:
    """One codec block for the reply's ``indices [R, k]``, ``logprobs [R, k]``, ``tail [R]``."""
    return tc.encode_topk(indices, logprobs, tail, vocab_size, eps=mass_cutoff, level=3)  # level 3: the server's CPU


def encode_sampled_reply(indices: np.ndarray, logprobs: np.ndarray, k: int, vocab_size: int) -> bytes:
    """One codec block for sampled targets ``indices [R, k]`` with ``logprobs = log(count / k)`` (the engine's
    ``sample_n = k`` output)."""
    counts = tc.sampled_from_targets(indices, logprobs, k)
    return tc.encode_sampled(indices, counts, k, vocab_size, level=3)


def decode_coded_reply(obj: dict[str, Any], rows: int, k: int, vocab_size: int) -> dict[str, np.ndarray]:
    """``indices``, ``logprobs`` (float32) and ``tail_logprob`` from a coded reply's ``targets_coded``.

    Raises:
        MalformedBody: the block is missing, corrupt (CRC32, truncation, counts) or for other rows/k/vocab.
    """
    kind = _KINDS.get(obj.get("target_encoding"), "topk_coded")
    block = obj.get("targets_coded")
    if not isinstance(block, (bytes, bytearray)):
        raise MalformedBody(f"a coded /v1/topk reply must carry 'targets_coded' as binary, found {type(block).__name__}")
    try:
        header = tc.read_header(bytes(block))
        found = (header["kind"], header["rows"], header["k"], header["vocab_size"])
        if found != (kind, rows, k, vocab_size):
            raise MalformedBody(f"the coded reply holds (kind, rows, k, vocab) = {found}, expected "
                                f"({kind!r}, {rows}, {k}, {vocab_size}) from its encoding, lengths, k and vocab_size")
        targets = tc.decode(bytes(block))
    except tc.TargetCodecError as exc:
        raise MalformedBody(f"corrupt coded /v1/topk reply, refused: {exc}") from None
    return {"indices": targets.indices, "logprobs": targets.logprobs, "tail_logprob": targets.tail_logprob}
