"""Wire contract v1 of ``POST /v1/topk`` (DESIGN.md section 3): types, codecs, validation.

Request ``{"input_ids", "k", "temperature"}``; ``input_ids`` is a ragged list of token-id lists, or
a packed tensor (``[B, L]``, or ``[N]`` plus ``"lengths"``). Response: top-k log-probabilities per
position, where row ``t`` of a sequence is ``log p(. | x_0..x_t)``, the distribution of the token
*after* ``x_t``, plus the exact tail ``log(1 - sum_k p)``.

v1.1 adds optional fields (``shared/wire_scores.py`` has their details); a request without them
gets the v1 reply, byte for byte:

- request ``score_ids``: ``[sum(L), m]`` ids to score at each position (a packed tensor, or lists
  ``[B][L_i][m]``), ``1 <= m <= max_score_ids``; reply ``score_logprobs`` ``[sum(L), m]`` float32,
  ``log p_T(id | x_0..x_t)`` exact from the full vocabulary.
- request ``return_logsumexp: true``; reply ``logsumexp`` ``[sum(L)]`` float32 of ``logits / T``,
  so ``logprob = logit / T - logsumexp`` for any id.

v1.2 adds ``target_encoding: "coded"`` (and ``mass_cutoff``) and ``"sampled"`` (and ``sample_seed``):
a compact, checksummed reply (``shared/wire_coded.py``); without it the reply is v1.

Both msgpack (``application/msgpack``, the fast path) and JSON (``application/json``, for curl) are
supported. Nothing here imports a web framework or torch, so trainer and server share it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np

from shared.errors import InvalidRequest, MalformedBody, RequestTooLarge, UnsupportedContentType
from shared.tensors import (
    decode_tensor_msgpack,
    encode_tensor_msgpack,
    is_tensor_map,
    tensor_from_json,
    tensor_to_json,
)
from shared.wire_checks import (
    MIN_TEMPERATURE,
    check_tensor_map,
    describe,
    is_int,
    max_body_bytes,
    too_many_tokens,
)
from shared.wire_coded import (CODED_FIELDS, MAX_SAMPLED_K, decode_coded_reply, encode_coded_reply, encode_sampled_reply,
                               encoding_from_body, sample_seed_from_body)
from shared.wire_scores import (
    SCORE_ENTRY_BYTES,
    SCORE_FIELDS,
    check_score_ids,
    flag_from_body,
    max_score_entries,
    reply_tensors_from_wire,
    reply_tensors_to_wire,
    score_ids_from_body,
    score_ids_to_wire,
)

PROTOCOL_VERSION = 1  # requests say 1; v1.1 only adds optional fields, so the number stays
CONTRACT_VERSION = "1.1"  # what a server advertises on /v1/models
MSGPACK = "application/msgpack"
JSON = "application/json"
WireFormat = Literal["msgpack", "json"]

_MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
_REQUEST_KEYS = {"input_ids", "k", "temperature", "lengths", "protocol", *SCORE_FIELDS, *CODED_FIELDS}

# Reply bytes per top-k entry (id + float16 log-prob) and per row (float32 tail); JSON is an
# estimate of the text (an id like "1234, " and a log-prob like "-12.3671875, ").
_REPLY_ENTRY_BYTES = {"msgpack": 2, "json": 20}
_REPLY_ROW_BYTES = {"msgpack": 4, "json": 16}


def reply_bytes(
    num_tokens: int, k: int, vocab_size: int, fmt: WireFormat, score_ids: int = 0, logsumexp: bool = False
) -> int:
    """Size of a ``/v1/topk`` reply, computed before any work: ``[tokens, k]`` ids and log-probs
    plus a tail per row, and (v1.1) ``score_ids`` float32 scores and a logsumexp per row when asked
    (exact for msgpack, an estimate for JSON)."""
    entry = _REPLY_ENTRY_BYTES[fmt] + (index_dtype(vocab_size).itemsize if fmt == "msgpack" else 0)
    row = _REPLY_ROW_BYTES[fmt] * (2 if logsumexp else 1)
    return num_tokens * (k * entry + score_ids * SCORE_ENTRY_BYTES[fmt] + row)


def format_from_content_type(content_type: str | None) -> WireFormat:
    """Map a Content-Type header to a wire format, or raise :class:`UnsupportedContentType`."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _MSGPACK_TYPES:
        return "msgpack"
    if media == JSON:
        return "json"
    raise UnsupportedContentType(
        f"Content-Type {content_type!r} is not supported; send {MSGPACK} (fast path) or {JSON}"
    )


def response_format(accept: str | None, request_format: WireFormat) -> WireFormat:
    """The response uses the request's format unless ``Accept`` names exactly one of the two."""
    accept = (accept or "").lower()
    wants_msgpack = any(t in accept for t in _MSGPACK_TYPES)
    wants_json = JSON in accept
    if wants_msgpack and not wants_json:
        return "msgpack"
    if wants_json and not wants_msgpack:
        return "json"
    return request_format


def media_type(fmt: WireFormat) -> str:
    return MSGPACK if fmt == "msgpack" else JSON


# --------------------------------------------------------------------------------------- request


@dataclass
class TopKRequest:
    """A decoded ``/v1/topk`` request.

    Attributes:
        sequences: one int64 array ``[L_i]`` per sequence, ``L_i >= 1``.
        k: number of top entries per position, or None for the server's default.
        temperature: applied to the teacher's logits before the softmax (``> 0``, finite).
        score_ids: v1.1, int64 ``[sum(L), m]`` ids to score at each position, or None.
        return_logsumexp: v1.1, whether the reply carries ``logsumexp(logits / T)`` per position.
        target_encoding: v1.2, ``"fp16"`` (v1 tensors), ``"coded"`` (one checksummed codec block) or
            ``"sampled"`` (``k`` draws per position, ids + counts); mass_cutoff: the coded reply's per-row
            mass cutoff; sample_seed: the sampled reply's seed (see :mod:`shared.wire_coded`).
    """

    sequences: list[np.ndarray]
    k: int | None = None
    temperature: float = 1.0
    score_ids: np.ndarray | None = None
    return_logsumexp: bool = False
    target_encoding: str = "fp16"
    mass_cutoff: float = 0.0
    sample_seed: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def num_score_ids(self) -> int:
        """``m``, the ids scored per position (0 without ``score_ids``)."""
        return 0 if self.score_ids is None else int(self.score_ids.shape[1])

    def validate(
        self,
        vocab_size: int,
        max_k: int,
        max_tokens: int,
        max_sequence_length: int | None = None,
        max_score_ids: int | None = None,
    ) -> None:
        """Range checks that need the server's limits.

        Raises:
            InvalidRequest: k out of ``[1, max_k]``, an id (of ``input_ids`` or ``score_ids``) outside
                ``[0, vocab_size)``, a sequence longer than the model's ``max_sequence_length``, or
                ``score_ids`` not ``[sum(L), m]`` with ``1 <= m <= max_score_ids``.
            RequestTooLarge: more than ``max_tokens`` tokens in total.
        """
        if self.k is not None and not 1 <= self.k <= max_k:
            raise InvalidRequest(f"k must be between 1 and {max_k} (this server's max_k), found {describe(self.k)}")
        if self.k is not None and self.k > vocab_size:
            raise InvalidRequest(f"k must not exceed the vocabulary size {vocab_size}, found {self.k}")
        if self.num_tokens > max_tokens:
            raise too_many_tokens(self.num_tokens, max_tokens)
        for i, seq in enumerate(self.sequences):
            if max_sequence_length is not None and len(seq) > max_sequence_length:
                raise InvalidRequest(
                    f"input_ids[{i}] has {len(seq)} tokens; the model handles at most {max_sequence_length}"
                )
            lo, hi = int(seq.min()), int(seq.max())
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                pos = int(np.flatnonzero(seq == bad)[0])
                raise InvalidRequest(
                    f"input_ids[{i}][{pos}] = {bad} is outside the vocabulary [0, {vocab_size})"
                )
        if self.score_ids is not None:
            check_score_ids(self.score_ids, [len(s) for s in self.sequences], vocab_size, max_score_ids)


def encode_topk_request(
    sequences: list[np.ndarray] | list[list[int]],
    k: int | None = None,
    temperature: float = 1.0,
    fmt: WireFormat = "msgpack",
    score_ids: np.ndarray | list | None = None,
    return_logsumexp: bool = False,
    target_encoding: str | None = None,
    mass_cutoff: float | None = None,
    sample_seed: int | None = None,
) -> bytes:
    """Encode a request. msgpack sends one packed int32 tensor plus ``lengths`` (no per-id objects).

    v1.1 (optional): ``score_ids``, packed ``[sum(L), m]`` or one ``[L_i, m]`` per sequence (a packed
    int32 tensor in msgpack, lists ``[B][L_i][m]`` in JSON); ``return_logsumexp``. Without them the
    body is a v1 body.
    """
    body: dict[str, Any] = {"temperature": float(temperature)}
    if k is not None:
        body["k"] = int(k)
    lengths = [int(np.asarray(s).size) for s in sequences]
    if score_ids is not None:
        body["score_ids"] = score_ids_to_wire(score_ids, lengths, fmt)
    if return_logsumexp:
        body["return_logsumexp"] = True
    if target_encoding is not None:  # v1.2: "coded" asks for a compact reply (msgpack only)
        body["target_encoding"] = target_encoding
    if mass_cutoff is not None:
        body["mass_cutoff"] = float(mass_cutoff)
    if sample_seed is not None:
        body["sample_seed"] = int(sample_seed)
    if fmt == "msgpack":
        arrays = [np.asarray(s, dtype=np.int32).reshape(-1) for s in sequences]
        body["input_ids"] = encode_tensor_msgpack(np.concatenate(arrays) if arrays else np.zeros(0, np.int32))
        body["lengths"] = [len(a) for a in arrays]
        return msgpack.packb(body, use_bin_type=True)
    body["input_ids"] = [np.asarray(s).reshape(-1).tolist() for s in sequences]
    return json.dumps(body).encode()


def _load_body(body: bytes, fmt: WireFormat, max_items: int | None = None) -> Any:
    """Parse ``body``. With ``max_items``, a msgpack array or map longer than that is refused before
    it is built (no valid request has an array longer than its token count, or a map of more than 5)."""
    limits = {} if max_items is None else {"max_array_len": max(max_items, 16), "max_map_len": 16}
    try:
        if fmt == "msgpack":
            return msgpack.unpackb(body, raw=False, strict_map_key=True, **limits)
        return json.loads(body)
    except RecursionError as exc:
        raise MalformedBody(f"{fmt} body nests too deeply") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError, UnicodeDecodeError, JSONDecodeError are all ValueErrors.
        if "exceeds max_array_len" in str(exc):
            raise RequestTooLarge(
                f"the body holds an array longer than this server's {max_items} tokens per request "
                f"(max_tokens_per_request), so it cannot be a valid request; split it into smaller requests"
            ) from exc
        raise MalformedBody(f"body is not valid {fmt}: {exc}") from exc


def _sequences_from_lists(input_ids: list, max_tokens: int | None) -> list[np.ndarray]:
    # Count first, from the list lengths alone, so an oversized batch is refused before any per-id work.
    for i, seq in enumerate(input_ids):
        if not isinstance(seq, list):
            raise InvalidRequest(f"input_ids[{i}] must be a list of token ids, found {type(seq).__name__}")
    total = sum(len(seq) for seq in input_ids)
    if max_tokens is not None and total > max_tokens:
        raise too_many_tokens(total, max_tokens)
    sequences = []
    for i, seq in enumerate(input_ids):
        if not all(is_int(t) for t in seq):
            pos, bad = next((j, t) for j, t in enumerate(seq) if not is_int(t))
            raise InvalidRequest(f"input_ids[{i}][{pos}] must be an integer token id, found {describe(bad)}")
        try:
            sequences.append(np.array(seq, dtype=np.int64))
        except OverflowError as exc:
            raise InvalidRequest(f"input_ids[{i}] holds an id that does not fit in 64 bits") from exc
    return sequences


def _sequences_from_tensor(tensor: np.ndarray, lengths: Any, max_tokens: int | None) -> list[np.ndarray]:
    if tensor.dtype.kind not in "iu":
        raise InvalidRequest(f"input_ids tensor must have an integer dtype, found {tensor.dtype.name}")
    if max_tokens is not None and tensor.size > max_tokens:
        raise too_many_tokens(tensor.size, max_tokens)
    if tensor.ndim == 2:
        if lengths is not None:
            raise InvalidRequest("'lengths' goes with a 1-D packed input_ids tensor, not a 2-D one")
        return [row.astype(np.int64) for row in tensor]
    if not isinstance(lengths, list) or not all(is_int(n) and n >= 0 for n in lengths):
        raise InvalidRequest("a 1-D input_ids tensor needs 'lengths': a list of non-negative ints")
    if sum(lengths) != tensor.shape[0]:
        raise InvalidRequest(f"'lengths' sum to {describe(sum(lengths))} but input_ids has {tensor.shape[0]} ids")
    bounds = np.cumsum([0, *lengths])  # every length is at most shape[0] here, so int64 holds them
    flat = tensor.astype(np.int64)
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]


def decode_topk_request(
    body: bytes, fmt: WireFormat, max_tokens: int | None = None, max_score_ids: int | None = None
) -> TopKRequest:
    """Decode and type-check a request body.

    With ``max_tokens``, an oversized request is refused as early as its size is known: from array
    lengths while parsing msgpack, from a tensor's shape, from list lengths, before any per-row object
    is built. With ``max_score_ids``, so is an ``m`` above it.

    Raises:
        MalformedBody: undecodable bytes or a broken tensor map.
        InvalidRequest: wrong types, unknown keys, empty batch or sequence, bad k or temperature,
            ``score_ids`` that do not match ``input_ids`` (see :func:`score_ids_from_body`).
        RequestTooLarge: more than ``max_tokens`` tokens.
    """
    max_items = None if max_tokens is None else max(max_tokens, max_score_ids or 0)  # a score_ids row holds m
    obj = _load_body(body, fmt, max_items=max_items)
    if not isinstance(obj, dict):
        raise InvalidRequest(f"body must be a map with 'input_ids', found {type(obj).__name__}")
    if not all(isinstance(key, str) for key in obj):
        bad = next(key for key in obj if not isinstance(key, str))
        raise InvalidRequest(f"field names must be strings, found {describe(bad)}; pack keys as str (msgpack use_bin_type=True)")
    unknown = set(obj) - _REQUEST_KEYS
    if unknown:
        raise InvalidRequest(f"unknown field(s) {describe(sorted(unknown))}; expected {sorted(_REQUEST_KEYS)}")
    protocol = obj.get("protocol", PROTOCOL_VERSION)
    if not (is_int(protocol) and protocol == PROTOCOL_VERSION):
        raise InvalidRequest(f"protocol {describe(protocol)} is not supported; this server speaks {PROTOCOL_VERSION}")
    if "input_ids" not in obj:
        raise InvalidRequest("missing field 'input_ids' (a list of token-id lists)")
    input_ids = obj["input_ids"]
    if is_tensor_map(input_ids):
        if fmt != "msgpack":
            raise InvalidRequest("tensor maps are for msgpack bodies; in JSON send nested lists")
        check_tensor_map(input_ids, max_tokens)
        sequences = _sequences_from_tensor(decode_tensor_msgpack(input_ids, "input_ids"), obj.get("lengths"), max_tokens)
    elif isinstance(input_ids, list):
        if "lengths" in obj:
            raise InvalidRequest("'lengths' goes with a packed input_ids tensor, not with nested lists")
        sequences = _sequences_from_lists(input_ids, max_tokens)
    else:
        raise InvalidRequest(f"input_ids must be a list of lists or a tensor, found {type(input_ids).__name__}")
    if not sequences:
        raise InvalidRequest("input_ids is empty: send at least one sequence")
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise InvalidRequest(f"input_ids[{i}] is empty: every sequence needs at least one token")

    k = obj.get("k")
    if k is not None and not is_int(k):
        raise InvalidRequest(f"k must be an integer, found {describe(k)}")
    temperature = obj.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InvalidRequest(f"temperature must be a number, found {describe(temperature)}")
    try:
        value = float(temperature)
    except OverflowError:  # a JSON integer of hundreds of digits
        value = math.inf
    if not (math.isfinite(value) and value >= MIN_TEMPERATURE):
        raise InvalidRequest(
            f"temperature must be finite and > 0, at least {MIN_TEMPERATURE} (smaller values overflow the logits / T), "
            f"found {describe(temperature)}"
        )
    score_ids = obj.get("score_ids")
    if score_ids is not None:
        score_ids = score_ids_from_body(score_ids, fmt, [len(s) for s in sequences], max_score_ids)
    return_logsumexp = flag_from_body(obj.get("return_logsumexp"), "return_logsumexp")
    encoding, cutoff = encoding_from_body(obj, fmt)
    if encoding == "sampled":
        if k is None or not 1 <= k <= MAX_SAMPLED_K:
            raise InvalidRequest(f"target_encoding 'sampled' needs k (the draws per position) in [1, {MAX_SAMPLED_K}], "
                                 f"found {describe(k)}")
        if score_ids is not None or return_logsumexp:
            raise InvalidRequest("target_encoding 'sampled' does not combine with score_ids or return_logsumexp; "
                                 "send those in a request of their own")
    return TopKRequest(sequences=sequences, k=k, temperature=value, score_ids=score_ids, return_logsumexp=return_logsumexp,
                       target_encoding=encoding, mass_cutoff=cutoff, sample_seed=sample_seed_from_body(obj, encoding))


# -------------------------------------------------------------------------------------- response


@dataclass
class TopKResponse:
    """Top-k teacher targets for a batch of sequences, rows packed sequence after sequence.

    Attributes:
        indices: ``[sum(L), k]`` token ids (uint16 when the vocab fits, else int32), by descending prob.
        logprobs: ``[sum(L), k]`` float16, ``log p_T(id | prefix)``.
        tail_logprob: ``[sum(L)]`` float32, ``log(1 - sum_k p_T)`` from the full vocabulary.
        lengths: rows per sequence (= input lengths).
        weights_fingerprint: the served weights' identity (``""`` from servers before it was sent), so a
            client behind a load balancer can check that every reply came from the same teacher.
        score_logprobs: v1.1, ``[sum(L), m]`` float32 ``log p_T`` of the request's ``score_ids``, or None.
        logsumexp: v1.1, ``[sum(L)]`` float32 ``logsumexp(logits / T)``, or None.
        target_encoding, mass_cutoff: v1.2, how the top-k tensors travel (``"coded"``: one codec block;
            decoded ``logprobs`` are then float32 on the codec's grid, rows sorted by descending prob).
    """

    model: str
    tokenizer_sha256: str
    vocab_size: int
    k: int
    temperature: float
    lengths: list[int]
    indices: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION
    weights_fingerprint: str = ""
    score_logprobs: np.ndarray | None = None
    logsumexp: np.ndarray | None = None
    target_encoding: str = "fp16"
    mass_cutoff: float = 0.0

    def split(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per sequence ``(indices [L_i, k], logprobs [L_i, k], tail_logprob [L_i])`` views."""
        bounds = np.cumsum([0, *self.lengths])
        return [
            (self.indices[a:b], self.logprobs[a:b], self.tail_logprob[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]


def index_dtype(vocab_size: int) -> np.dtype:
    """uint16 ids when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


_TENSOR_FIELDS = {"indices": None, "logprobs": "float16", "tail_logprob": "float32"}


def encode_topk_response(response: TopKResponse, fmt: WireFormat) -> bytes:
    """Encode with the contract's dtypes: ids uint16/int32, log-probs float16, tail float32."""
    tensors = {
        "indices": response.indices.astype(index_dtype(response.vocab_size), copy=False),
        "logprobs": response.logprobs.astype(np.float16, copy=False),
        "tail_logprob": response.tail_logprob.astype(np.float32, copy=False),
    }
    body: dict[str, Any] = {
        "protocol": response.protocol,
        "model": response.model,
        "tokenizer_sha256": response.tokenizer_sha256,
        "vocab_size": response.vocab_size,
        "k": response.k,
        "temperature": response.temperature,
        "lengths": list(response.lengths),
        "timing": response.timing,
    }
    if response.weights_fingerprint:  # optional: v1 clients ignore it
        body["weights_fingerprint"] = response.weights_fingerprint
    extra = reply_tensors_to_wire({"score_logprobs": response.score_logprobs, "logsumexp": response.logsumexp}, fmt)
    if response.target_encoding in ("coded", "sampled"):
        if fmt != "msgpack":
            raise InvalidRequest(f"target_encoding {response.target_encoding!r} replies are binary: accept application/msgpack")
        body["target_encoding"] = response.target_encoding
        body["targets_coded"] = (
            encode_coded_reply(response.indices, response.logprobs, response.tail_logprob, response.vocab_size,
                               response.mass_cutoff) if response.target_encoding == "coded"
            else encode_sampled_reply(response.indices, response.logprobs, response.k, response.vocab_size))
        body.update(extra)
        return msgpack.packb(body, use_bin_type=True)
    if fmt == "msgpack":
        body.update({name: encode_tensor_msgpack(t) for name, t in tensors.items()})
        body.update(extra)
        return msgpack.packb(body, use_bin_type=True)
    body.update({name: tensor_to_json(t) for name, t in tensors.items()})
    body.update(extra)
    return json.dumps(body, allow_nan=False).encode()


def decode_topk_response(body: bytes, fmt: WireFormat) -> TopKResponse:
    """Decode a response (client side) and check that shapes agree with ``lengths`` and ``k``."""
    obj = _load_body(body, fmt)
    coded = isinstance(obj, dict) and obj.get("target_encoding") in ("coded", "sampled")
    if not isinstance(obj, dict) or ("indices" not in obj and not coded):
        raise MalformedBody(f"not a /v1/topk response: {str(obj)[:200]}")
    if coded:
        tensors = decode_coded_reply(obj, sum(obj["lengths"]), obj["k"], obj["vocab_size"])
    elif fmt == "msgpack":
        tensors = {name: decode_tensor_msgpack(obj[name], name) for name in _TENSOR_FIELDS}
    else:
        id_dtype = index_dtype(obj["vocab_size"]).name
        tensors = {
            name: tensor_from_json(obj[name], name, dtype or id_dtype) for name, dtype in _TENSOR_FIELDS.items()
        }
    rows, k = sum(obj["lengths"]), obj["k"]
    if tensors["indices"].shape != (rows, k) or tensors["logprobs"].shape != (rows, k):
        raise MalformedBody(f"response tensors do not have shape [{rows}, {k}] from lengths and k")
    if tensors["tail_logprob"].shape != (rows,):
        raise MalformedBody(f"tail_logprob does not have shape [{rows}]")
    tensors.update(reply_tensors_from_wire(obj, fmt, rows))  # v1.1: None where absent
    return TopKResponse(
        model=obj["model"],
        tokenizer_sha256=obj["tokenizer_sha256"],
        vocab_size=obj["vocab_size"],
        k=k,
        temperature=obj["temperature"],
        lengths=list(obj["lengths"]),
        timing=obj.get("timing", {}),
        protocol=obj.get("protocol", PROTOCOL_VERSION),
        weights_fingerprint=str(obj.get("weights_fingerprint", "")),
        target_encoding=obj["target_encoding"] if coded else "fp16",
        **tensors,
    )


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The JSON error body every non-2xx answer carries."""
    return {"error": {"type": error_type, "message": message}}


__all__ = [
    "CONTRACT_VERSION",
    "JSON",
    "MIN_TEMPERATURE",
    "MSGPACK",
    "PROTOCOL_VERSION",
    "InvalidRequest",
    "MalformedBody",
    "RequestTooLarge",
    "TopKRequest",
    "TopKResponse",
    "UnsupportedContentType",
    "decode_topk_request",
    "decode_topk_response",
    "describe",
    "encode_topk_request",
    "encode_topk_response",
    "error_body",
    "format_from_content_type",
    "index_dtype",
    "max_body_bytes",
    "max_score_entries",
    "media_type",
    "reply_bytes",
    "response_format",
]
