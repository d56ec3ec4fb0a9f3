"""Long-context evaluation (``retnet-distill evaluate --context N``) on the tiny student, teacher and shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.token_shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, ShardWriter
from student_trainer.cli import main as cli_main
from student_trainer.data.shards import PretokenizedShardDataset
from student_trainer.evaluation.evaluate import EvaluationError
from student_trainer.evaluation.long_context import (
    bucket_edges,
    check_student_path,
    long_context_metrics,
    long_rows,
    student_position_nll,
    teacher_position_nll,
)
from tests.conftest import TINY_VOCAB, tiny_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def val(tiny_shards) -> PretokenizedShardDataset:
    return PretokenizedShardDataset(tiny_shards, "val")


@pytest.fixture(scope="module")
def student():
    return tiny_student(vocab_size=TINY_VOCAB).eval()


def _reference_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain next-token NLL ``[L - 1]`` from full logits ``[L, V_model]``."""
    logp = torch.log_softmax(logits[:-1, :TINY_VOCAB].float(), dim=-1)
    return -logp.gather(1, ids[1:, None])[:, 0]


def test_long_rows_are_the_splits_valid_tokens_back_to_back(val):
    stream = torch.cat([val[i]["input_ids"][: val[i]["length"]] for i in range(20)])
    rows = long_rows(val, 100, 3)
    assert len(rows) == 3 and all(row.shape == (100,) for row in rows)
    torch.testing.assert_close(torch.cat(rows), stream[:300], rtol=0, atol=0)
    tokens = val.manifest["splits"]["val"]["tokens"]  # the whole split (its valid tokens), in order
    (whole,) = long_rows(val, tokens, 1)
    torch.testing.assert_close(whole, torch.cat([val[i]["input_ids"][: val[i]["length"]] for i in range(len(val))]),
                               rtol=0, atol=0)


def test_unpacked_documents_are_joined_with_eos_and_never_with_padding(tmp_path):
    eos, pad = 2, 0
    writer = ShardWriter(tmp_path, "val", seq_len=8, pad_id=pad, rows_per_shard=2)
    for doc in ([5, 6, 7], [8, 9, eos], [10, 11, 12, 13, 14, 15, 16, 17]):
        writer.add(np.asarray(doc, dtype=np.int32), np.ones(len(doc), dtype=np.uint8))
    writer.flush()
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": "x", "max_seq_length": 8,
                "eos_id": eos, "pad_id": pad, "parameters": {"pack": False}, "splits": {"val": {"shards": writer.shards}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (row,) = long_rows(PretokenizedShardDataset(tmp_path, "val"), 16, 1)
    assert row.tolist() == [5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13, 14, 15, 16, 17, eos]


def test_chunked_head_loss_equals_a_full_logits_computation(student, tiny_engine, val):
    (ids,) = long_rows(val, 40, 1)
    with torch.no_grad():
        student_ref = _reference_nll(student(ids[None])[0], ids)
        teacher_ref = _reference_nll(tiny_engine.model(input_ids=ids[None]).logits[0], ids)
    student_nll = student_position_nll(student, ids, TINY_VOCAB, head_chunk=7)  # 39 positions: a ragged last chunk
    teacher_nll = teacher_position_nll(tiny_engine.model, ids, TINY_VOCAB, head_chunk=7)
    assert student_nll.shape == teacher_nll.shape == (39,)
    torch.testing.assert_close(student_nll, student_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(teacher_nll, teacher_ref, rtol=0, atol=1e-5)


def test_buckets_sum_to_the_overall_token_count_and_loss(student, tiny_engine, val):
    section = long_context_metrics(student, tiny_engine.model, val, TINY_VOCAB, context=1000, rows=2,
                                   edges=[100, 300, 600], head_chunk=256)
    buckets = section["buckets"]
    assert [b["bucket"] for b in buckets] == ["0-100", "100-300", "300-600", "600+"]
    assert [b["tokens"] for b in buckets] == [200, 400, 600, 798]  # 2 rows x (100, 200, 300, 399) positions
    assert sum(b["tokens"] for b in buckets) == section["tokens"] == 2 * 999
    for who in ("student", "teacher"):
        weighted = sum(b[f"{who}_loss"] * b["tokens"] for b in buckets) / section["tokens"]
        assert weighted == pytest.approx(section[who]["loss"], rel=1e-9)
        assert all(b[f"{who}_perplexity"] == pytest.approx(np.exp(b[f"{who}_loss"])) for b in buckets)
    assert section["teacher_skipped"] is None and section["student_path"] == "parallel"
    # the first bucket of row 1 is positions 0..99 of that row: check it against the per-position losses
    rows = long_rows(val, 1000, 2)
    first = torch.cat([student_position_nll(student, ids, TINY_VOCAB)[:100] for ids in rows])
    assert buckets[0]["student_loss"] == pytest.approx(float(first.double().mean()), rel=1e-6)


def test_a_context_past_max_seq_len_runs_chunkwise_equals_parallel_and_skips_a_shorter_teacher(student, tiny_engine, val):
    assert student.config.max_seq_len == 256 and tiny_engine.model.config.max_position_embeddings == 1024
    section = long_context_metrics(student, tiny_engine.model, val, TINY_VOCAB, context=2048, train_context=32)
    assert section["student_path"] == "chunkwise (chunk 16)"
    assert [b["bucket"] for b in section["buckets"]] == ["0-512", "512-2K"]
    assert [b["tokens"] for b in section["buckets"]] == [512, 1535]
    assert section["teacher"] is None
    assert section["teacher_skipped"] == "context 2048 > the teacher's 1024 positions"
    assert all(b["teacher_loss"] is None for b in section["buckets"])
    (ids,) = long_rows(val, 2048, 1)
    with torch.no_grad():  # the parallel path over the same 2048 tokens, full logits
        reference = _reference_nll(student.logits_from_hidden(student.hidden_states(ids[None], chunkwise=False))[0], ids)
    assert section["student"]["loss"] == pytest.approx(float(reference.double().mean()), rel=1e-5)
    assert np.isfinite(section["student"]["perplexity"])


def test_a_context_longer_than_the_split_names_both_numbers(student, tiny_engine, val):
    tokens = val.manifest["splits"]["val"]["tokens"]
    with pytest.raises(EvaluationError, match=f"holds {tokens} tokens .* fewer than --context {tokens + 1}"):
        long_context_metrics(student, tiny_engine.model, val, TINY_VOCAB, context=tokens + 1)


def test_settings_that_cannot_serve_a_context_are_named():
    parallel_only = tiny_student(vocab_size=TINY_VOCAB, chunkwise_min_length=None)
    with pytest.raises(EvaluationError, match=r"parallel retention path.*set chunkwise_min_length \(now None\) to at most 4096"):
        check_student_path(parallel_only, 4096, max_bytes=1 << 20)
    big_chunks = tiny_student(vocab_size=TINY_VOCAB, recurrent_chunk_size=1024, chunkwise_min_length=1024)
    with pytest.raises(EvaluationError, match=r"chunkwise \(chunk 1024\).*lower recurrent_chunk_size \(1024\)"):
        check_student_path(big_chunks, 4096, max_bytes=1 << 20)
    assert check_student_path(tiny_student(vocab_size=TINY_VOCAB), 4096, max_bytes=1 << 20) == "chunkwise (chunk 16)"
    with pytest.raises(EvaluationError, match="ascending positive"):
        bucket_edges(4096, [512, 100])
    assert bucket_edges(600) == [(0, 512), (512, 2048)] and bucket_edges(513) == [(0, 512)]


def test_the_cli_flag_end_to_end(student, tiny_model_dir, tiny_shards, tmp_path, capsys):
    model_dir = student.save(tmp_path / "model")
    common = ["evaluate", "--checkpoint", str(model_dir), "--data", str(tiny_shards), "--teacher", str(tiny_model_dir),
              "--batches", "1", "--batch-size", "4", "--prompt", "def f(x):", "--max-new-tokens", "2"]
    out = tmp_path / "eval"
    assert cli_main(common + ["--output-dir", str(out), "--context", "600", "--buckets", "128", "512"]) == 0
    section = json.loads((out / "report.json").read_text())["long_context"]
    assert [b["bucket"] for b in section["buckets"]] == ["0-128", "128-512", "512+"]
    assert sum(b["tokens"] for b in section["buckets"]) == section["tokens"] == 599
    assert section["teacher"] is not None and section["teacher_skipped"] is None
    assert "saturation" in section["note"]
    err = capsys.readouterr().err
    assert "long context: 1 row(s) of 600 tokens" in err and "128-512" in err and "saturation" in err
    # the student's answers, with their teacher NLL taken apart (the teacher's own: no reverse KL)
    assert "student's own answers" in err and "reverse_kl" in err and "writer_entropy" in err

    assert cli_main(common + ["--output-dir", str(tmp_path / "plain")]) == 0  # no --context: no section
    assert "long_context" not in json.loads((tmp_path / "plain" / "report.json").read_text())
    assert "long context" not in capsys.readouterr().err

    assert cli_main(common + ["--output-dir", str(tmp_path / "x"), "--context", "100000"]) == 1
    assert "fewer than --context 100000" in capsys.readouterr().err
