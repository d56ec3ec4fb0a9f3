"""Wire contract v1.1 (issue 15, item 1): the teacher scores arbitrary ids (``score_ids`` ->
``score_logprobs``) and returns the tempered logits' ``logsumexp``, on the real HF engine of the tiny
random Llama, in-process and through a real uvicorn server; v1 requests and replies are unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidRequest
from shared.tensors import encode_tensor_msgpack
from shared.wire import (
    TopKResponse,
    decode_topk_request,
    decode_topk_response,
    encode_topk_request,
    encode_topk_response,
    reply_bytes,
)
from teacher_server.engines.base import EngineRequest
from tests.conftest import TINY_VOCAB
from tests.test_engine_vllm import fake_vllm, unpadded_dir  # noqa: F401 (fixtures: vLLM's output shape on CPU)

MAX_M = 16  # the live server's max_score_ids
REPLY_LIMIT = 262144
MSGPACK = {"Content-Type": "application/msgpack"}
JSON = {"Content-Type": "application/json"}
V1_REPLY_KEYS = ["protocol", "model", "tokenizer_sha256", "vocab_size", "k", "temperature", "lengths", "timing",
                 "weights_fingerprint", "indices", "logprobs", "tail_logprob"]


def random_ids(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY_VOCAB, size=shape)


def dense(engine, ids: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """``logits / T`` and ``log_softmax(logits / T)`` over the tokenizer's vocab, float64, from ``model(ids)``."""
    with torch.no_grad():
        logits = engine.model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]).logits[0, :, :TINY_VOCAB].double()
    return (logits / temperature).numpy(), torch.log_softmax(logits / temperature, dim=-1).numpy()


def score_ids_for(sequences: list[np.ndarray], m: int, seed: int) -> np.ndarray:
    """Packed ``[sum(L), m]`` ids: random, plus the vocab's first and last id and a repeated id."""
    ids = random_ids(seed, (sum(len(s) for s in sequences), m))
    ids[:, 0], ids[:, -1] = 0, TINY_VOCAB - 1
    if m > 2:
        ids[:, 1] = ids[:, 2]
    return ids


def dense_scores(engine, sequences, score_ids: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference ``score_logprobs [sum(L), m]`` and ``logsumexp [sum(L)]``, sequence by sequence."""
    scores, lse, row = [], [], 0
    for seq in sequences:
        scaled, logp = dense(engine, seq, temperature)
        scores.append(np.take_along_axis(logp, score_ids[row : row + len(seq)], axis=-1))
        lse.append((scaled - logp)[:, 0])
        row += len(seq)
    return np.concatenate(scores), np.concatenate(lse)


# ------------------------------------------------------------------------------------ the engine


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_score_logprobs_and_logsumexp_match_the_dense_reference(tiny_engine, one_torch_thread, temperature) -> None:
    sequences = [random_ids(1, 23), random_ids(2, 5)]
    score_ids = score_ids_for(sequences, 7, seed=3)
    rows = tiny_engine.topk([EngineRequest(sequences, 8, temperature, score_ids=score_ids, return_logsumexp=True)])[0]
    want_scores, want_lse = dense_scores(tiny_engine, sequences, score_ids, temperature)
    assert rows.score_logprobs.shape == (28, 7) and rows.score_logprobs.dtype == np.float32
    np.testing.assert_allclose(rows.score_logprobs, want_scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rows.logsumexp, want_lse, rtol=0, atol=1e-5)
    # logsumexp rebuilds every top-k entry: logprob = logit / T - logsumexp
    scaled = np.concatenate([dense(tiny_engine, s, temperature)[0] for s in sequences])
    rebuilt = np.take_along_axis(scaled, rows.indices.astype(np.int64), axis=-1) - rows.logsumexp[:, None]
    np.testing.assert_allclose(rebuilt, rows.logprobs, rtol=0, atol=1e-5)


def test_without_the_new_fields_the_engine_returns_no_scores(tiny_engine) -> None:
    rows = tiny_engine.topk([EngineRequest([random_ids(4, 6)], 4, 1.0)])[0]
    assert rows.score_logprobs is None and rows.logsumexp is None


def test_scores_are_the_same_in_row_chunks(tiny_engine) -> None:
    from teacher_server.engines.topk_math import topk_from_hidden

    hidden = torch.cat(tiny_engine.hidden_states([random_ids(5, 17)]))
    ids = random_ids(6, (17, 5))
    whole = topk_from_hidden(hidden, tiny_engine.lm_head, 4, 1.5, TINY_VOCAB, score_ids=ids, return_logsumexp=True)
    chunked = topk_from_hidden(hidden, tiny_engine.lm_head, 4, 1.5, TINY_VOCAB, chunk_bytes=4 * TINY_VOCAB * 3,
                               score_ids=ids, return_logsumexp=True)  # 3 rows a chunk, a ragged last one
    np.testing.assert_allclose(chunked.score_logprobs, whole.score_logprobs, atol=1e-5)  # fp32 matmuls of other shapes
    np.testing.assert_allclose(chunked.logsumexp, whole.logsumexp, atol=1e-5)


def test_a_dynamic_batch_mixing_requests_with_and_without_scores(tiny_engine) -> None:
    from teacher_server.batching import DynamicBatcher
    from teacher_server.metrics import ServerMetrics

    a, b, c, d = (random_ids(10 + i, n) for i, n in enumerate((9, 4, 13, 2)))
    requests = [
        EngineRequest([a, b], 4, 1.0),
        EngineRequest([c], 8, 2.0, score_ids=score_ids_for([c], 5, seed=20), return_logsumexp=True),
        EngineRequest([d, a], 2, 0.5, score_ids=score_ids_for([d, a], 3, seed=21)),
        EngineRequest([b], 5, 1.0, return_logsumexp=True),
    ]
    metrics = ServerMetrics()

    async def run_all():
        batcher = DynamicBatcher(tiny_engine, metrics, max_batch_tokens=10_000, max_wait_s=0.5, max_queued_tokens=10_000)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(req) for req in requests))
        finally:
            await batcher.stop()

    results = asyncio.run(run_all())
    rendered = metrics.render().decode()
    assert "teacher_batch_requests_count 1.0" in rendered and "teacher_batch_requests_sum 4.0" in rendered  # one pass
    for req, (rows, _) in zip(requests, results):
        alone = tiny_engine.topk([req])[0]
        np.testing.assert_array_equal(rows.indices, alone.indices)
        for name in ("logprobs", "tail_logprob", "score_logprobs", "logsumexp"):
            got, want = getattr(rows, name), getattr(alone, name)
            assert (got is None) == (want is None), name
            if want is not None:
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
        assert (rows.score_logprobs is None) == (req.score_ids is None) and (rows.logsumexp is None) != req.return_logsumexp


# ------------------------------------------------------------------------------------- the codec


def test_v1_bodies_are_byte_identical_to_before() -> None:
    """sha256 of the v1 encoders' output, recorded with the code before v1.1."""
    response = TopKResponse(
        model="m", tokenizer_sha256="ab" * 32, vocab_size=320, k=3, temperature=2.0, lengths=[2, 1],
        indices=np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.int32), logprobs=np.log(np.full((3, 3), 0.25, np.float32)),
        tail_logprob=np.array([-1.5, -np.inf, -0.25], np.float32), timing={"queue_ms": 1.5, "compute_ms": 2.25},
        weights_fingerprint="fp",
    )
    before = {
        ("resp", "msgpack"): "ec00d1579530222a13307ec94aaad454a5abc9f2d680d7b956688fe4e56aa1a3",
        ("req", "msgpack"): "27fe6c57a32c4be1948210ba42f2695ca40ef2f2130dd3fe5f66cac15758bfc0",
        ("resp", "json"): "843e6a5c2e44f11fea6bb01d7d7a53e925b60143bbd6ebdf876e68fa79b44b09",
        ("req", "json"): "2c9cb38b357f0ef5bc89b38bd0ecbce1796c6668096a39bb096838988f1d519a",
    }
    for fmt in ("msgpack", "json"):
        assert hashlib.sha256(encode_topk_response(response, fmt)).hexdigest() == before["resp", fmt]
        body = encode_topk_request([[1, 2, 3], [4]], k=5, temperature=0.5, fmt=fmt)
        assert hashlib.sha256(body).hexdigest() == before["req", fmt]
        request = decode_topk_request(body, fmt)
        assert request.score_ids is None and request.return_logsumexp is False


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("form", ["per-sequence", "packed"])
def test_score_ids_round_trip_in_both_forms(fmt, form) -> None:
    sequences = [[5, 6, 7], [8]]
    packed = np.arange(8).reshape(4, 2)
    score_ids = packed if form == "packed" else [packed[:3], packed[3:].tolist()]
    body = encode_topk_request(sequences, k=2, fmt=fmt, score_ids=score_ids, return_logsumexp=True)
    request = decode_topk_request(body, fmt, max_tokens=10, max_score_ids=2)
    np.testing.assert_array_equal(request.score_ids, packed)
    assert request.score_ids.dtype == np.int64 and request.return_logsumexp is True
    with pytest.raises(InvalidRequest, match=r"m = 2 ids per position; this server scores at most 1 \(max_score_ids\)"):
        decode_topk_request(body, fmt, max_tokens=10, max_score_ids=1)


# ------------------------------------------------------------------------------ the live server


@pytest.fixture(scope="module")
def live(tiny_engine, one_torch_thread, tmp_path_factory):
    """The real app around the real tiny engine in a real uvicorn (in a thread): max_score_ids 16."""
    import uvicorn

    from student_trainer.teachers.process import free_port
    from teacher_server.app import create_app
    from teacher_server.settings import TeacherSettings

    root = tmp_path_factory.mktemp("scoring-server")
    settings_ = TeacherSettings(model="tiny", device="cpu", max_k=32, default_k=8, max_tokens_per_request=2048,
                                max_score_ids=MAX_M, max_reply_bytes=REPLY_LIMIT, data_root=str(root), cache_root=str(root))
    server = uvicorn.Server(uvicorn.Config(create_app(settings_, engine=tiny_engine), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 60
    while not (server.started and httpx.get(url + "/ready").status_code == 200):
        assert time.monotonic() < deadline, "the in-thread server did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)


def post(url: str, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(url + "/v1/topk", content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_a_v1_request_gets_the_v1_reply_with_no_new_keys(live, tiny_engine, fmt) -> None:
    sequences = [random_ids(30, 11).tolist(), [3]]
    for body in (encode_topk_request(sequences, k=4, fmt=fmt),
                 json.dumps({"input_ids": sequences, "k": 4, "return_logsumexp": False}).encode()):
        response = post(live, body, MSGPACK if body[:1] != b"{" else JSON)
        assert response.status_code == 200, response.text
        reply_fmt = "json" if response.headers["content-type"] == "application/json" else "msgpack"
        raw = json.loads(response.content) if reply_fmt == "json" else msgpack.unpackb(response.content)
        assert list(raw) == V1_REPLY_KEYS
        decoded = decode_topk_response(response.content, reply_fmt)
        assert decoded.score_logprobs is None and decoded.logsumexp is None
        assert encode_topk_response(decoded, reply_fmt) == response.content  # nothing but v1 in those bytes
        expected = tiny_engine.topk([EngineRequest([np.asarray(s) for s in sequences], 4, 1.0)])[0]
        np.testing.assert_array_equal(decoded.indices, expected.indices)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("form", ["per-sequence", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_live_score_logprobs_match_the_dense_reference(live, tiny_engine, fmt, form, temperature) -> None:
    sequences = [random_ids(40, 19), random_ids(41, 1), random_ids(42, 6)]
    packed = score_ids_for(sequences, MAX_M, seed=43)
    bounds = np.cumsum([0, *map(len, sequences)])
    score_ids = packed if form == "packed" else [packed[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    body = encode_topk_request(sequences, k=6, temperature=temperature, fmt=fmt, score_ids=score_ids, return_logsumexp=True)
    response = post(live, body, MSGPACK if fmt == "msgpack" else JSON)
    assert response.status_code == 200, response.text
    decoded = decode_topk_response(response.content, fmt)
    want_scores, want_lse = dense_scores(tiny_engine, sequences, packed, temperature)
    assert decoded.score_logprobs.dtype == np.float32 and decoded.score_logprobs.shape == (26, MAX_M)
    np.testing.assert_allclose(decoded.score_logprobs, want_scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(decoded.logsumexp, want_lse, rtol=0, atol=1e-5)
    # logsumexp rebuilds the top-k entries exactly (the wire's fp16 logprobs could not): logit / T - logsumexp
    scaled, logp = (np.concatenate(parts) for parts in zip(*(dense(tiny_engine, s, temperature) for s in sequences)))
    top = decoded.indices.astype(np.int64)
    rebuilt = np.take_along_axis(scaled, top, axis=-1) - decoded.logsumexp[:, None]
    np.testing.assert_allclose(rebuilt, np.take_along_axis(logp, top, axis=-1), rtol=0, atol=1e-5)


def test_only_the_fields_asked_for_come_back(live) -> None:
    sequences = [[4, 5, 6]]
    only_lse = decode_topk_response(post(live, encode_topk_request(sequences, k=2, return_logsumexp=True), MSGPACK).content,
                                    "msgpack")
    assert only_lse.score_logprobs is None and only_lse.logsumexp.shape == (3,)
    only_scores = post(live, json.dumps({"input_ids": sequences, "k": 2, "score_ids": [[[1], [2], [3]]]}).encode(), JSON)
    assert only_scores.status_code == 200, only_scores.text
    assert "logsumexp" not in only_scores.json() and np.asarray(only_scores.json()["score_logprobs"]).shape == (3, 1)


def test_concurrent_mixed_requests_each_get_their_own_answer(live, tiny_engine) -> None:
    jobs = []
    for i in range(8):
        sequences = [random_ids(50 + i, 3 + 5 * i)]
        score_ids = score_ids_for(sequences, 1 + i, seed=60 + i) if i % 2 else None
        jobs.append((sequences, 2 + i, [1.0, 2.0][i % 2], score_ids, i % 3 == 0, ["msgpack", "json"][i % 2]))

    async def run_all():
        async with httpx.AsyncClient(base_url=live, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/topk", content=encode_topk_request(s, k, t, fmt, score_ids=ids, return_logsumexp=lse),
                            headers=MSGPACK if fmt == "msgpack" else JSON)
                for s, k, t, ids, lse, fmt in jobs))

    for (sequences, k, temperature, score_ids, lse, fmt), response in zip(jobs, asyncio.run(run_all())):
        assert response.status_code == 200, response.text
        decoded = decode_topk_response(response.content, fmt)
        want = tiny_engine.topk([EngineRequest(sequences, k, temperature, score_ids=score_ids, return_logsumexp=lse)])[0]
        np.testing.assert_array_equal(decoded.indices, want.indices)
        if score_ids is None:
            assert decoded.score_logprobs is None
        else:
            np.testing.assert_allclose(decoded.score_logprobs, want.score_logprobs, atol=1e-5)
        if lse:
            np.testing.assert_allclose(decoded.logsumexp, want.logsumexp, atol=1e-5)
        else:
            assert decoded.logsumexp is None


def test_models_advertises_the_contract_and_the_limit(live) -> None:
    model = httpx.get(live + "/v1/models").json()["data"][0]
    assert model["protocol"] == 1 and model["contract_version"] == "1.1"
    assert model["score_ids"] is True and model["max_score_ids"] == MAX_M


def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def tensor(dtype: str, shape: list, data: bytes) -> dict:
    return {"dtype": dtype, "shape": shape, "data": data}


TWO = [[1, 2], [3]]  # input_ids: 3 positions in 2 sequences
PACKED_TWO = {"input_ids": tensor("int32", [3], np.array([1, 2, 3], "<i4").tobytes()), "lengths": [2, 1]}
BAD_SCORES = [
    # (name, body, headers, status, words in the message)
    ("id == vocab", json.dumps({"input_ids": TWO, "score_ids": [[[1, 1], [2, TINY_VOCAB]], [[3, 3]]]}), JSON, 422,
     f"score_ids[0][1][1] = {TINY_VOCAB} is outside the vocabulary [0, {TINY_VOCAB})"),
    ("negative id, tensor", packb({**PACKED_TWO, "score_ids": encode_tensor_msgpack(np.array([[1], [2], [-1]], np.int32))}),
     MSGPACK, 422, "score_ids[1][0][0] = -1 is outside the vocabulary"),
    ("tensor rows != positions", packb({"input_ids": TWO, "score_ids": encode_tensor_msgpack(np.ones((4, 2), np.int32))}),
     MSGPACK, 422, "score_ids tensor has 4 rows but input_ids has 3 positions; expected shape [3, m]"),
    ("list rows != tokens", json.dumps({"input_ids": TWO, "score_ids": [[[1], [2]], [[3], [4]]]}), JSON, 422,
     "score_ids[1] must be a list of 1 rows, one per token of input_ids[1]; found 2 row(s)"),
    ("one list for two sequences", json.dumps({"input_ids": TWO, "score_ids": [[[1], [2], [3]]]}), JSON, 422,
     "score_ids must hold one list per input_ids sequence (2), found 1"),
    ("m above the limit", json.dumps({"input_ids": [[1]], "score_ids": [[list(range(MAX_M + 1))]]}), JSON, 422,
     f"m = {MAX_M + 1} ids per position; this server scores at most {MAX_M} (max_score_ids)"),
    ("m above the limit, tensor", packb({**PACKED_TWO, "score_ids": encode_tensor_msgpack(np.ones((3, MAX_M + 1), np.int32))}),
     MSGPACK, 422, f"at most {MAX_M} (max_score_ids)"),
    ("ragged m", json.dumps({"input_ids": TWO, "score_ids": [[[1, 2], [3]], [[4, 5]]]}), JSON, 422,
     "score_ids[0][1] has 1 ids but the first position has 2: m must be the same"),
    ("m = 0", packb({**PACKED_TWO, "score_ids": encode_tensor_msgpack(np.ones((3, 0), np.int32))}), MSGPACK, 422,
     "the score_ids tensor holds no ids"),
    ("float dtype", packb({**PACKED_TWO, "score_ids": encode_tensor_msgpack(np.ones((3, 2), np.float32))}), MSGPACK, 422,
     "score_ids tensor must have an integer dtype (int32 is usual), found float32"),
    ("dtype off the wire list", packb({**PACKED_TWO, "score_ids": tensor("float64", [3, 1], b"\0" * 24)}), MSGPACK, 400,
     "field 'score_ids': dtype 'float64' is not one of"),
    ("dtype not a string", packb({**PACKED_TWO, "score_ids": tensor(["int32"], [3, 1], b"\0" * 12)}), MSGPACK, 400,
     "field 'score_ids': dtype must be a string"),
    ("3-D tensor", packb({**PACKED_TWO, "score_ids": encode_tensor_msgpack(np.ones((3, 1, 1), np.int32))}), MSGPACK, 422,
     "score_ids tensor must be 2-D [sum(L), m] = [3, m], found 3-D"),
    ("tensor in JSON", json.dumps({"input_ids": TWO, "score_ids": {"dtype": "int32", "shape": [3, 1], "data": []}}), JSON, 422,
     "score_ids: tensor maps are for msgpack bodies"),
    ("string id", json.dumps({"input_ids": [[1]], "score_ids": [[[1, "2"]]]}), JSON, 422,
     "score_ids[0][0][1] must be an integer token id, found '2'"),
    ("bool id", packb({"input_ids": [[1]], "score_ids": [[[True]]]}), MSGPACK, 422, "score_ids[0][0][0] must be an integer"),
    ("not a list", json.dumps({"input_ids": [[1]], "score_ids": 7}), JSON, 422, "score_ids must be per-sequence lists"),
    ("flag not a bool", json.dumps({"input_ids": [[1]], "return_logsumexp": "yes"}), JSON, 422,
     "return_logsumexp must be true or false, found 'yes'"),
]


@pytest.mark.parametrize("name, body, headers, status, words", BAD_SCORES, ids=[row[0] for row in BAD_SCORES])
def test_bad_score_ids_get_a_4xx_naming_the_field(live, name, body, headers, status, words) -> None:
    response = post(live, body.encode() if isinstance(body, str) else body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and words in error["message"], error["message"]


def test_scored_entries_count_towards_the_reply_limit(live) -> None:
    sequences = [random_ids(70, 1000).tolist(), random_ids(71, 1000).tolist()]
    score_ids = random_ids(72, (2000, MAX_M))
    assert reply_bytes(2000, 16, TINY_VOCAB, "msgpack") <= REPLY_LIMIT < reply_bytes(2000, 16, TINY_VOCAB, "msgpack", MAX_M)
    refused = post(live, encode_topk_request(sequences, k=16, score_ids=score_ids), MSGPACK)
    assert refused.status_code == 413, refused.text
    message = refused.json()["error"]["message"]
    assert f"k=16 and {MAX_M} score_ids" in message and "fewer score_ids per position" in message
    # the same scored ids at a small k fit, though the body is bigger than a v1 body of 2,048 tokens could be
    body = encode_topk_request(sequences, k=2, score_ids=score_ids)
    assert len(body) > 2048 * 9 + 4096
    fits = post(live, body, MSGPACK)
    assert fits.status_code == 200, fits.text
    assert decode_topk_response(fits.content, "msgpack").score_logprobs.shape == (2000, MAX_M)


def test_a_json_body_keeps_the_v1_bound_even_with_score_ids(live) -> None:
    """JSON parsing holds the server's GIL, so only msgpack bodies get room for scored ids: the same
    request in JSON is refused before its body is read when it exceeds what 2,048 v1 tokens can take."""
    from shared.wire_checks import max_body_bytes

    sequences = [random_ids(73, 1000).tolist(), random_ids(75, 1000).tolist()]
    score_ids = random_ids(74, (2000, MAX_M))
    body = encode_topk_request(sequences, k=2, score_ids=score_ids, fmt="json")
    assert len(body) > max_body_bytes("json", 2048)
    refused = post(live, body, {"content-type": "application/json"})
    assert refused.status_code == 413 and "max_tokens_per_request" in refused.json()["error"]["message"]
    assert post(live, encode_topk_request(sequences, k=2, score_ids=score_ids), MSGPACK).status_code == 200


def test_the_vllm_engine_refuses_scoring_with_a_422_naming_it(fake_vllm, unpadded_dir, tmp_path) -> None:  # noqa: F811
    from fastapi.testclient import TestClient

    from teacher_server.app import create_app
    from teacher_server.engines.vllm_engine import VLLMEngine
    from teacher_server.settings import TeacherSettings

    engine = VLLMEngine(str(unpadded_dir), device="cuda", max_k=16)
    assert engine.supports_scoring is False
    ids = np.array([5, 17, 200])
    with pytest.raises(InvalidRequest, match="vLLM engine cannot serve score_ids or return_logsumexp"):
        engine.topk([EngineRequest([ids], 4, 1.0, return_logsumexp=True)])  # a direct caller is refused too
    settings_ = TeacherSettings(engine="vllm", model=str(unpadded_dir), max_k=16, default_k=4,
                                data_root=str(tmp_path), cache_root=str(tmp_path))
    with TestClient(create_app(settings_, engine=engine)) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/models").json()["data"][0]["score_ids"] is False
        for extra in ({"score_ids": [[[1], [2], [3]]]}, {"return_logsumexp": True}):
            refused = client.post("/v1/topk", content=json.dumps({"input_ids": [ids.tolist()], **extra}), headers=JSON)
            assert refused.status_code == 422, refused.text
            assert "vLLM engine cannot serve score_ids" in refused.json()["error"]["message"]
        assert client.post("/v1/topk", content=json.dumps({"input_ids": [ids.tolist()]}), headers=JSON).status_code == 200


# Structurally garbage score_ids next to valid input_ids: nested lists and maps of anything, tensor-like
# maps with any dtype, shape and data, and near-valid [B][L_i][m] lists with ids in and out of the vocab.
LEAVES = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.integers(-3, 330)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.binary(max_size=16))
TENSORS = st.fixed_dictionaries({
    "dtype": st.sampled_from(["int32", "uint16", "int64", "float32", "float64", "object"]) | LEAVES,
    "shape": st.lists(st.integers(-2, 2**64 - 1) | st.integers(0, 5), max_size=4) | LEAVES,
    "data": st.binary(max_size=64) | LEAVES,
})
TREES = st.recursive(LEAVES | TENSORS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=20)
NEAR_VALID = st.lists(st.lists(st.lists(st.integers(-2, 330) | LEAVES, min_size=0, max_size=3), max_size=4), max_size=3)
NEAR_TENSORS = st.builds(  # the right rows for some input_ids below, ids in and out of the vocabulary, bytes cut short
    lambda dtype, shape, ids, cut: tensor(dtype, shape, np.resize(np.asarray(ids), max(1, np.prod(shape))).astype(dtype).tobytes()[cut:]),
    st.sampled_from(["int32", "uint16", "int64", "float32", "uint8"]), st.sampled_from([[3, 1], [3, 2], [1, 3], [2, 1], [3], [3, 0]]),
    st.lists(st.integers(-2, 330), min_size=1, max_size=6), st.sampled_from([0, 0, 0, 1]))
SCORE_VALUES = NEAR_VALID | NEAR_TENSORS | TENSORS | TREES
BODIES = st.fixed_dictionaries(
    {"input_ids": st.sampled_from([[[1, 2, 3]], [[1, 2], [3]], [[7]]]), "score_ids": SCORE_VALUES},
    optional={"return_logsumexp": st.booleans() | LEAVES, "k": st.integers(1, 4)},
)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_garbage_score_ids_never_get_a_5xx(live, fmt) -> None:
    def encode(obj) -> bytes:
        if fmt == "msgpack":
            return packb(obj)
        return json.dumps(obj, default=lambda b: list(b)).encode()  # bytes become lists of ints in JSON

    statuses: dict[int, int] = {}
    with httpx.Client(base_url=live, timeout=30) as client:

        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
        @given(obj=BODIES)
        def one(obj) -> None:
            response = client.post("/v1/topk", content=encode(obj), headers=MSGPACK if fmt == "msgpack" else JSON)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (obj, response.text[:300])
            if response.status_code != 200:
                assert set(response.json()["error"]) == {"type", "message"}
                return
            decoded = decode_topk_response(response.content, fmt)
            rows = sum(decoded.lengths)
            assert decoded.score_logprobs is None or decoded.score_logprobs.shape[0] == rows

        one()
        assert client.get("/health").json() == {"status": "ok"}
    print(f"garbage score_ids, {fmt}: statuses {sorted(statuses.items())}")
