"""Wire contract v1: tensor encoding, request/response codecs, validation errors."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
import pytest

from shared.errors import InvalidRequest, MalformedBody, RequestTooLarge, UnsupportedContentType
from shared.tensors import decode_tensor_msgpack, encode_tensor_msgpack
from shared.wire import (
    PROTOCOL_VERSION,
    TopKResponse,
    decode_topk_request,
    decode_topk_response,
    encode_topk_request,
    encode_topk_response,
    format_from_content_type,
    index_dtype,
    response_format,
)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "int64", "float16", "float32"])
def test_tensor_roundtrip_for_every_wire_dtype(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    encoded = encode_tensor_msgpack(array)
    assert encoded["dtype"] == dtype and encoded["shape"] == [2, 3, 4]
    decoded = decode_tensor_msgpack(msgpack.unpackb(msgpack.packb(encoded, use_bin_type=True)), "x")
    np.testing.assert_array_equal(decoded, array)


def test_tensor_bytes_are_little_endian_even_from_big_endian_arrays() -> None:
    assert encode_tensor_msgpack(np.array([1], dtype=">i4"))["data"] == b"\x01\x00\x00\x00"
    assert encode_tensor_msgpack(np.array([1], dtype="<i4"))["data"] == b"\x01\x00\x00\x00"


@pytest.mark.parametrize(
    "tensor, message",
    [
        ({"dtype": "object", "shape": [1], "data": b"x"}, "dtype 'object'"),
        ({"dtype": "int32", "shape": [3], "data": b"\x00" * 8}, "needs 12 bytes, found 8"),
        ({"dtype": "int32", "shape": [-1], "data": b""}, "non-negative"),
        ({"dtype": "int32", "shape": [1], "data": "abcd"}, "msgpack bin"),
        ({"dtype": "int32", "shape": [1]}, "keys dtype, shape, data"),
    ],
)
def test_broken_tensor_maps_are_rejected(tensor: dict, message: str) -> None:
    with pytest.raises(MalformedBody, match=message):
        decode_tensor_msgpack(tensor, "input_ids")


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_request_roundtrip(fmt: str) -> None:
    sequences = [np.array([5, 6, 7]), np.array([1]), np.array([9, 8])]
    body = encode_topk_request(sequences, k=4, temperature=0.5, fmt=fmt)
    request = decode_topk_request(body, fmt)
    assert [s.tolist() for s in request.sequences] == [[5, 6, 7], [1], [9, 8]]
    assert request.k == 4 and request.temperature == 0.5 and request.num_tokens == 6


def test_request_accepts_a_2d_packed_tensor() -> None:
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    body = msgpack.packb({"input_ids": encode_tensor_msgpack(ids)}, use_bin_type=True)
    request = decode_topk_request(body, "msgpack")
    assert [s.tolist() for s in request.sequences] == [[1, 2, 3], [4, 5, 6]]
    assert request.k is None and request.temperature == 1.0


def _msgpack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    "body, error, message",
    [
        (b"\xc1\xc1\xc1", MalformedBody, "not valid msgpack"),
        (_msgpack([1, 2]), InvalidRequest, "must be a map"),
        (_msgpack({"input_ids": [[1]], "kk": 3}), InvalidRequest, "unknown field"),
        (_msgpack({"k": 3}), InvalidRequest, "missing field 'input_ids'"),
        (_msgpack({"input_ids": "hello"}), InvalidRequest, "list of lists or a tensor"),
        (_msgpack({"input_ids": [[1, "a"]]}), InvalidRequest, r"input_ids\[0\]\[1\] must be an integer"),
        (_msgpack({"input_ids": [[1, 2.5]]}), InvalidRequest, "must be an integer"),
        (_msgpack({"input_ids": [[1, True]]}), InvalidRequest, "must be an integer"),
        (_msgpack({"input_ids": [[1, [2, {"a": None}]]]}), InvalidRequest, "must be an integer"),
        (_msgpack({"input_ids": [5]}), InvalidRequest, r"input_ids\[0\] must be a list"),
        (_msgpack({"input_ids": []}), InvalidRequest, "empty"),
        (_msgpack({"input_ids": [[1], []]}), InvalidRequest, r"input_ids\[1\] is empty"),
        (_msgpack({"input_ids": [[1]], "k": "3"}), InvalidRequest, "k must be an integer"),
        (_msgpack({"input_ids": [[1]], "temperature": 0.0}), InvalidRequest, "temperature must be finite and > 0"),
        (_msgpack({"input_ids": [[1]], "temperature": -1}), InvalidRequest, "temperature"),
        (_msgpack({"input_ids": [[1]], "temperature": math.nan}), InvalidRequest, "temperature"),
        (_msgpack({"input_ids": [[1]], "temperature": math.inf}), InvalidRequest, "temperature"),
        (_msgpack({"input_ids": [[1]], "temperature": "hot"}), InvalidRequest, "temperature must be a number"),
        (_msgpack({"input_ids": [[1]], "protocol": 2}), InvalidRequest, "protocol 2"),
        (_msgpack({"input_ids": encode_tensor_msgpack(np.zeros(3, np.int32))}), InvalidRequest, "needs 'lengths'"),
        (_msgpack({"input_ids": encode_tensor_msgpack(np.zeros(3, np.int32)), "lengths": [2]}), InvalidRequest, "sum to 2"),
        (_msgpack({"input_ids": encode_tensor_msgpack(np.zeros(3, np.float32)), "lengths": [3]}), InvalidRequest, "integer dtype"),
    ],
)
def test_bad_requests_raise_typed_errors(body: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decode_topk_request(body, "msgpack")


def test_deep_nesting_is_a_decode_error_not_a_crash() -> None:
    deep = b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises((MalformedBody, InvalidRequest)):
        decode_topk_request(deep, "json")
    with pytest.raises((MalformedBody, InvalidRequest)):
        decode_topk_request(b"\x91" * 100_000 + b"\x01", "msgpack")


def test_ids_beyond_64_bits_are_invalid() -> None:
    with pytest.raises(InvalidRequest, match="does not fit in 64 bits"):
        decode_topk_request(b'{"input_ids": [[1, 1180591620717411303424]]}', "json")


def test_json_nan_literal_is_an_invalid_temperature() -> None:
    with pytest.raises(InvalidRequest, match="temperature"):
        decode_topk_request(b'{"input_ids": [[1]], "temperature": NaN}', "json")


def test_validate_checks_the_servers_limits() -> None:
    request = decode_topk_request(encode_topk_request([[1, 2, 3], [4, 99]], k=8), "msgpack")
    with pytest.raises(InvalidRequest, match=r"input_ids\[1\]\[1\] = 99 is outside the vocabulary \[0, 50\)"):
        request.validate(vocab_size=50, max_k=16, max_tokens=100)
    with pytest.raises(InvalidRequest, match="k must be between 1 and 4"):
        request.validate(vocab_size=100, max_k=4, max_tokens=100)
    with pytest.raises(RequestTooLarge, match="5 tokens"):
        request.validate(vocab_size=100, max_k=16, max_tokens=4)
    with pytest.raises(InvalidRequest, match="at most 2"):
        request.validate(vocab_size=100, max_k=16, max_tokens=100, max_sequence_length=2)
    negative = decode_topk_request(encode_topk_request([[1, -3]], k=0, fmt="json"), "json")
    with pytest.raises(InvalidRequest, match="k must be between"):
        negative.validate(vocab_size=100, max_k=16, max_tokens=100)
    negative.k = 2
    with pytest.raises(InvalidRequest, match="-3 is outside"):
        negative.validate(vocab_size=100, max_k=16, max_tokens=100)


def _response(vocab_size: int) -> TopKResponse:
    rng = np.random.default_rng(0)
    logprobs = np.sort(np.log(rng.dirichlet(np.ones(10), size=5))[:, :4], axis=1)[:, ::-1]
    tail = np.log1p(-np.exp(logprobs).sum(1)).astype(np.float32)
    tail[-1] = -np.inf
    return TopKResponse(
        model="m", tokenizer_sha256="ab" * 32, vocab_size=vocab_size, k=4, temperature=1.0, lengths=[2, 3],
        indices=rng.integers(0, vocab_size, size=(5, 4)).astype(np.int32),
        logprobs=logprobs.astype(np.float32), tail_logprob=tail, timing={"queue_ms": 1.0, "compute_ms": 2.0},
    )


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("vocab_size", [50_000, 128_256])
def test_response_roundtrip(fmt: str, vocab_size: int) -> None:
    original = _response(vocab_size)
    decoded = decode_topk_response(encode_topk_response(original, fmt), fmt)
    assert decoded.indices.dtype == index_dtype(vocab_size)
    assert decoded.logprobs.dtype == np.float16 and decoded.tail_logprob.dtype == np.float32
    np.testing.assert_array_equal(decoded.indices, original.indices)
    np.testing.assert_array_equal(decoded.logprobs, original.logprobs.astype(np.float16))
    np.testing.assert_array_equal(decoded.tail_logprob, original.tail_logprob)  # -inf survives JSON as null
    assert decoded.lengths == [2, 3] and decoded.protocol == PROTOCOL_VERSION
    assert [part[0].shape[0] for part in decoded.split()] == [2, 3]


def test_json_response_is_standard_json() -> None:
    text = encode_topk_response(_response(100), "json").decode()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["tail_logprob"][-1] is None


def test_index_dtype_is_uint16_only_when_every_id_fits() -> None:
    assert index_dtype(65536) == np.uint16 and index_dtype(65537) == np.int32


def test_content_negotiation() -> None:
    assert format_from_content_type("application/msgpack") == "msgpack"
    assert format_from_content_type("application/x-msgpack") == "msgpack"
    assert format_from_content_type("application/json; charset=utf-8") == "json"
    with pytest.raises(UnsupportedContentType, match="text/plain"):
        format_from_content_type("text/plain")
    with pytest.raises(UnsupportedContentType):
        format_from_content_type(None)
    assert response_format("application/json", "msgpack") == "json"
    assert response_format("*/*", "msgpack") == "msgpack"
    assert response_format("application/msgpack", "json") == "msgpack"
