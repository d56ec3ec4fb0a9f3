"""The HF engine against references computed straight from ``model(input_ids).logits``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_server.engines.base import EngineRequest
from tests.conftest import TINY_VOCAB


def reference(engine, ids: np.ndarray, k: int, temperature: float):
    """Top-k of log_softmax(logits / T) over the tokenizer's vocab, and the tail, in float64."""
    with torch.no_grad():
        logits = engine.model(torch.from_numpy(ids)[None]).logits[0, :, :TINY_VOCAB].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    top = torch.topk(logp, k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0))
    return top.indices.numpy(), top.values.numpy(), tail.numpy(), logp.numpy()


def random_ids(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY_VOCAB, size=length)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_topk_and_tail_match_the_dense_reference(tiny_engine, temperature: float) -> None:
    ids = random_ids(1, 40)
    rows = tiny_engine.topk([EngineRequest([ids], k=16, temperature=temperature)])[0]
    ref_ids, ref_lp, ref_tail, _ = reference(tiny_engine, ids, 16, temperature)
    np.testing.assert_array_equal(rows.indices, ref_ids)
    np.testing.assert_allclose(rows.logprobs, ref_lp, rtol=1e-3, atol=1e-3)  # fp16 precision on the wire
    np.testing.assert_allclose(rows.tail_logprob, ref_tail, rtol=1e-3, atol=1e-3)


def test_temperature_divides_the_logits_before_the_softmax(tiny_engine) -> None:
    """log p_T = log_softmax(z / T), not log_softmax(z) / T (which would train towards p^(1/T))."""
    ids = random_ids(2, 12)
    hot = tiny_engine.topk([EngineRequest([ids], k=TINY_VOCAB, temperature=2.0)])[0]
    _, _, _, logp_t1 = reference(tiny_engine, ids, 1, 1.0)
    expected = np.log(np.exp(logp_t1 / 2.0) / np.exp(logp_t1 / 2.0).sum(-1, keepdims=True))
    got = np.full_like(expected, np.nan)
    np.put_along_axis(got, hot.indices.astype(np.int64), hot.logprobs, axis=-1)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.isneginf(hot.tail_logprob).all()  # k == vocab: nothing is left for the tail


def test_row_t_is_the_distribution_after_token_t(tiny_engine) -> None:
    ids = random_ids(3, 10)
    rows = tiny_engine.topk([EngineRequest([ids], k=8, temperature=1.0)])[0]
    for t in range(len(ids)):
        prefix = tiny_engine.topk([EngineRequest([ids[: t + 1]], k=8, temperature=1.0)])[0]
        np.testing.assert_array_equal(rows.indices[t], prefix.indices[-1])
        np.testing.assert_allclose(rows.logprobs[t], prefix.logprobs[-1], atol=1e-4)


def test_padded_head_rows_are_never_returned(tiny_engine) -> None:
    assert tiny_engine.model.get_output_embeddings().weight.shape[0] > TINY_VOCAB
    ids = random_ids(4, 64)
    rows = tiny_engine.topk([EngineRequest([ids], k=TINY_VOCAB, temperature=1.0)])[0]
    assert rows.indices.max() < TINY_VOCAB
    # all the mass sits on real tokens: the K+1 buckets sum to one with an empty tail
    np.testing.assert_allclose(np.exp(rows.logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    assert tiny_engine.vocab_size == TINY_VOCAB


def test_a_batch_equals_its_requests_run_alone(tiny_engine) -> None:
    requests = [
        EngineRequest([random_ids(10, 5), random_ids(11, 33)], k=4, temperature=1.0),
        EngineRequest([random_ids(12, 17)], k=32, temperature=0.7),
        EngineRequest([random_ids(13, 1), random_ids(14, 64), random_ids(15, 2)], k=1, temperature=3.0),
    ]
    together = tiny_engine.topk(requests)
    for req, batched in zip(requests, together):
        alone = tiny_engine.topk([req])[0]
        assert batched.indices.shape == (req.num_tokens, req.k)
        np.testing.assert_array_equal(batched.indices, alone.indices)
        np.testing.assert_allclose(batched.logprobs, alone.logprobs, atol=1e-4)
        np.testing.assert_allclose(batched.tail_logprob, alone.tail_logprob, atol=1e-4)


def test_micro_batches_and_row_chunks_do_not_change_results(tiny_engine, tiny_model_dir) -> None:
    from teacher_server.engines.hf import HFEngine
    from teacher_server.engines.topk_math import topk_from_hidden

    small = HFEngine(str(tiny_model_dir), device="cpu", micro_batch_tokens=16)
    req = EngineRequest([random_ids(20, 9), random_ids(21, 30), random_ids(22, 3)], k=8, temperature=1.0)
    a, b = tiny_engine.topk([req])[0], small.topk([req])[0]
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)

    hidden = torch.cat(tiny_engine.hidden_states(req.sequences))
    head = tiny_engine.model.get_output_embeddings()
    whole = topk_from_hidden(hidden, head, 8, 1.0, TINY_VOCAB)
    chunked = topk_from_hidden(hidden, head, 8, 1.0, TINY_VOCAB, chunk_bytes=4 * TINY_VOCAB * 5)  # 5 rows a chunk
    np.testing.assert_array_equal(whole.indices, chunked.indices)
    np.testing.assert_allclose(whole.tail_logprob, chunked.tail_logprob, atol=1e-5)


def test_engine_reports_its_identity(tiny_engine) -> None:
    from shared.fingerprint import tokenizer_sha256

    assert tiny_engine.tokenizer_sha256 == tokenizer_sha256(tiny_engine.tokenizer)
    assert len(tiny_engine.tokenizer_sha256) == 64
    assert tiny_engine.max_sequence_length == 1024
    assert tiny_engine.device == "cpu"


def test_model_sources_report_what_is_wrong(tmp_path) -> None:
    from teacher_server.engines.model_source import ModelSourceError, resolve_model

    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model("./no/such/model", tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path).path == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_teacher_computes_its_head_in_fp32(tiny_model_dir, dtype: str) -> None:
    """With bf16/fp16 weights the transformer runs in that dtype, but the LM head is the exact fp32
    product of its hidden states and weights: a bf16 head would round logits of ~20 to steps of 0.125."""
    from teacher_server.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), device="cpu", dtype=dtype)
    ids = random_ids(3, 48)
    rows = engine.topk([EngineRequest([ids], k=16, temperature=1.0)])[0]
    hidden = engine.hidden_states([ids])[0]
    weight = engine.model.get_output_embeddings().weight.detach()
    assert hidden.dtype == weight.dtype == getattr(torch, dtype)
    exact = torch.log_softmax((hidden.double() @ weight.double().T)[:, :TINY_VOCAB], dim=-1)
    rounded = torch.log_softmax((hidden @ weight.T).double()[:, :TINY_VOCAB], dim=-1)  # what a half head gives
    picked = torch.from_numpy(rows.indices).long()
    ours = torch.from_numpy(rows.logprobs).double()
    err_ours = float((ours - exact.gather(1, picked)).abs().max())
    err_rounded = float((rounded.gather(1, picked) - exact.gather(1, picked)).abs().max())
    assert err_ours < 1e-4, err_ours
    assert err_rounded > 10 * err_ours  # the test can tell the two apart
