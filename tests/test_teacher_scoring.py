"""The trainer's side of wire v1.1 (issue 15): direct and network teachers score ids the caller
chooses (e.g. a student's sampled tokens and its top k), exact against a dense reference."""

from __future__ import annotations

import pytest
import torch

from student_trainer.data.shards import read_manifest
from student_trainer.teachers.targets import packed_score_ids
from student_trainer.teachers import DirectTeacher
from student_trainer.teachers.network import NetworkTeacher, TeacherRejected
from tests.conftest import TINY_VOCAB, start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTHS = torch.tensor([9, 5])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=generator)
    ids[1, 5:] = 0  # right padding
    score_ids = torch.randint(0, TINY_VOCAB, (2, 9, 6), generator=generator)
    return ids, score_ids


def _dense(engine, ids: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    """Per row: log_softmax(logits / T) over the tokenizer's ids, ``[L_i, V]`` float64."""
    out = []
    with torch.no_grad():
        for row, n in enumerate(LENGTHS.tolist()):
            logits = engine.model(input_ids=ids[row:row + 1, :n]).logits[0, :, :TINY_VOCAB].double()
            out.append(torch.log_softmax(logits / temperature, -1))
    return out


def _check(scores, ids, score_ids, engine, temperature) -> None:
    assert scores.score_logprobs.shape == (2, 9, 6) and scores.logsumexp.shape == (2, 9)
    for row, (reference, n) in enumerate(zip(_dense(engine, ids, temperature), LENGTHS.tolist())):
        expected = reference.gather(-1, score_ids[row, :n])
        torch.testing.assert_close(scores.score_logprobs[row, :n].double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.isinf(scores.score_logprobs[row, n:]).all() and torch.isinf(scores.logsumexp[row, n:]).all()
        # the top-k targets come from the same forward: their log-probs are the reference's too
        topk = scores.targets.logprobs[row, :n].double()  # fp16 on the wire: 11 bits of mantissa
        torch.testing.assert_close(topk, reference.gather(-1, scores.targets.indices[row, :n]), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_direct_teacher_scores_the_ids_it_is_given(tiny_engine, temperature) -> None:
    ids, score_ids = _batch()
    scores = DirectTeacher(tiny_engine, k=8, temperature=temperature).scores_for(ids, LENGTHS, score_ids)
    _check(scores, ids, score_ids, tiny_engine, temperature)
    with torch.no_grad():
        logits = tiny_engine.model(input_ids=ids[:1]).logits[0, :, :TINY_VOCAB].double() / temperature
    torch.testing.assert_close(scores.logsumexp[0].double(), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)


def test_a_request_can_ask_for_another_temperature_than_the_runs(tiny_engine) -> None:
    """On-policy scoring with a sharper teacher (onpolicy_teacher_temperature): one request at 0.5 from a
    teacher whose run uses 1; its targets say so, and the next request is at 1 again."""
    ids, score_ids = _batch()
    teacher = DirectTeacher(tiny_engine, k=8, temperature=1.0)
    sharp = teacher.scores_for(ids, LENGTHS, score_ids, temperature=0.5)
    _check(sharp, ids, score_ids, tiny_engine, 0.5)
    assert sharp.targets.temperature == 0.5
    plain = teacher.scores_for(ids, LENGTHS, score_ids)
    _check(plain, ids, score_ids, tiny_engine, 1.0)
    assert plain.targets.temperature == 1.0


def test_packed_score_ids_drop_the_padding_rows() -> None:
    _, score_ids = _batch()
    packed = packed_score_ids(score_ids, LENGTHS.tolist())
    assert packed.shape == (14, 6) and (packed[9:] == score_ids[1, :5].numpy()).all()
    with pytest.raises(ValueError, match=r"\[B, L, m\]"):
        packed_score_ids(score_ids[0], LENGTHS.tolist())


def test_a_network_teacher_scores_over_the_wire_like_the_direct_one(tiny_model_dir, tiny_engine, tiny_shards,
                                                                     tmp_path) -> None:
    manifest = read_manifest(tiny_shards)
    ids, score_ids = _batch()
    server = start_server(str(tiny_model_dir), tmp_path / "on", env={"TEACHER_MAX_SCORE_IDS": "8"})
    off = start_server(str(tiny_model_dir), tmp_path / "off", env={"TEACHER_MAX_SCORE_IDS": "0"})
    try:
        teacher = NetworkTeacher([server.url], 8, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"])
        scores = teacher.scores_for(ids, LENGTHS, score_ids)
        _check(scores, ids, score_ids, tiny_engine, 1.0)
        direct = DirectTeacher(tiny_engine, k=8, temperature=1.0).scores_for(ids, LENGTHS, score_ids)
        torch.testing.assert_close(scores.score_logprobs, direct.score_logprobs)  # float32 on the wire: exact
        torch.testing.assert_close(scores.targets.indices, direct.targets.indices)
        sharp = teacher.scores_for(ids, LENGTHS, score_ids, temperature=0.5)  # checked against the reply's T
        _check(sharp, ids, score_ids, tiny_engine, 0.5)
        assert sharp.targets.temperature == 0.5
        teacher.close()
        refusing = NetworkTeacher([off.url], 8, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"])
        with pytest.raises(TeacherRejected, match="does not score ids"):
            refusing.scores_for(ids, LENGTHS, score_ids)
        assert refusing.targets_for(ids, LENGTHS, torch.tensor([0, 1])).indices.shape == (2, 9, 8)  # v1 still works
        refusing.close()
    finally:
        assert server.stop() == 0 and off.stop() == 0


def test_the_fallback_chain_scores_on_the_next_source_when_the_service_is_gone(tiny_model_dir, tiny_engine,
                                                                             tiny_shards, tmp_path) -> None:
    from student_trainer.teachers.fallback import FallbackTeacher

    manifest = read_manifest(tiny_shards)
    ids, score_ids = _batch()
    server = start_server(str(tiny_model_dir), tmp_path / "server")
    network = NetworkTeacher([server.url], 8, 1.0, manifest["tokenizer_sha256"], manifest["vocab_size"], retries=0,
                             backoff=0.01)
    direct = DirectTeacher(tiny_engine, k=8, temperature=1.0)
    chain = FallbackTeacher([network, direct])
    first = chain.scores_for(ids, LENGTHS, score_ids)
    assert chain.active == 0
    assert server.stop() == 0
    second = chain.scores_for(ids, LENGTHS, score_ids)  # the same batch, served by the direct teacher
    assert chain.active == 1
    torch.testing.assert_close(second.score_logprobs, first.score_logprobs)
    _check(chain.scores_for(ids, LENGTHS, score_ids, temperature=0.5), ids, score_ids, tiny_engine, 0.5)
    network.close()
