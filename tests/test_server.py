"""The teacher service in a real uvicorn process on loopback, called with httpx."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import httpx
import msgpack
import numpy as np
import pytest

from shared.tensors import encode_tensor_msgpack
from shared.wire import decode_topk_response, encode_topk_request
from teacher_server.engines.base import EngineRequest
from tests.conftest import REPO_ROOT, TINY_VOCAB, start_server

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGPACK = {"Content-Type": "application/msgpack", **AUTH}
JSON = {"Content-Type": "application/json", **AUTH}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    env = {
        "TEACHER_API_KEY": KEY,
        "TEACHER_MAX_K": "32",
        "TEACHER_DEFAULT_K": "8",
        "TEACHER_MAX_TOKENS_PER_REQUEST": "2048",
        "TEACHER_MAX_BODY_BYTES": "65536",
        "TEACHER_MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")),
    }
    process = start_server(str(tiny_model_dir), tmp_path_factory.mktemp("server"), env=env)
    yield process
    assert process.stop() == 0, process.log()


def post(server, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/topk", content=body, headers=headers, timeout=30)


def assert_matches_engine(response: httpx.Response, engine, sequences, k: int, temperature: float) -> None:
    fmt = "msgpack" if response.headers["content-type"].startswith("application/msgpack") else "json"
    decoded = decode_topk_response(response.content, fmt)
    expected = engine.topk([EngineRequest([np.asarray(s) for s in sequences], k, temperature)])[0]
    assert decoded.lengths == [len(s) for s in sequences] and decoded.k == k
    np.testing.assert_array_equal(decoded.indices, expected.indices)
    np.testing.assert_allclose(decoded.logprobs.astype(np.float32), expected.logprobs, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(decoded.tail_logprob, expected.tail_logprob, atol=1e-4)


def good_request(server, tiny_engine) -> None:
    sequences = [[5, 17, 200], [3]]
    response = post(server, encode_topk_request(sequences, k=4, temperature=1.0), MSGPACK)
    assert response.status_code == 200, response.text
    assert_matches_engine(response, tiny_engine, sequences, 4, 1.0)


def test_msgpack_request_gets_a_msgpack_answer(server, tiny_engine) -> None:
    sequences = [list(range(10, 60)), [7, 8, 9]]
    response = post(server, encode_topk_request(sequences, k=16, temperature=0.8), MSGPACK)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/msgpack"
    assert_matches_engine(response, tiny_engine, sequences, 16, 0.8)
    decoded = decode_topk_response(response.content, "msgpack")
    assert decoded.vocab_size == TINY_VOCAB and decoded.tokenizer_sha256 == tiny_engine.tokenizer_sha256
    assert set(decoded.timing) == {"queue_ms", "compute_ms"}


def test_json_request_gets_a_json_answer_with_the_default_k(server, tiny_engine) -> None:
    response = post(server, json.dumps({"input_ids": [[1, 2, 3, 4]]}).encode(), JSON)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 8 and body["temperature"] == 1.0 and len(body["indices"]) == 4
    assert_matches_engine(response, tiny_engine, [[1, 2, 3, 4]], 8, 1.0)


def test_accept_header_picks_the_response_format(server, tiny_engine) -> None:
    body = json.dumps({"input_ids": [[1, 2, 3]], "k": 2}).encode()
    response = post(server, body, {**JSON, "Accept": "application/msgpack"})
    assert response.headers["content-type"] == "application/msgpack"
    assert_matches_engine(response, tiny_engine, [[1, 2, 3]], 2, 1.0)


def _packed(ids: np.ndarray, **extra) -> bytes:
    return msgpack.packb({"input_ids": encode_tensor_msgpack(ids), **extra}, use_bin_type=True)


BAD_REQUESTS = [
    # (name, body, headers, status, error type, words in the message)
    ("malformed msgpack", b"\xc1\x00\xff", MSGPACK, 400, "malformed_body", "not valid msgpack"),
    ("truncated msgpack", encode_topk_request([[1, 2, 3]])[:-3], MSGPACK, 400, "malformed_body", "not valid msgpack"),
    ("malformed json", b'{"input_ids": [[1, 2', JSON, 400, "malformed_body", "not valid json"),
    ("broken tensor", msgpack.packb({"input_ids": {"dtype": "int32", "shape": [4], "data": b"\x00" * 12}, "lengths": [4]}),
     MSGPACK, 400, "malformed_body", "needs 16 bytes, found 12"),
    ("wrong top-level type", msgpack.packb([1, 2, 3]), MSGPACK, 422, "invalid_request", "must be a map"),
    ("string ids", msgpack.packb({"input_ids": [["a", "b"]]}), MSGPACK, 422, "invalid_request", "must be an integer"),
    ("nested garbage", msgpack.packb({"input_ids": [[1, [2, {"x": [None]}]]]}), MSGPACK, 422, "invalid_request", "input_ids[0][1]"),
    ("k as string", msgpack.packb({"input_ids": [[1]], "k": "5"}), MSGPACK, 422, "invalid_request", "k must be an integer"),
    ("negative id", encode_topk_request([[1, -1]]), MSGPACK, 422, "invalid_request", "-1 is outside the vocabulary"),
    ("id == vocab", encode_topk_request([[1, TINY_VOCAB]]), MSGPACK, 422, "invalid_request", f"{TINY_VOCAB} is outside"),
    ("k = 0", encode_topk_request([[1]], k=0), MSGPACK, 422, "invalid_request", "k must be between 1 and 32"),
    ("k > max", encode_topk_request([[1]], k=33), MSGPACK, 422, "invalid_request", "k must be between 1 and 32"),
    ("T = 0", encode_topk_request([[1]], temperature=0.0), MSGPACK, 422, "invalid_request", "temperature"),
    ("T < 0", encode_topk_request([[1]], temperature=-2.0), MSGPACK, 422, "invalid_request", "temperature"),
    ("T nan", encode_topk_request([[1]], temperature=float("nan")), MSGPACK, 422, "invalid_request", "temperature"),
    ("T inf", encode_topk_request([[1]], temperature=float("inf")), MSGPACK, 422, "invalid_request", "temperature"),
    ("T NaN json", b'{"input_ids": [[1]], "temperature": NaN}', JSON, 422, "invalid_request", "temperature"),
    ("empty batch", msgpack.packb({"input_ids": []}), MSGPACK, 422, "invalid_request", "empty"),
    ("empty sequence", msgpack.packb({"input_ids": [[1, 2], []]}), MSGPACK, 422, "invalid_request", "input_ids[1] is empty"),
    ("too many tokens", _packed(np.ones(2049, np.int32), lengths=[2049]), MSGPACK, 413, "request_too_large", "2049 tokens"),
    ("oversized body", b"\x00" * 200_000, MSGPACK, 413, "request_too_large", "65536 bytes"),
    ("wrong content type", b"input_ids=1", {"Content-Type": "text/plain", **AUTH}, 415, "unsupported_content_type", "text/plain"),
    ("no content type", b"{}", AUTH, 415, "unsupported_content_type", "application/msgpack"),
    ("missing key", encode_topk_request([[1]]), {"Content-Type": "application/msgpack"}, 401, "unauthorized", "missing API key"),
    ("bad key", encode_topk_request([[1]]), {"Content-Type": "application/msgpack", "Authorization": "Bearer nope"}, 401, "unauthorized", "not valid"),
    ("wrong scheme", encode_topk_request([[1]]), {"Content-Type": "application/msgpack", "Authorization": f"Basic {KEY}"}, 401, "unauthorized", "missing API key"),
]


@pytest.mark.parametrize("name, body, headers, status, error_type, words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_a_json_error_then_the_server_still_answers(
    server, tiny_engine, name, body, headers, status, error_type, words
) -> None:
    response = post(server, body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert words in error["message"], error["message"]
    good_request(server, tiny_engine)


def test_thirty_two_concurrent_clients_each_get_their_own_answer(server, tiny_engine) -> None:
    rng = np.random.default_rng(7)
    jobs = [
        ([rng.integers(0, TINY_VOCAB, size=int(rng.integers(1, 90))).tolist() for _ in range(int(rng.integers(1, 4)))],
         int(rng.integers(1, 33)), float(rng.choice([0.5, 1.0, 2.0])), "msgpack" if i % 2 else "json")
        for i in range(32)
    ]

    async def call(client: httpx.AsyncClient, sequences, k, temperature, fmt):
        headers = MSGPACK if fmt == "msgpack" else JSON
        return await client.post("/v1/topk", content=encode_topk_request(sequences, k, temperature, fmt), headers=headers)

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(call(client, *job) for job in jobs))

    responses = asyncio.run(run_all())
    for (sequences, k, temperature, _), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert_matches_engine(response, tiny_engine, sequences, k, temperature)
    metrics = httpx.get(server.url + "/metrics").text
    batches = [l for l in metrics.splitlines() if l.startswith("teacher_batch_requests_count")]
    requests_ok = [l for l in metrics.splitlines() if l.startswith('teacher_requests_total{route="/v1/topk",status="200"}')]
    assert batches and requests_ok
    # concurrent requests were coalesced: fewer engine passes than successful requests
    assert float(batches[0].split()[-1]) < float(requests_ok[0].split()[-1])


def test_bad_requests_mixed_with_good_ones_do_not_fail_them(server, tiny_engine) -> None:
    good = [([[i + 1, i + 2, i + 3] * (i + 1)], 3) for i in range(12)]

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            goods = [client.post("/v1/topk", content=encode_topk_request(s, k), headers=MSGPACK) for s, k in good]
            bads = [client.post("/v1/topk", content=body, headers=hdr) for _, body, hdr, *_ in BAD_REQUESTS]
            return await asyncio.gather(*goods, *bads)

    responses = asyncio.run(run_all())
    for (sequences, k), response in zip(good, responses[: len(good)]):
        assert response.status_code == 200, response.text
        assert_matches_engine(response, tiny_engine, sequences, k, 1.0)
    assert [r.status_code for r in responses[len(good):]] == [row[3] for row in BAD_REQUESTS]


def test_info_routes(server, tiny_engine) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    model = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]
    assert model["vocab_size"] == TINY_VOCAB and model["max_k"] == 32 and model["protocol"] == 1
    assert model["tokenizer_sha256"] == tiny_engine.tokenizer_sha256
    openapi = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/topk" in openapi["paths"] and httpx.get(server.url + "/docs").status_code == 200
    missing = httpx.get(server.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "http_error"
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("teacher_requests_total", "teacher_request_seconds_bucket", "teacher_tokens_total",
                 "teacher_tokens_per_second", "teacher_batch_requests_bucket", "teacher_queue_requests"):
        assert name in metrics, name


def test_sigterm_stops_the_server_cleanly(tiny_model_dir, tmp_path) -> None:
    process = start_server(str(tiny_model_dir), tmp_path, env={"TEACHER_MODEL_CACHE_DIR": str(tmp_path)})
    response = httpx.post(process.url + "/v1/topk", content=encode_topk_request([[1, 2]]), headers={"Content-Type": "application/msgpack"})
    assert response.status_code == 200
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(timeout=30) == 0
    assert "Application shutdown complete" in process.log()
    process.stop()


def test_a_model_that_cannot_load_exits_with_a_clear_error(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teacher_server", "--model", str(tmp_path / "nope.gguf"), "--port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "TEACHER_MODEL_CACHE_DIR": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def test_invalid_settings_are_reported(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teacher_server", "--max-k", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "TEACHER_DEFAULT_K": "8"},
    )
    assert result.returncode == 2
    assert "default_k (8) must not exceed max_k (4)" in result.stderr


def test_unknown_teacher_variables_are_refused_with_a_suggestion() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "teacher_server"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "TEACHER_MAXK": "8", "TEACHER_SERVICE_HOST": "10.0.0.1"},
    )
    assert result.returncode == 2
    assert "TEACHER_MAXK is not a teacher setting; did you mean TEACHER_MAX_K?" in result.stderr
    assert "enableServiceLinks: false" in result.stderr


def test_an_empty_api_key_means_no_key(monkeypatch) -> None:
    from teacher_server.settings import TeacherSettings

    monkeypatch.setenv("TEACHER_API_KEY", "")
    assert TeacherSettings().api_key is None
