"""Wire v1.2: coded /v1/topk replies, negotiated by ``target_encoding``, checksummed; v1 untouched."""

from __future__ import annotations

import json

import httpx
import msgpack
import numpy as np
import pytest

from shared import target_codec as tc
from shared.errors import InvalidRequest, MalformedBody
from shared.wire import TopKResponse, decode_topk_request, decode_topk_response, encode_topk_request, encode_topk_response
from teacher_server.engines.base import EngineRequest
from tests.conftest import start_server

VOCAB = 49152


def reply(encoding: str = "fp16", cutoff: float = 0.0, rows: int = 7, k: int = 16) -> TopKResponse:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (rows, k + 1))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp[:, :k], axis=1)
    return TopKResponse(model="m", tokenizer_sha256="ab" * 32, vocab_size=VOCAB, k=k, temperature=1.0,
                        lengths=[rows - 2, 2], indices=np.stack([rng.choice(VOCAB, k, replace=False) for _ in range(rows)]),
                        logprobs=np.take_along_axis(logp[:, :k], order, 1).astype(np.float32),
                        tail_logprob=logp[:, k].astype(np.float32), target_encoding=encoding, mass_cutoff=cutoff)


def test_request_field_round_trip_and_v1_default():
    body = encode_topk_request([[1, 2, 3]], k=4, target_encoding="coded", mass_cutoff=0.01)
    req = decode_topk_request(body, "msgpack")
    assert (req.target_encoding, req.mass_cutoff) == ("coded", 0.01)
    plain = decode_topk_request(encode_topk_request([[1, 2, 3]], k=4), "msgpack")
    assert (plain.target_encoding, plain.mass_cutoff) == ("fp16", 0.0)
    assert b"target_encoding" not in encode_topk_request([[1, 2, 3]], k=4)  # a v1 body stays a v1 body


@pytest.mark.parametrize("fields, fmt, message", [
    ({"target_encoding": "zip"}, "msgpack", "target_encoding must be one of"),
    ({"target_encoding": "coded"}, "json", "send the request as application/msgpack"),
    ({"mass_cutoff": 0.1}, "msgpack", "mass_cutoff goes with target_encoding 'coded'"),
    ({"target_encoding": "coded", "mass_cutoff": 1.5}, "msgpack", r"mass_cutoff must be a number in \[0, 1\)"),
    ({"target_encoding": "sampled"}, "msgpack", r"'sampled' needs k \(the draws per position\) in \[1, 255\]"),
    ({"target_encoding": "sampled", "k": 256}, "msgpack", r"in \[1, 255\], found 256"),
    ({"target_encoding": "sampled", "k": 12}, "json", "send the request as application/msgpack"),
    ({"target_encoding": "sampled", "k": 12, "mass_cutoff": 0.1}, "msgpack", "mass_cutoff goes with target_encoding 'coded'"),
    ({"target_encoding": "coded", "sample_seed": 3}, "msgpack", "sample_seed goes with target_encoding 'sampled'"),
    ({"target_encoding": "sampled", "k": 12, "sample_seed": -1}, "msgpack", r"sample_seed must be an integer in \[0, 2\*\*63\)"),
    ({"target_encoding": "sampled", "k": 12, "return_logsumexp": True}, "msgpack", "does not combine with score_ids"),
])
def test_bad_encoding_fields_are_refused(fields, fmt, message):
    body = {"input_ids": [[1, 2]], **fields}
    raw = msgpack.packb(body) if fmt == "msgpack" else json.dumps(body).encode()
    with pytest.raises(InvalidRequest, match=message):
        decode_topk_request(raw, fmt)


def test_v1_reply_has_no_coded_fields():
    decoded = msgpack.unpackb(encode_topk_response(reply(), "msgpack"))
    assert "target_encoding" not in decoded and "targets_coded" not in decoded and "indices" in decoded


@pytest.mark.parametrize("cutoff", [0.0, 0.05])
def test_coded_reply_round_trip_is_smaller_and_within_the_bound(cutoff):
    original = reply("coded", cutoff, rows=300, k=64)
    coded = encode_topk_response(original, "msgpack")
    assert len(coded) < 0.8 * len(encode_topk_response(reply(rows=300, k=64), "msgpack"))
    got = decode_topk_response(coded, "msgpack")
    assert got.target_encoding == "coded" and got.indices.shape == (300, 64) and got.lengths == original.lengths
    for r in range(300):
        want = dict(zip(original.indices[r].tolist(), original.logprobs[r].tolist()))
        keep = np.isfinite(got.logprobs[r])
        tied_top = got.indices[r][got.logprobs[r] == got.logprobs[r][0]]  # equal codes on the grid sort by id
        assert original.indices[r][0] in tied_top and got.logprobs[r][0] == got.logprobs[r].max(), "top id first"
        for i, v in zip(got.indices[r][keep].tolist(), got.logprobs[r][keep].tolist()):
            assert abs(v - want[i]) <= tc.error_bound(np.array(want[i]), tc.DEFAULT_STEP, tc.DEFAULT_KNEE) + 1e-6
        if cutoff == 0:
            assert keep.all() and got.tail_logprob[r] == original.tail_logprob[r]


def test_sampled_request_and_reply_round_trip():
    req = decode_topk_request(encode_topk_request([[1, 2, 3]], k=12, target_encoding="sampled", sample_seed=7), "msgpack")
    assert (req.target_encoding, req.k, req.sample_seed) == ("sampled", 12, 7)
    rng = np.random.default_rng(1)
    rows, n = 40, 12
    draws = np.sort(rng.integers(0, 50, (rows, n)), axis=1)  # few distinct ids per row, as a peaked teacher gives
    ids, counts = np.zeros((rows, n), np.int64), np.zeros((rows, n), np.int64)
    for r in range(rows):
        unique, c = np.unique(draws[r], return_counts=True)
        order = np.argsort(-c, kind="stable")
        ids[r, :len(unique)], counts[r, :len(unique)] = unique[order], c[order]
    with np.errstate(divide="ignore"):
        logprobs = np.where(counts > 0, np.log(counts / n), -np.inf).astype(np.float32)
    sent = TopKResponse(model="m", tokenizer_sha256="ab" * 32, vocab_size=VOCAB, k=n, temperature=1.0, lengths=[30, 10],
                        indices=ids.astype(np.uint16), logprobs=logprobs, tail_logprob=np.full(rows, -np.inf, np.float32),
                        target_encoding="sampled")
    body = encode_topk_response(sent, "msgpack")
    got = decode_topk_response(body, "msgpack")
    assert got.target_encoding == "sampled" and got.indices.shape == (rows, n)
    assert np.isneginf(got.tail_logprob).all()
    for r in range(rows):  # the same ids with the same counts
        want = {i: c for i, c in zip(ids[r].tolist(), counts[r].tolist()) if c}
        have = {i: round(float(np.exp(v)) * n) for i, v in zip(got.indices[r].tolist(), got.logprobs[r].tolist())
                if np.isfinite(v)}
        assert have == want
    assert len(body) < len(encode_topk_response(TopKResponse(**{**sent.__dict__, "target_encoding": "fp16",
                                                                  "logprobs": logprobs.astype(np.float16)}), "msgpack"))
    obj = msgpack.unpackb(body)
    obj["target_encoding"] = "coded"  # a sampled block where a top-k block is announced
    with pytest.raises(MalformedBody, match="expected"):
        decode_topk_response(msgpack.packb(obj), "msgpack")


def test_corrupt_coded_reply_is_refused():
    payload = bytearray(encode_topk_response(reply("coded"), "msgpack"))
    block = msgpack.unpackb(bytes(payload))["targets_coded"]
    at = bytes(payload).find(block)
    payload[at + len(block) - 3] ^= 0x01
    with pytest.raises(MalformedBody, match="CRC32 mismatch"):
        decode_topk_response(bytes(payload), "msgpack")
    obj = msgpack.unpackb(bytes(payload))
    obj["targets_coded"] = block[:-5]
    with pytest.raises(MalformedBody, match="truncated"):
        decode_topk_response(msgpack.packb(obj), "msgpack")
    obj["targets_coded"], obj["k"] = block, 8  # a valid block, but not what the reply says
    with pytest.raises(MalformedBody, match="expected"):
        decode_topk_response(msgpack.packb(obj), "msgpack")


@pytest.mark.slow
def test_server_answers_coded_requests_and_v1_requests_alike(tiny_model_dir, tiny_engine, tmp_path_factory):
    env = {"TEACHER_MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")), "TEACHER_MAX_K": "32", "TEACHER_DEFAULT_K": "8"}
    server = start_server(str(tiny_model_dir), tmp_path_factory.mktemp("server"), env=env)
    try:
        sequences = [list(range(10, 60)), [7, 8, 9]]
        headers = {"Content-Type": "application/msgpack"}
        plain = httpx.post(server.url + "/v1/topk", content=encode_topk_request(sequences, k=16), headers=headers)
        coded = httpx.post(server.url + "/v1/topk", headers=headers,
                           content=encode_topk_request(sequences, k=16, target_encoding="coded"))
        assert plain.status_code == coded.status_code == 200, coded.text
        a, b = decode_topk_response(plain.content, "msgpack"), decode_topk_response(coded.content, "msgpack")
        expected = tiny_engine.topk([EngineRequest([np.asarray(s) for s in sequences], 16, 1.0)])[0]
        np.testing.assert_array_equal(a.indices, expected.indices)
        assert b.target_encoding == "coded" and len(coded.content) < len(plain.content)
        np.testing.assert_array_equal(b.tail_logprob, expected.tail_logprob)
        for r in range(len(expected.indices)):  # the same id sets; values within the grid's bound (ties sort by id)
            want = dict(zip(expected.indices[r].tolist(), expected.logprobs[r].tolist()))
            got = dict(zip(b.indices[r].tolist(), b.logprobs[r].tolist()))
            assert got.keys() == want.keys()
            assert all(abs(got[i] - v) <= tc.error_bound(np.array(v), tc.DEFAULT_STEP, tc.DEFAULT_KNEE) + 1e-6
                       for i, v in want.items())
        refused = httpx.post(server.url + "/v1/topk", headers={**headers, "Accept": "application/json"},
                             content=encode_topk_request(sequences, k=16, target_encoding="coded"))
        assert refused.status_code == 422 and "accept application/msgpack" in refused.text
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_server_draws_sampled_targets_reproducibly(tiny_model_dir, tiny_engine, tmp_path_factory):
    env = {"TEACHER_MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")), "TEACHER_MAX_K": "32", "TEACHER_DEFAULT_K": "8"}
    server = start_server(str(tiny_model_dir), tmp_path_factory.mktemp("server"), env=env)
    try:
        sequences = [list(range(10, 60)), [7, 8, 9]]
        headers = {"Content-Type": "application/msgpack"}

        def ask(seed: int) -> httpx.Response:
            return httpx.post(server.url + "/v1/topk", headers=headers,
                              content=encode_topk_request(sequences, k=12, target_encoding="sampled", sample_seed=seed))

        first, again, other = ask(5), ask(5), ask(6)
        assert first.status_code == again.status_code == other.status_code == 200, first.text
        a, b, c = (decode_topk_response(r.content, "msgpack") for r in (first, again, other))
        assert a.target_encoding == "sampled" and np.isneginf(a.tail_logprob).all()
        np.testing.assert_array_equal(a.indices, b.indices)  # the same body draws the same ids
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert not np.array_equal(a.indices, c.indices)
        counts = np.where(np.isfinite(a.logprobs), np.rint(np.exp(a.logprobs) * 12), 0)
        assert (counts.sum(axis=1) == 12).all()
        # the server's draws are the engine's own for the same seed
        expected = tiny_engine.topk([EngineRequest([np.asarray(s) for s in sequences], 12, 1.0, sample_n=12, sample_seed=5)])[0]
        np.testing.assert_array_equal(a.indices, expected.indices)
        refused = httpx.post(server.url + "/v1/topk", headers=headers,
                             content=encode_topk_request(sequences, k=64, target_encoding="sampled"))
        assert refused.status_code == 422, refused.text  # k above the server's TEACHER_MAX_K
    finally:
        assert server.stop() == 0, server.log()
