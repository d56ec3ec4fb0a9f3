"""Network mode against a real teacher server: parity with direct targets, prefetch, resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
from student_trainer.teachers import DirectTeacher
from student_trainer.teachers.network import NetworkTeacher, TeacherMismatch, TeacherUnavailable
from student_trainer.train import Batch, train
from student_trainer.teacher_process import free_port
from tests.conftest import start_server
from tests.test_cache_mode import roots  # noqa: F401  (the shard set fixture)
from tests.test_train import step_losses, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = start_server(str(tiny_model_dir), tmp_path_factory.mktemp("server"), env={"TEACHER_API_KEY": "key"})
    yield process
    assert process.stop() == 0


@pytest.fixture
def network_teacher(server, roots, monkeypatch):  # noqa: F811
    manifest = read_manifest(roots[0] / "docs")
    teacher = NetworkTeacher([server.url], 16, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"], api_key="key")
    yield teacher
    teacher.close()


def test_network_targets_equal_direct_targets(network_teacher, roots, tiny_engine) -> None:  # noqa: F811
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


def test_a_network_run_with_prefetch_resumes_exactly(server, roots, tmp_path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("TEACHER_API_KEY", "key")
    settings = dict(max_steps=8, eval_every=8, save_every=8, teacher_mode="network", teacher_url=server.url,
                    prefetch_depth=2)
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


def test_a_teacher_with_another_tokenizer_is_refused(server, roots) -> None:  # noqa: F811
    manifest = read_manifest(roots[0] / "docs")
    with pytest.raises(TeacherMismatch, match="tokenized with sha256"):
        NetworkTeacher([server.url], 16, 1.0, "0" * 64, manifest["vocab_size"], api_key="key")


def test_an_unreachable_teacher_is_reported(roots) -> None:  # noqa: F811
    manifest = read_manifest(roots[0] / "docs")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherUnavailable, match="did not answer GET /v1/models"):
        NetworkTeacher([url], 16, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"])
