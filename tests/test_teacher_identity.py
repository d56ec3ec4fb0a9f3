"""Network teachers against real servers: replicas share the load, another teacher is never used
silently, a refused request stops the run at once, a garbled reply is a failure and not a crash.

A load balancer in front of two replicas and a faulty proxy stand in for the network between
trainer and service (what a Kubernetes Service or a broken middlebox does); the servers are real.
"""

from __future__ import annotations

import http.server
import itertools
import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch

from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
from student_trainer.teachers import CachedTeacher, DirectTeacher
from student_trainer.teachers.fallback import FallbackTeacher
from student_trainer.teachers.network import NetworkTeacher, TeacherMismatch, TeacherRejected, TeacherUnavailable
from student_trainer.training.recipe import Batch, build_teacher, train
from student_trainer.teachers.process import free_port
from teacher_server.engines.hf import weights_fingerprint
from tests.conftest import start_server
from tests.test_network_mode import DelayingProxy, metric_lines
from tests.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def other_weights_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny teacher's tokenizer and architecture, other weights, and the same folder name (so only
    the weights fingerprint tells them apart: a finetuned teacher deployed under the old name)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("finetuned") / tiny_model_dir.name
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory):
    """Two replicas of the same teacher, with a small request limit and k limit."""
    env = {"TEACHER_MAX_K": "32", "TEACHER_DEFAULT_K": "16", "TEACHER_MAX_TOKENS_PER_REQUEST": "4096"}
    servers = [start_server(str(tiny_model_dir), tmp_path_factory.mktemp(f"replica{i}"), env=env) for i in range(2)]
    yield servers
    for server in servers:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def other_server(other_weights_dir, tmp_path_factory):
    server = start_server(str(other_weights_dir), tmp_path_factory.mktemp("other"))
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def manifest(roots) -> dict:
    return read_manifest(roots[0] / "docs")


def network(urls: list[str], manifest: dict, k: int = 16, **kwargs) -> NetworkTeacher:
    return NetworkTeacher(urls, k, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"], **kwargs)


def batches(roots, count: int, rows: int = 4) -> list[Batch]:
    dataset = PretokenizedShardDataset(roots[0] / "docs", "train")
    return [Batch.from_rows([dataset[(b * rows + r) % len(dataset)] for r in range(rows)]) for b in range(count)]


def served_topk_requests(url: str) -> float:
    """``/v1/topk`` requests answered 200, from the server's own Prometheus metrics."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("teacher_requests_total{") and '"/v1/topk"' in line and '"200"' in line)


# ------------------------------------------------------------------------------------ replicas


def test_two_replicas_both_serve_and_the_targets_do_not_change(replicas, roots, manifest, tiny_engine) -> None:
    urls = [server.url for server in replicas]
    before = [served_topk_requests(url) for url in urls]
    teacher = network(urls, manifest, teacher_model=replicas[0].model)
    direct = DirectTeacher(tiny_engine, k=16, temperature=1.0)
    try:
        work = batches(roots, 8)
        for batch in work[:2]:
            teacher.prefetch(batch.input_ids, batch.lengths, batch.indices)
        for i, batch in enumerate(work):
            if i + 2 < len(work):  # two in flight, like the training loop's prefetch
                teacher.prefetch(work[i + 2].input_ids, work[i + 2].lengths, work[i + 2].indices)
            got = teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
            want = direct.targets_for(batch.input_ids, batch.lengths, batch.indices)
            torch.testing.assert_close(got.indices, want.indices)
        assert sum(teacher.requests_per_url) == 8
        assert min(teacher.requests_per_url) >= 3, teacher.requests_per_url  # shared, not failover
    finally:
        teacher.close()
    served = [served_topk_requests(url) - b for url, b in zip(urls, before)]
    assert served == [float(n) for n in teacher.requests_per_url]


def test_sequential_requests_alternate_between_replicas(replicas, roots, manifest) -> None:
    teacher = network([server.url for server in replicas], manifest, teacher_model=replicas[0].model)
    try:
        for batch in batches(roots, 6):
            teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
        assert teacher.requests_per_url == [3, 3]
    finally:
        teacher.close()


# ------------------------------------------------------------------------------------ identity


def test_models_publishes_the_weights_fingerprint(replicas, tiny_model_dir) -> None:
    info = httpx.get(f"{replicas[0].url}/v1/models").json()["data"][0]
    assert info["weights_fingerprint"] == weights_fingerprint(str(tiny_model_dir))


def test_a_replica_with_other_weights_is_refused(replicas, other_server, manifest) -> None:
    with pytest.raises(TeacherMismatch, match="weights fingerprint .* every replica must serve the same teacher"):
        network([replicas[0].url, other_server.url], manifest, teacher_model=replicas[0].model)


def test_a_pinned_fingerprint_refuses_other_weights_and_allow_lets_them_through(other_server, manifest,
                                                                               tiny_model_dir) -> None:
    expected = weights_fingerprint(str(tiny_model_dir))
    with pytest.raises(TeacherMismatch, match="weights fingerprint"):
        network([other_server.url], manifest, teacher_model=other_server.model, weights_fingerprint=expected)
    teacher = network([other_server.url], manifest, teacher_model=other_server.model, weights_fingerprint=expected,
                      allow_mismatch=True)
    teacher.close()


def test_a_service_serving_another_model_than_teacher_model_is_refused(replicas, manifest) -> None:
    with pytest.raises(TeacherMismatch, match="set teacher_model"):
        network([replicas[0].url], manifest, teacher_model="smollm2-135m-instruct")


class RoundRobinBalancer(DelayingProxy):
    """A TCP load balancer: each new connection goes to the next upstream (as a Kubernetes Service may)."""

    def __init__(self, upstream_ports: list[int]) -> None:
        self._upstreams = itertools.cycle(upstream_ports)
        super().__init__(upstream_ports[0], delay=0.0)

    async def _handle(self, client_reader, client_writer) -> None:
        self.upstream_port = next(self._upstreams)
        await super()._handle(client_reader, client_writer)


def test_a_reply_from_another_teacher_behind_one_url_stops_the_run(replicas, other_server, roots, manifest) -> None:
    balancer = RoundRobinBalancer([replicas[0].port, other_server.port])
    try:
        # GET /v1/models takes the first connection (the right teacher), the requests the next one
        teacher = network([f"http://127.0.0.1:{balancer.port}"], manifest, teacher_model=replicas[0].model,
                          retries=0)
        batch = batches(roots, 1)[0]
        with pytest.raises(TeacherMismatch, match="a reply from .* weights fingerprint"):
            teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
        teacher.close()
    finally:
        balancer.close()


def test_a_fallback_with_other_weights_is_refused(other_server, roots, manifest, tiny_engine) -> None:
    primary = network([other_server.url], manifest, teacher_model=other_server.model)
    direct = DirectTeacher(tiny_engine, k=16, temperature=1.0)
    try:
        with pytest.raises(TeacherMismatch, match="fallback teacher direct:.* weights fingerprint"):
            FallbackTeacher([primary, direct])
        FallbackTeacher([primary, direct], allow_mismatch=True)
    finally:
        primary.close()


def test_a_cache_made_by_other_weights_is_refused_when_the_fingerprint_is_pinned(roots, tiny_model_dir, tmp_path,
                                                                                 other_weights_dir) -> None:
    from tests.test_cache_mode import write_cache

    cache = tmp_path / "cache"
    write_cache(other_weights_dir, roots[0] / "docs", cache)
    config = tiny_config(tmp_path / "run", roots[0] / "docs", teacher_mode="cached", teacher_cache=str(cache),
                         teacher_model=str(tiny_model_dir), teacher_fingerprint=weights_fingerprint(str(tiny_model_dir)))
    with pytest.raises(TeacherMismatch, match="teacher_fingerprint"):
        build_teacher(config, read_manifest(roots[0] / "docs"))
    assert CachedTeacher(cache, read_manifest(roots[0] / "docs"), 16, 1.0).weights_fingerprint == \
        weights_fingerprint(str(other_weights_dir))


# --------------------------------------------------------------------------- refusals and faults


def test_a_wrong_key_says_so_at_start(tiny_model_dir, tmp_path, manifest) -> None:
    server = start_server(str(tiny_model_dir), tmp_path, env={"TEACHER_API_KEY": "right"})
    try:
        for key in ("wrong", None):
            with pytest.raises(TeacherRejected, match="401 .*bad or missing key"):
                network([server.url], manifest, api_key=key, teacher_model=server.model)
    finally:
        server.stop()


def test_limits_are_checked_at_start(replicas, manifest) -> None:
    with pytest.raises(TeacherRejected, match="teacher_topk=64 but the service allows max_k=32"):
        network([replicas[0].url], manifest, k=64, teacher_model=replicas[0].model)
    with pytest.raises(TeacherRejected, match="takes at most 4096 per request"):
        network([replicas[0].url], manifest, teacher_model=replicas[0].model, max_request_tokens=8192)
    with pytest.raises(TeacherRejected, match="takes at most 1024 tokens"):
        network([replicas[0].url], manifest, teacher_model=replicas[0].model, max_sequence_length=4096)


class FaultyProxy:
    """An HTTP proxy in front of a real server that answers the n-th and later ``POST /v1/topk``
    with ``status`` and ``body`` instead (a misconfigured gateway, a corrupting middlebox)."""

    def __init__(self, upstream: str, after: int, status: int, body: bytes, content_type: str) -> None:
        proxy, self.seen = self, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length) if length else b""
                if self.command == "POST" and self.path == "/v1/topk":
                    proxy.seen += 1
                    if proxy.seen > after:
                        return self._answer(status, body, content_type)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                reply = httpx.request(self.command, upstream + self.path, content=data, headers=headers, timeout=60)
                self._answer(reply.status_code, reply.content, reply.headers.get("content-type", ""))

            def _answer(self, code: int, payload: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_4xx_mid_run_stops_at_once_with_the_servers_message_and_no_fallback(replicas, roots, tmp_path,
                                                                             tiny_model_dir) -> None:
    error = json.dumps({"error": {"type": "invalid_request", "message": "k must be <= 8 here"}}).encode()
    proxy = FaultyProxy(replicas[0].url, after=6, status=422, body=error, content_type="application/json")
    output = tmp_path / "run"
    config = tiny_config(output, roots[0] / "docs", max_steps=20, eval_every=100, save_every=100,
                         teacher_mode="network", teacher_url=proxy.url, teacher_model=str(tiny_model_dir),
                         teacher_fallback=["direct"], teacher_retries=3, prefetch_depth=0)
    try:
        with pytest.raises(TeacherRejected, match=r"\(422\): k must be <= 8 here\. Saved .*fix the configuration"):
            train(config)
    finally:
        proxy.close()
    lines = metric_lines(output)
    assert not [line for line in lines if line.get("event") == "teacher_switch"]  # no fallback hid it
    assert proxy.seen == 7  # 2 evaluation + 4 step requests, then the refused one, not retried
    assert any(line.get("event") == "teacher_error" for line in lines)
    assert list((output / "checkpoints").glob("step-*"))  # the steps done are kept


@pytest.mark.parametrize("body", [b"\x93garbage", b'{"indices": 1}'])
def test_a_garbled_reply_is_a_teacher_failure_that_falls_back(replicas, roots, tmp_path, tiny_model_dir, body) -> None:
    proxy = FaultyProxy(replicas[0].url, after=2, status=200, body=body, content_type="application/msgpack")
    output = tmp_path / "run"
    config = tiny_config(output, roots[0] / "docs", max_steps=6, eval_every=100, save_every=100,
                         teacher_mode="network", teacher_url=proxy.url, teacher_model=str(tiny_model_dir),
                         teacher_fallback=["direct"], teacher_retries=1, teacher_probe_s=1000, prefetch_depth=0)
    try:
        summary = train(config)
    finally:
        proxy.close()
    assert summary["steps"] == 6
    switches = [line for line in metric_lines(output) if line.get("event") == "teacher_switch"]
    assert len(switches) == 1 and switches[0]["to"].startswith("direct") and "garbled reply" in switches[0]["reason"]


def test_a_bad_teacher_url_is_refused_with_its_form(manifest) -> None:
    with pytest.raises(ValueError, match="http\\(s\\)://HOST:PORT"):
        network(["teacher:8000"], manifest)


def test_a_replica_down_at_start_is_skipped_and_the_other_serves(replicas, roots, manifest) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    teacher = network([dead, replicas[0].url], manifest, teacher_model=replicas[0].model)
    try:
        for batch in batches(roots, 4):
            teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
        assert teacher.requests_per_url == [0, 4]
    finally:
        teacher.close()
    with pytest.raises(TeacherUnavailable, match="did not answer GET /v1/models"):
        network([dead], manifest)


def test_resuming_with_other_teacher_weights_is_refused(roots, tmp_path, tiny_engine, other_weights_dir) -> None:
    from teacher_server.engines.hf import HFEngine

    settings = dict(max_steps=4, eval_every=4, save_every=2, stop_at_step=2)
    train(tiny_config(tmp_path, roots[0] / "docs", **settings), teacher=DirectTeacher(tiny_engine, 16, 1.0))
    other = DirectTeacher(HFEngine(str(other_weights_dir), device="cpu", dtype="float32"), 16, 1.0)
    settings.pop("stop_at_step")
    with pytest.raises(TeacherMismatch, match="resuming would switch teachers"):
        train(tiny_config(tmp_path, roots[0] / "docs", **settings), teacher=other)
    summary = train(tiny_config(tmp_path, roots[0] / "docs", allow_teacher_mismatch=True, **settings), teacher=other)
    assert summary["steps"] == 4
