"""Tensor encoding of the wire contract: ``{"dtype", "shape", "data"}`` with little-endian bytes.

msgpack carries the raw bytes in a ``bin`` field (no base64, never pickle); JSON carries nested
lists. Only the dtypes below cross the wire, so a peer can never make us build an object array.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shared.errors import MalformedBody

# Wire name -> little-endian numpy dtype. Keep this list short: every entry is attack surface.
WIRE_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}


def encode_tensor_msgpack(array: np.ndarray) -> dict[str, Any]:
    """Encode ``array`` as ``{"dtype", "shape", "data": bytes}`` (little-endian, C order)."""
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise TypeError(f"dtype {name} cannot cross the wire; expected one of {sorted(WIRE_DTYPES)}")
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name]).tobytes()
    return {"dtype": name, "shape": list(array.shape), "data": data}


def is_tensor_map(value: Any) -> bool:
    """True when ``value`` looks like an encoded tensor (a map with a ``dtype`` key)."""
    return isinstance(value, dict) and "dtype" in value


def decode_tensor_msgpack(value: Any, field: str) -> np.ndarray:
    """Decode a ``{"dtype", "shape", "data"}`` map into a read-only numpy array.

    Raises:
        MalformedBody: when the map is incomplete, the dtype unknown, or the byte count does not
            match ``prod(shape) * itemsize``.
    """
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        found = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise MalformedBody(f"field '{field}': expected a tensor map with keys dtype, shape, data; found {found}")
    dtype_name, shape, data = value["dtype"], value["shape"], value["data"]
    if dtype_name not in WIRE_DTYPES:
        raise MalformedBody(f"field '{field}': dtype {dtype_name!r} is not one of {sorted(WIRE_DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MalformedBody(f"field '{field}': shape must be a list of non-negative ints, found {shape!r}")
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedBody(f"field '{field}': data must be msgpack bin, found {type(data).__name__}")
    dtype = WIRE_DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise MalformedBody(
            f"field '{field}': shape {shape} of {dtype_name} needs {expected} bytes, found {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def tensor_to_json(array: np.ndarray) -> list:
    """Nested lists for JSON. Non-finite floats become ``null`` (JSON has no -Infinity)."""
    if array.dtype.kind == "f":
        as_float = array.astype(np.float64)
        if not np.isfinite(as_float).all():
            obj = as_float.astype(object)
            obj[~np.isfinite(as_float)] = None
            return obj.tolist()
        return as_float.tolist()
    return array.tolist()


def tensor_from_json(value: Any, field: str, dtype: str) -> np.ndarray:
    """Parse nested lists from JSON into ``dtype``; ``null`` reads back as ``-inf`` for floats."""
    if not isinstance(value, list):
        raise MalformedBody(f"field '{field}': expected a nested list, found {type(value).__name__}")
    target = WIRE_DTYPES[dtype]
    try:
        if target.kind == "f":
            array = np.array(value, dtype=object)
            array[array == None] = -np.inf  # noqa: E711 (elementwise comparison on an object array)
            return array.astype(target)
        return np.array(value, dtype=target)
    except (TypeError, ValueError) as exc:
        raise MalformedBody(f"field '{field}': not a rectangular list of numbers ({exc})") from exc
