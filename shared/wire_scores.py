"""Wire contract v1.1: the optional scoring fields of ``POST /v1/topk`` (parsing, checks, encoding).

Request fields (both optional; a request without them is a v1 request and gets a v1 reply):

- ``score_ids``: ids to score at every position, ``m >= 1`` of them per position, the same ``m``
  for the whole request. Either a packed tensor ``[sum(L), m]`` (msgpack; rows in the order of
  the sequences, as the packed ``input_ids`` tensor) or per-sequence lists ``[B][L_i][m]``.
- ``return_logsumexp``: ``true`` to get the log-sum-exp of the tempered logits per position.

Reply fields, present only when asked for:

- ``score_logprobs``: ``[sum(L), m]`` float32, ``log p_T(score_ids[t, j] | x_0..x_t)``, exact from
  the full vocabulary (the same ``log_softmax(z / T)`` the top-k entries come from).
- ``logsumexp``: ``[sum(L)]`` float32, ``logsumexp(z / T)``, so ``logprob = z / T - logsumexp``
  for any id whose logit ``z`` a client knows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.errors import InvalidRequest, MalformedBody
from shared.tensors import decode_tensor_msgpack, encode_tensor_msgpack, is_tensor_map, tensor_from_json, tensor_to_json
from shared.wire_checks import check_tensor_header, describe, is_int

SCORE_FIELDS = ("score_ids", "return_logsumexp")
REPLY_FIELDS = ("score_logprobs", "logsumexp")
# Reply bytes per scored entry (float32): exact for msgpack, an estimate of "-12.345678901234567, " in JSON.
SCORE_ENTRY_BYTES = {"msgpack": 4, "json": 20}


def max_score_entries(max_tokens: int, max_score_ids: int, max_reply_bytes: int) -> int:
    """The most scored ids a valid request can hold: ``max_score_ids`` per token, and no more than a
    reply of ``max_reply_bytes`` has room for (4 bytes each in msgpack, the smallest encoding)."""
    return min(max_tokens * max_score_ids, max_reply_bytes // SCORE_ENTRY_BYTES["msgpack"])


def _check_m(m: int, max_score_ids: int | None, where: str) -> None:
    if m < 1:
        raise InvalidRequest(f"{where} holds no ids: score at least one id per position (m >= 1), or leave score_ids out")
    if max_score_ids is not None and m > max_score_ids:
        raise InvalidRequest(
            f"score_ids has m = {m} ids per position; this server scores at most {max_score_ids} (max_score_ids)"
            + (": it does not score ids" if max_score_ids == 0 else "; send fewer ids per position")
        )


def _from_tensor(value: dict, lengths: list[int], max_score_ids: int | None) -> np.ndarray:
    shape = check_tensor_header(value, "score_ids")
    rows = sum(lengths)
    if len(shape) != 2:
        raise InvalidRequest(f"score_ids tensor must be 2-D [sum(L), m] = [{rows}, m], found {len(shape)}-D shape {describe(shape)}")
    if shape[0] != rows:
        raise InvalidRequest(
            f"score_ids tensor has {shape[0]} rows but input_ids has {rows} positions; expected shape [{rows}, m], "
            "one row per position, sequence after sequence"
        )
    _check_m(shape[1], max_score_ids, "the score_ids tensor")
    tensor = decode_tensor_msgpack(value, "score_ids")
    if tensor.dtype.kind not in "iu":
        raise InvalidRequest(f"score_ids tensor must have an integer dtype (int32 is usual), found {tensor.dtype.name}")
    return tensor.astype(np.int64)


def _from_lists(value: list, lengths: list[int], max_score_ids: int | None) -> np.ndarray:
    if len(value) != len(lengths):
        raise InvalidRequest(
            f"score_ids must hold one list per input_ids sequence ({len(lengths)}), found {len(value)}; "
            "or send a packed tensor [sum(L), m]"
        )
    m: int | None = None
    for i, (seq, length) in enumerate(zip(value, lengths)):
        if not isinstance(seq, list) or len(seq) != length:
            found = f"{len(seq)} row(s)" if isinstance(seq, list) else describe(seq)
            raise InvalidRequest(f"score_ids[{i}] must be a list of {length} rows, one per token of input_ids[{i}]; found {found}")
        for t, row in enumerate(seq):
            if not isinstance(row, list):
                raise InvalidRequest(f"score_ids[{i}][{t}] must be a list of m token ids, found {describe(row)}")
            if m is None:
                m = len(row)
                _check_m(m, max_score_ids, f"score_ids[{i}][{t}]")
            elif len(row) != m:
                raise InvalidRequest(
                    f"score_ids[{i}][{t}] has {len(row)} ids but the first position has {m}: m must be the same "
                    "at every position of a request"
                )
            if not all(is_int(x) for x in row):
                j, bad = next((j, x) for j, x in enumerate(row) if not is_int(x))
                raise InvalidRequest(f"score_ids[{i}][{t}][{j}] must be an integer token id, found {describe(bad)}")
    try:
        return np.array([row for seq in value for row in seq], dtype=np.int64).reshape(sum(lengths), m)
    except OverflowError as exc:
        raise InvalidRequest("score_ids holds an id that does not fit in 64 bits") from exc


def score_ids_from_body(value: Any, fmt: str, lengths: list[int], max_score_ids: int | None = None) -> np.ndarray:
    """``score_ids`` of a decoded body as a packed int64 array ``[sum(L), m]``.

    Args:
        value: the field's value: a tensor map (msgpack) or per-sequence lists ``[B][L_i][m]``.
        fmt: the body's format (tensor maps are for msgpack only).
        lengths: the input sequences' lengths ``L_i``; ``score_ids`` must have a row for each position.
        max_score_ids: the server's limit on ``m``, checked as soon as ``m`` is known.

    Raises:
        MalformedBody: a broken tensor map.
        InvalidRequest: wrong types, a row count that does not match ``input_ids``, ragged or empty rows,
            ``m`` over ``max_score_ids``, a non-integer dtype.
    """
    if is_tensor_map(value):
        if fmt != "msgpack":
            raise InvalidRequest("score_ids: tensor maps are for msgpack bodies; in JSON send nested lists [B][L_i][m]")
        return _from_tensor(value, lengths, max_score_ids)
    if isinstance(value, list):
        return _from_lists(value, lengths, max_score_ids)
    raise InvalidRequest(f"score_ids must be per-sequence lists [B][L_i][m] or a tensor [sum(L), m], found {describe(value)}")


def flag_from_body(value: Any, name: str) -> bool:
    """A boolean request field; absent or ``null`` is False."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, found {describe(value)}")
    return value


def check_score_ids(score_ids: np.ndarray, lengths: list[int], vocab_size: int, max_score_ids: int | None) -> None:
    """Shape ``[sum(L), m]`` with ``1 <= m <= max_score_ids``, and every id in ``[0, vocab_size)``.

    Raises:
        InvalidRequest: naming the first bad id as ``score_ids[i][t][j]`` (sequence, position, slot).
    """
    rows = sum(lengths)
    if score_ids.ndim != 2 or score_ids.shape[0] != rows:
        raise InvalidRequest(f"score_ids must have shape [{rows}, m] (one row per position), found {list(score_ids.shape)}")
    _check_m(score_ids.shape[1], max_score_ids, "score_ids")
    bad = np.flatnonzero((score_ids < 0) | (score_ids >= vocab_size))
    if bad.size:
        row, j = divmod(int(bad[0]), score_ids.shape[1])
        i = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
        t = row - sum(lengths[:i])
        raise InvalidRequest(
            f"score_ids[{i}][{t}][{j}] = {int(score_ids[row, j])} is outside the vocabulary [0, {vocab_size})"
        )


def score_ids_to_wire(score_ids: Any, lengths: list[int], fmt: str) -> Any:
    """Encode ``score_ids`` (packed ``[sum(L), m]``, or one ``[L_i, m]`` per sequence) for a request body:
    one int32 tensor in msgpack, nested lists ``[B][L_i][m]`` in JSON."""
    if isinstance(score_ids, np.ndarray) and score_ids.ndim == 2:
        packed = score_ids
    else:
        parts = [np.asarray(s, dtype=np.int64).reshape(length, -1) for s, length in zip(score_ids, lengths)]
        packed = np.concatenate(parts) if parts else np.zeros((0, 1), np.int64)
    if fmt == "msgpack":
        return encode_tensor_msgpack(np.ascontiguousarray(packed, dtype=np.int32))
    bounds = np.cumsum([0, *lengths])
    return [packed[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


def reply_tensors_to_wire(tensors: dict[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """The reply's v1.1 tensors (float32) in the reply's format; absent ones are left out."""
    out = {}
    for name in REPLY_FIELDS:
        if tensors.get(name) is not None:
            array = tensors[name].astype(np.float32, copy=False)
            out[name] = encode_tensor_msgpack(array) if fmt == "msgpack" else tensor_to_json(array)
    return out


def reply_tensors_from_wire(obj: dict, fmt: str, rows: int) -> dict[str, np.ndarray | None]:
    """Decode the reply's v1.1 tensors (None where absent) and check their shapes against ``rows``."""
    out: dict[str, np.ndarray | None] = {}
    for name in REPLY_FIELDS:
        if name not in obj:
            out[name] = None
            continue
        array = decode_tensor_msgpack(obj[name], name) if fmt == "msgpack" else tensor_from_json(obj[name], name, "float32")
        if array.shape[:1] != (rows,) or array.ndim != (2 if name == "score_logprobs" else 1):
            expected = f"[{rows}, m]" if name == "score_logprobs" else f"[{rows}]"
            raise MalformedBody(f"{name} does not have shape {expected}, found {list(array.shape)}")
        out[name] = array
    return out
