"""Bounds and checks of the wire contract that keep hostile bodies from becoming 5xx or stalls.

A body from the network may hold anything msgpack or JSON can say: maps with bytes keys, nesting
1,000 deep, integers of hundreds of digits, tensor maps with a list as dtype or 100 dimensions.
These helpers check such values before numpy or ``repr`` sees them, and bound the sizes that can be
known before a body is read or parsed.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from shared.errors import InvalidRequest, MalformedBody, RequestTooLarge

# Below ~1e-37, logits / T overflows float32 to inf and the answer is NaN. At 1e-4 fp32 logits up to
# ~3e34 stay finite, and the distribution is already one-hot for any real model.
MIN_TEMPERATURE = 1e-4

# The most bytes one token takes in a request body: msgpack, an int64 id in a list (type byte + 8);
# JSON, a 6-digit id, its separator and a pretty-printer's indentation (json.dumps(indent=8) puts
# 24 spaces before each id). A bigger body is refused before it is read or parsed: JSON is parsed
# in one C call that holds the GIL (3 s for 8 MB on our 2-core VM), and no valid msgpack body is bigger.
BODY_BYTES_PER_TOKEN = {"msgpack": 9, "json": 32}
BODY_OVERHEAD_BYTES = 4096

_show = reprlib.Repr()  # bounded reprs for error messages: depth, length and big ints are cut
_show.maxlevel, _show.maxstring, _show.maxother, _show.maxlong, _show.maxlist = 3, 60, 60, 60, 6


def describe(value: Any) -> str:
    """A short repr of a client's value for an error message, whatever its size or depth."""
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if type(value) is int and value.bit_length() > 200:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return _show.repr(value)
    except (RecursionError, ValueError):  # reprlib still calls repr() on odd objects
        return f"<a {type(value).__name__}>"


def max_body_bytes(fmt: str, max_tokens: int, max_score_entries: int = 0) -> int:
    """The largest body of format ``fmt`` that can hold a valid request of ``max_tokens`` tokens and
    ``max_score_entries`` scored ids (wire v1.1 ``score_ids``; each takes the room of a token id)."""
    return (max_tokens + max_score_entries) * BODY_BYTES_PER_TOKEN[fmt] + BODY_OVERHEAD_BYTES


def is_int(value: Any) -> bool:
    return type(value) is int  # bool is a subclass of int, and True is not a token id


def too_many_tokens(count: int, max_tokens: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"request has {count} tokens, this server accepts at most {max_tokens} per request; "
        "split the batch into smaller requests"
    )


def check_tensor_header(value: dict, field: str) -> list[int]:
    """Keys, dtype and shape types of a tensor map in field ``field``, checked before numpy sees it
    (a list as dtype or a negative dimension must give a 4xx, not an exception inside numpy).
    Returns the shape."""
    if not all(isinstance(key, str) for key in value) or set(value) != {"dtype", "shape", "data"}:
        found = sorted(describe(key) for key in value)
        raise MalformedBody(f"field '{field}': expected a tensor map with keys dtype, shape, data (strings); found {found}")
    dtype, shape = value["dtype"], value["shape"]
    if not isinstance(dtype, str):
        raise MalformedBody(f"field '{field}': dtype must be a string such as 'int32', found {describe(dtype)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise MalformedBody(f"field '{field}': shape must be a list of non-negative ints, found {describe(shape)}")
    return shape


def check_tensor_map(value: dict, max_tokens: int | None) -> None:
    """Types and sizes of an input_ids tensor map, checked before numpy sees it: a non-string dtype,
    a shape of 100 dimensions or of 2**64 ids must give a 4xx, not an exception inside numpy."""
    shape = check_tensor_header(value, "input_ids")
    if len(shape) not in (1, 2):
        raise InvalidRequest(f"input_ids tensor must be 1-D (with 'lengths') or 2-D, found {len(shape)}-D")
    if max_tokens is not None and math.prod(shape) > max_tokens:
        raise too_many_tokens(math.prod(shape), max_tokens)
    if max_tokens is not None and max(shape) > max_tokens:  # e.g. [0, 2**62]: no ids, but no sane shape
        raise RequestTooLarge(
            f"input_ids tensor of shape {describe(shape)} has a dimension over this server's {max_tokens} "
            "tokens per request (max_tokens_per_request); split the batch into smaller requests"
        )
