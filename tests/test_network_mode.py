"""Network mode against a real teacher server: parity with direct targets, prefetch, resume, refusals."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import numpy as np
import pytest
import torch

from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
from student_trainer.teachers import DirectTeacher
from student_trainer.teachers.network import NetworkTeacher, TeacherMismatch, TeacherUnavailable
from student_trainer.training.recipe import Batch, train
from student_trainer.teachers.process import free_port
from tests.conftest import start_server
from tests.test_train import step_losses, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = start_server(str(tiny_model_dir), tmp_path_factory.mktemp("server"), env={"TEACHER_API_KEY": "key"})
    yield process
    assert process.stop() == 0


@pytest.fixture
def network_teacher(server, roots, monkeypatch):
    manifest = read_manifest(roots[0] / "docs")
    teacher = NetworkTeacher([server.url], 16, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"], api_key="key",
                             teacher_model=server.model)
    yield teacher
    teacher.close()


def test_network_targets_equal_direct_targets(network_teacher, roots, tiny_engine) -> None:
    dataset = PretokenizedShardDataset(roots[0] / "docs", "train")
    direct = DirectTeacher(tiny_engine, k=16, temperature=1.0)
    first = Batch.from_rows([dataset[i] for i in (1, 40, 7)])
    second = Batch.from_rows([dataset[i] for i in (2, 3, 4)])
    network_teacher.prefetch(second.input_ids, second.lengths, second.indices)  # in flight while we ask for `first`
    for batch in (first, second):
        a = network_teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
        b = direct.targets_for(batch.input_ids, batch.lengths, batch.indices)
        torch.testing.assert_close(a.indices, b.indices)
        torch.testing.assert_close(a.logprobs, b.logprobs.half().float())  # the wire carries fp16
        torch.testing.assert_close(a.tail_logprob, b.tail_logprob)
    assert network_teacher.stats["requests"] == 2 and network_teacher.stats["bytes_received"] > 0


def test_a_network_run_with_prefetch_resumes_exactly(server, roots, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEACHER_API_KEY", "key")
    settings = dict(max_steps=8, eval_every=8, save_every=8, teacher_mode="network", teacher_url=server.url,
                    teacher_model=server.model, prefetch_depth=2)
    train(tiny_config(tmp_path / "straight", roots[0] / "docs", **settings))
    train(tiny_config(tmp_path / "resumed", roots[0] / "docs", stop_at_step=4, **settings))
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["sampler"]["position"] == 16  # the consumed rows, not the prefetched ones
    train(tiny_config(tmp_path / "resumed", roots[0] / "docs", **settings))
    a, b = step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("teacher/requests", 0) > 0 for m in metrics)


def test_a_teacher_with_another_tokenizer_is_refused(server, roots) -> None:
    manifest = read_manifest(roots[0] / "docs")
    with pytest.raises(TeacherMismatch, match="tokenized with sha256"):
        NetworkTeacher([server.url], 16, 1.0, "0" * 64, manifest["vocab_size"], api_key="key")


def test_an_unreachable_teacher_is_reported(roots) -> None:
    manifest = read_manifest(roots[0] / "docs")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherUnavailable, match="did not answer GET /v1/models"):
        NetworkTeacher([url], 16, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"])


def metric_lines(output_dir) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_step(output_dir) -> int:
    return max((line["step"] for line in metric_lines(output_dir) if "data/rows" in line), default=0)


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def docs_cache(roots, tiny_model_dir, tmp_path_factory):
    """A teacher cache (k=16) of the docs shards, written by `retnet-distill cache` in process."""
    from tests.test_cache_mode import write_cache

    output = tmp_path_factory.mktemp("fallback-cache") / "cache"
    write_cache(tiny_model_dir, roots[0] / "docs", output)
    return output


@pytest.mark.parametrize("fallback", ["direct", "cached"])
def test_kill_9_mid_training_falls_back_and_returns_without_losing_a_step(fallback, roots, tiny_model_dir, tmp_path,
                                                                         request) -> None:
    extra = {"teacher_cache": str(request.getfixturevalue("docs_cache"))} if fallback == "cached" else {}
    port = free_port()
    teacher = start_server(str(tiny_model_dir), tmp_path / "teacher", port=port)
    output = tmp_path / "run"
    events: list[str] = []

    def chaos() -> None:
        nonlocal teacher
        wait_until(lambda: last_step(output) >= 5)
        teacher.proc.send_signal(signal.SIGKILL)  # the service dies mid-training
        teacher.proc.wait()
        events.append(f"killed at step {last_step(output)}")
        teacher.stop()
        teacher = start_server(str(tiny_model_dir), tmp_path / "teacher", port=port)  # and comes back
        events.append(f"restarted at step {last_step(output)}")

    worker = threading.Thread(target=chaos)
    worker.start()
    config = tiny_config(output, roots[0] / "docs", max_steps=400, eval_every=400, save_every=400, teacher_mode="network",
                         teacher_url=f"http://127.0.0.1:{port}", teacher_fallback=[fallback], teacher_model=str(tiny_model_dir),
                         teacher_retries=1, teacher_probe_s=0.2, prefetch_depth=2, **extra)
    try:
        train(config)
    finally:
        worker.join()
        teacher.stop()
    lines = metric_lines(output)
    switches = [line for line in lines if line.get("event") == "teacher_switch"]
    assert [s["to"].split(":")[0] for s in switches[:2]] == [fallback, "network"], (events, switches)
    # every step trained exactly the rows an uninterrupted run trains, once, in order
    trained = [line["data/rows"] for line in sorted((l for l in lines if "data/rows" in l), key=lambda l: l["step"])]
    sampler = ShardSampler(len(PretokenizedShardDataset(roots[0] / "docs", "train")), seed=0)
    assert trained == [sampler.take(4) for _ in range(400)]
    after_return = [l for l in lines if "data/rows" in l and l["step"] > switches[1]["step"]]
    assert after_return and after_return[-1]["teacher/active_source"] == 0


def test_without_a_fallback_the_run_checkpoints_and_stops_after_the_deadline(roots, tiny_model_dir, tmp_path) -> None:
    teacher = start_server(str(tiny_model_dir), tmp_path / "teacher")
    output = tmp_path / "run"
    killer = threading.Thread(target=lambda: (wait_until(lambda: last_step(output) >= 3),
                                              teacher.proc.send_signal(signal.SIGKILL)))
    killer.start()
    config = tiny_config(output, roots[0] / "docs", max_steps=100000, warmup_steps=2, eval_every=100000,
                         save_every=100000, teacher_mode="network", teacher_url=teacher.url, teacher_retries=1,
                         teacher_deadline_s=1.5, teacher_model=str(tiny_model_dir))
    try:
        with pytest.raises(TeacherUnavailable, match="Saved .*step-.*start the same command again"):
            train(config)
    finally:
        killer.join()
        teacher.stop()
    checkpoints = sorted((output / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] >= 3 and state["sampler"]["position"] == 4 * state["step"]
    assert any(line.get("event") == "teacher_unavailable" for line in metric_lines(output))


class DelayingProxy:
    """A loopback TCP proxy that holds every response back by ``delay`` seconds: a slow teacher
    (a far-away or overloaded service) without touching the server."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port, self.delay, self.port = upstream_port, delay, free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(reader, writer, delay: float) -> None:
            try:
                while data := await reader.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer, 0.0), pipe(upstream_reader, client_writer, self.delay),
                             return_exceptions=True)

    def close(self) -> None:
        # Stop accepting; open pipes end with their connections (the loop lives on in its daemon thread).
        self._loop.call_soon_threadsafe(self._server.close)


def test_prefetch_hides_a_slow_teacher_up_to_its_depth(server, roots, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEACHER_API_KEY", "key")
    proxy = DelayingProxy(server.port, delay=0.25)
    try:
        waits = {}
        for depth in (0, 4):
            output = tmp_path / f"depth-{depth}"
            train(tiny_config(output, roots[0] / "docs", max_steps=16, eval_every=16, save_every=16,
                              teacher_mode="network", teacher_url=f"http://127.0.0.1:{proxy.port}", prefetch_depth=depth,
                              teacher_model=server.model))
            steps = [line for line in metric_lines(output) if "teacher/seconds" in line][4:]  # after the queue fills
            waits[depth] = sum(line["teacher/seconds"] for line in steps) / len(steps)
    finally:
        proxy.close()
    assert waits[0] >= 0.25  # every step waits for the full delay
    assert waits[4] < 0.5 * waits[0], waits  # with 4 requests in flight most of the delay is hidden


def _dense(indices: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[..., k]`` sparse log-probs -> ``[..., vocab]`` probabilities (padding entries carry no mass)."""
    dense = torch.zeros((*indices.shape[:-1], vocab), dtype=torch.float64)
    return dense.scatter_add_(-1, indices.long(), logprobs.double().exp())


@pytest.mark.parametrize("mass_cutoff", [0.0, 0.05])
def test_coded_network_targets_are_the_direct_ones_within_the_codec_bound(server, roots, tiny_engine, mass_cutoff) -> None:
    from shared.cache_format import DEFAULT_CODE_KNEE, DEFAULT_CODE_STEP
    from shared.target_codec import error_bound

    manifest = read_manifest(roots[0] / "docs")
    dataset = PretokenizedShardDataset(roots[0] / "docs", "train")
    batch = Batch.from_rows([dataset[i] for i in (1, 40, 7, 12)])
    direct = DirectTeacher(tiny_engine, k=16, temperature=1.0).targets_for(batch.input_ids, batch.lengths, batch.indices)
    teachers = {encoding: NetworkTeacher([server.url], 16, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"],
                                         api_key="key", teacher_model=server.model, target_encoding=encoding,
                                         mass_cutoff=mass_cutoff if encoding == "coded" else 0.0)
                for encoding in ("fp16", "coded")}
    try:
        targets = {name: t.targets_for(batch.input_ids, batch.lengths, batch.indices) for name, t in teachers.items()}
        received = {name: t.stats["bytes_received"] for name, t in teachers.items()}
    finally:
        for teacher in teachers.values():
            teacher.close()
    coded, vocab = targets["coded"], manifest["vocab_size"]
    valid = torch.isfinite(direct.tail_logprob) | torch.isfinite(direct.logprobs).any(-1)  # real rows
    # every kept id is one of the teacher's top 16, its log-prob within the grid's documented bound
    p_direct, p_coded = _dense(direct.indices, direct.logprobs, vocab), _dense(coded.indices, coded.logprobs, vocab)
    kept = p_coded > 0
    assert not (kept & (p_direct == 0)).any()
    bound = torch.from_numpy(error_bound(np.log(p_direct[kept].numpy()), DEFAULT_CODE_STEP, DEFAULT_CODE_KNEE))
    assert ((p_coded[kept].log() - p_direct[kept].log()).abs() <= bound + 1e-6).all()
    # mass is conserved up to the grid's error on the kept entries: what the cutoff drops is in the tail
    slack = torch.zeros_like(p_direct)
    slack[kept] = p_direct[kept] * (bound.double().exp() - 1)
    total = p_coded.sum(-1) + coded.tail_logprob.double().exp()
    reference = p_direct.sum(-1) + direct.tail_logprob.double().exp()
    assert ((total - reference).abs()[valid] <= slack.sum(-1)[valid] + 1e-5).all()
    if mass_cutoff:
        assert kept.sum() < (p_direct > 0).sum()  # the cutoff dropped ids
        assert ((coded.tail_logprob.double().exp() - direct.tail_logprob.double().exp())[valid] <= mass_cutoff + 1e-6).all()
    else:
        torch.testing.assert_close(coded.tail_logprob[valid], direct.tail_logprob[valid])  # the tail travels exactly
    assert received["coded"] < received["fp16"]


def test_a_mass_cutoff_without_the_coded_encoding_is_refused(tmp_path, roots) -> None:
    from student_trainer.training.config import ConfigError

    with pytest.raises(ConfigError, match="teacher_mass_cutoff .* needs teacher_encoding=coded"):
        tiny_config(tmp_path, roots[0] / "docs", teacher_mass_cutoff=0.05)


def test_sampled_network_targets_are_counts_of_reproducible_draws(server, roots) -> None:
    manifest = read_manifest(roots[0] / "docs")
    dataset = PretokenizedShardDataset(roots[0] / "docs", "train")
    batch = Batch.from_rows([dataset[i] for i in (1, 40, 7, 12)])
    other = Batch.from_rows([dataset[i] for i in (2, 3, 4, 5)])

    def fetch(encoding: str, k: int):
        teacher = NetworkTeacher([server.url], k, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"], api_key="key",
                                 teacher_model=server.model, target_encoding=encoding)
        try:
            got = [teacher.targets_for(b.input_ids, b.lengths, b.indices) for b in (batch, batch, other)]
            return got, teacher.stats["bytes_received"]
        finally:
            teacher.close()

    (first, again, _), sampled_bytes = fetch("sampled", 12)
    _, fp16_bytes = fetch("fp16", 16)
    real = batch.lengths[:, None] > torch.arange(batch.input_ids.size(1))[None]  # [B, L] real positions
    counts = torch.where(torch.isfinite(first.logprobs), (first.logprobs.exp() * 12).round(), torch.zeros(()))
    assert (counts.sum(-1)[real] == 12).all() and (counts.sum(-1)[~real] == 0).all()
    assert torch.isneginf(first.tail_logprob).all()  # sampled targets carry no tail
    torch.testing.assert_close(first.indices, again.indices)  # a batch's draws are seeded by its ids
    torch.testing.assert_close(first.logprobs, again.logprobs)
    assert sampled_bytes < fp16_bytes / 2


def test_sampled_encoding_refuses_a_fallback_and_too_many_draws(tmp_path, roots) -> None:
    from student_trainer.training.config import ConfigError

    with pytest.raises(ConfigError, match="cannot fall back"):
        tiny_config(tmp_path, roots[0] / "docs", teacher_mode="network", teacher_url="http://127.0.0.1:1",
                    teacher_encoding="sampled", teacher_fallback=["direct"])
    with pytest.raises(ConfigError, match="at most 255"):
        tiny_config(tmp_path, roots[0] / "docs", teacher_encoding="sampled", teacher_topk=300)
