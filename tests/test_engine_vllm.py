"""The vLLM engine: its conversion of vLLM's output on CPU, and parity with the HF engine on CUDA.

vLLM itself is an optional extra that cannot live in the base environment, so the CPU tests feed
the engine outputs of the shape vLLM documents (``RequestOutput.prompt_logprobs``: entry 0 ``None``,
entry ``i`` ``{token_id: Logprob(logprob, rank, decoded_token)}`` for the distribution that
predicted token ``i``, the actual token added with its own rank) built from a real HF model's dense
log-softmax, and compare with the HF engine on the same model. The ``gpu`` tests run the real vLLM
and skip without CUDA or without the ``vllm`` package.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.errors import InvalidRequest
from teacher_server.engines.base import EngineRequest
from tests.conftest import TINY_HEAD_ROWS, TINY_VOCAB


def build_unpadded_llama(tokenizer_dir: Path, output_dir: Path) -> Path:
    """A tiny random Llama whose LM head has exactly the tokenizer's rows (the case vLLM serves
    exactly), with head size 64, which every vLLM attention backend takes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # peaked distributions: a wrong row or id shows at once
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="module")
def unpadded_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_unpadded_llama(tiny_model_dir, tmp_path_factory.mktemp("unpadded-llama"))


@pytest.fixture(scope="module")
def unpadded_hf(unpadded_dir, one_torch_thread):
    from teacher_server.engines.hf import HFEngine

    return HFEngine(str(unpadded_dir), device="cpu", dtype="float32")


def random_ids(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY_VOCAB, size=length)


def assert_tails_close(got: np.ndarray, want: np.ndarray, atol: float = 2e-6) -> None:
    """Tails compared as probabilities: vLLM's log-probs are float32, so ``1 - sum(top k)`` keeps
    about 1e-6 of absolute precision, which is a large error in log space for a tail near e^-10."""
    np.testing.assert_allclose(np.exp(got.astype(np.float64)), np.exp(want.astype(np.float64)), atol=atol, rtol=1e-3)


# ---- vLLM's output shape, built from a real model ----


@dataclass
class Logprob:
    """The fields of ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_entry(logp: torch.Tensor, n: int, actual: int) -> dict[int, Logprob]:
    """One position as vLLM builds it: the actual token with its vocab rank, then the top ``n``
    with ranks ``1..n`` (a top-n entry for the same id replaces the first)."""
    entry = {actual: Logprob(float(logp[actual]), int((logp > logp[actual]).sum()) + 1)}
    values, ids = torch.topk(logp, n)
    for rank, (token_id, value) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
        entry[token_id] = Logprob(value, rank)
    return entry


def vllm_output(model, ids, n: int, temperature: float = 1.0) -> SimpleNamespace:
    """A ``RequestOutput`` for ``max_tokens=1, prompt_logprobs=n, logprobs=n`` with greedy sampling,
    normalised over every LM-head row as vLLM does, in float32 as vLLM returns them."""
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    prompt = [None] + [vllm_entry(logp[i - 1], n, int(ids[i])) for i in range(1, len(ids))]
    sampled = int(logp[-1].argmax())
    step = SimpleNamespace(token_ids=[sampled], logprobs=[vllm_entry(logp[-1], n, sampled)])
    return SimpleNamespace(prompt_logprobs=prompt, outputs=[step])


class FakeLLM:
    """Stands in for ``vllm.LLM`` on CPU: same constructor arguments, same ``generate`` contract."""

    def __init__(self, **engine_args) -> None:
        from transformers import AutoModelForCausalLM

        self.engine_args = engine_args
        self.model = AutoModelForCausalLM.from_pretrained(engine_args["model"], dtype=torch.float32).eval()
        context = engine_args.get("max_model_len", self.model.config.max_position_embeddings)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=context))
        self.calls = 0

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert len(prompts) == len(sampling_params)
        self.calls += 1
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            assert params.max_tokens == 1 and params.detokenize is False and params.temperature == 0.0
            if max(params.prompt_logprobs, params.logprobs) > self.engine_args["max_logprobs"]:
                raise ValueError("Requested prompt logprobs exceed max_logprobs")  # vLLM refuses these too
            outputs.append(vllm_output(self.model, prompt["prompt_token_ids"], params.prompt_logprobs))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    """The engine module sees a vLLM whose ``LLM`` is :class:`FakeLLM`."""
    from teacher_server.engines import vllm_engine

    module = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw), __version__="fake")
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: module)
    return module


# ---- the pure conversion ----


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("length", [1, 2, 40])
def test_converted_rows_equal_the_hf_engine(unpadded_hf, temperature: float, length: int) -> None:
    """Entries computed at any T convert to the HF engine's rows at that T: the conversion is
    temperature-agnostic (the engine refuses T != 1 because vLLM never scales prompt log-probs)."""
    from teacher_server.engines.vllm_engine import rows_from_vllm

    ids = random_ids(length, length)
    out = vllm_output(unpadded_hf.model, ids, 8, temperature)
    got = rows_from_vllm(out.prompt_logprobs, out.outputs[0].logprobs, 8, TINY_VOCAB)
    want = unpadded_hf.topk([EngineRequest([ids], k=8, temperature=temperature)])[0]
    assert got.indices.shape == (length, 8) and got.indices.dtype == np.int32
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert_tails_close(got.tail_logprob, want.tail_logprob)


def entry(*pairs: tuple[int, float, int]) -> dict[int, Logprob]:
    return {token_id: Logprob(logprob, rank) for token_id, logprob, rank in pairs}


def test_row_t_is_entry_t_plus_one_and_the_last_row_is_the_generated_step() -> None:
    from teacher_server.engines.vllm_engine import rows_from_vllm

    prompt = [None, entry((10, -0.1, 1)), entry((11, -0.2, 1)), entry((12, -0.3, 1))]
    step = [entry((99, -0.4, 1))]
    rows = rows_from_vllm(prompt, step, 1, 100)
    assert rows.indices[:, 0].tolist() == [10, 11, 12, 99]
    np.testing.assert_allclose(rows.logprobs[:, 0], [-0.1, -0.2, -0.3, -0.4], atol=1e-7)


def test_the_actual_token_added_outside_the_top_k_is_not_returned() -> None:
    from teacher_server.engines.vllm_engine import rows_from_vllm

    prompt = [
        None,
        # the prompt token 7 (rank 50) comes first in vLLM's dict, then the top 2
        entry((7, -9.0, 50), (3, -0.5, 1), (4, -1.5, 2)),
        # the prompt token is in the top 2: two entries only
        entry((4, -1.0, 2), (3, -0.7, 1)),
        # the prompt token ties the second best and got rank 2 as well: still two entries
        entry((8, -1.2, 2), (5, -0.6, 1), (6, -1.2, 2)),
    ]
    rows = rows_from_vllm(prompt, [entry((1, -0.1, 1), (2, -2.0, 2))], 2, 10)
    assert rows.indices[:2].tolist() == [[3, 4], [3, 4]] and rows.indices[3].tolist() == [1, 2]
    assert rows.indices[2].tolist() in ([5, 6], [5, 8])  # either of the tied ids, never three entries
    np.testing.assert_allclose(rows.logprobs[0], [-0.5, -1.5], atol=1e-7)
    np.testing.assert_allclose(rows.logprobs[2], [-0.6, -1.2], atol=1e-7)


def test_log1mexp_is_accurate_where_the_naive_formula_is_not() -> None:
    import mpmath  # a dependency of torch (through sympy)

    from teacher_server.engines.vllm_engine import log1mexp

    x = np.array([-1e-17, -1e-12, -1e-7, -1e-3, -0.5, -math.log(2), -1.0, -20.0, -700.0])
    with mpmath.workdps(60):
        want = np.array([float(mpmath.log1p(-mpmath.exp(mpmath.mpf(v)))) for v in x])
    np.testing.assert_allclose(log1mexp(x), want, rtol=1e-12)
    with np.errstate(divide="ignore"):
        assert np.isneginf(np.log(1 - np.exp(x[0])))  # the naive formula loses a top mass of 1 - 1e-17
    assert np.isneginf(log1mexp(np.array([0.0, 1e-9]))).all()  # a top mass rounded up to 1: empty tail


def test_small_tails_and_k_equal_to_vocab_match_the_hf_engine(unpadded_hf) -> None:
    from teacher_server.engines.vllm_engine import rows_from_vllm

    ids = random_ids(5, 12)
    out = vllm_output(unpadded_hf.model, ids, 300)
    got = rows_from_vllm(out.prompt_logprobs, out.outputs[0].logprobs, 300, TINY_VOCAB)
    want = unpadded_hf.topk([EngineRequest([ids], k=300, temperature=1.0)])[0]
    assert (want.tail_logprob < -4).all()  # under 2% of the mass outside the top 300
    assert_tails_close(got.tail_logprob, want.tail_logprob)

    out = vllm_output(unpadded_hf.model, ids, TINY_VOCAB)
    every = rows_from_vllm(out.prompt_logprobs, out.outputs[0].logprobs, TINY_VOCAB, TINY_VOCAB)
    assert np.isneginf(every.tail_logprob).all()


def test_outputs_that_break_the_contract_say_what_is_wrong() -> None:
    from teacher_server.engines.vllm_engine import rows_from_vllm

    with pytest.raises(ValueError, match="prompt_logprobs\\[0\\] is not None"):
        rows_from_vllm([entry((1, -0.1, 1)), entry((2, -0.1, 1))], [entry((3, -0.1, 1))], 1, 10)
    with pytest.raises(ValueError, match="returned 1 log-probs, expected at least 2.*max_logprobs"):
        rows_from_vllm([None, entry((1, -0.1, 1))], [entry((3, -0.1, 1))], 2, 10)
    with pytest.raises(ValueError, match="generated step"):
        rows_from_vllm([None], [], 1, 10)


# ---- the engine around it, with vLLM's LLM replaced by the fake ----


def test_engine_matches_the_hf_engine_and_sets_up_vllm_as_designed(fake_vllm, unpadded_dir, unpadded_hf) -> None:
    from teacher_server.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(unpadded_dir), device="cuda", max_k=32)
    args = engine.llm.engine_args
    assert args["max_logprobs"] == 32 and args["enable_prefix_caching"] is False
    assert args["logprobs_mode"] == "raw_logprobs" and args["dtype"] == "bfloat16"  # auto: as the HF engine on CUDA
    assert "max_model_len" not in args and engine.max_sequence_length == 1023  # one slot for the generated step
    for name in ("model_name", "vocab_size", "tokenizer_sha256", "weights_fingerprint"):
        assert getattr(engine, name) == getattr(unpadded_hf, name), name
    assert engine.device == "cuda"

    requests = [
        EngineRequest([random_ids(10, 5), random_ids(11, 33)], k=4, temperature=1.0),
        EngineRequest([random_ids(12, 1)], k=32, temperature=1.0),
        EngineRequest([random_ids(13, 17), random_ids(14, 2)], k=1, temperature=1.0),
    ]
    together = engine.topk(requests)
    assert engine.llm.calls == 1  # one generate call for the whole batch
    for req, got in zip(requests, together):
        want = unpadded_hf.topk([req])[0]
        assert got.indices.shape == (req.num_tokens, req.k)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert_tails_close(got.tail_logprob, want.tail_logprob)


def test_engine_refuses_what_it_cannot_serve_exactly(fake_vllm, unpadded_dir) -> None:
    from teacher_server.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(unpadded_dir), device="auto", max_k=16, max_model_len=64)
    assert engine.max_sequence_length == 63 and engine.llm.engine_args["max_model_len"] == 64
    with pytest.raises(InvalidRequest, match="temperature 1.0 only, found 2.0"):
        engine.check_request(8, 2.0)
    with pytest.raises(InvalidRequest, match="k must be at most 16"):
        engine.check_request(17, 1.0)
    engine.check_request(16, 1.0)
    with pytest.raises(InvalidRequest, match="temperature"):  # a direct caller (cache jobs) is refused too
        engine.topk([EngineRequest([random_ids(1, 4)], k=4, temperature=0.5)])
    for device in ("cpu", "cuda:1"):
        with pytest.raises(RuntimeError, match="CUDA only.*CUDA_VISIBLE_DEVICES"):
            VLLMEngine(str(unpadded_dir), device=device)


def test_padded_head_rows_are_refused_or_filtered_out(fake_vllm, tiny_model_dir, tiny_engine) -> None:
    """The conftest Llama has 16 padded head rows with huge logits: vLLM would rank them first."""
    from teacher_server.engines.vllm_engine import VLLMEngine

    refusal = f"{TINY_HEAD_ROWS} rows but the tokenizer only {TINY_VOCAB}.*ALLOW_PADDED_HEAD"
    with pytest.raises(RuntimeError, match=refusal):
        VLLMEngine(str(tiny_model_dir), device="cuda")
    engine = VLLMEngine(str(tiny_model_dir), device="cuda", max_k=8, allow_padded_head=True)
    assert engine.padded_rows == TINY_HEAD_ROWS - TINY_VOCAB
    assert engine.llm.engine_args["max_logprobs"] == 8 + engine.padded_rows
    ids = random_ids(7, 20)
    got = engine.topk([EngineRequest([ids], k=8, temperature=1.0)])[0]
    want = tiny_engine.topk([EngineRequest([ids], k=8, temperature=1.0)])[0]
    assert got.indices.max() < TINY_VOCAB
    np.testing.assert_array_equal(got.indices, want.indices)  # same order among the real ids
    # vLLM's normalisation includes the padded rows: a constant offset per row, log P(real ids)
    offset = got.logprobs.astype(np.float64) - want.logprobs
    np.testing.assert_allclose(offset, offset[:, :1].repeat(8, axis=1), atol=1e-3)
    # ... and the tail holds everything not listed, padded rows included
    with torch.no_grad():
        dense = torch.log_softmax(tiny_engine.model(torch.from_numpy(ids)[None]).logits[0].double(), -1)
    listed = torch.gather(dense, 1, torch.from_numpy(got.indices.astype(np.int64))).exp().sum(-1)
    np.testing.assert_allclose(np.exp(got.tail_logprob), (1 - listed).numpy(), atol=1e-5)


def test_settings_and_factory_pick_the_vllm_engine(unpadded_dir) -> None:
    from pydantic import ValidationError

    from teacher_server.app import build_engine
    from teacher_server.settings import TeacherSettings

    settings = TeacherSettings(engine="vllm", model=str(unpadded_dir), device="cpu", vllm_gpu_memory_utilization=0.5)
    assert settings.vllm_max_model_len is None and settings.vllm_allow_padded_head is False
    with pytest.raises(RuntimeError, match="vLLM engine runs on CUDA only"):  # reached the vLLM engine
        build_engine(settings)
    with pytest.raises(ValidationError):
        TeacherSettings(engine="tgi")
    with pytest.raises(ValidationError):
        TeacherSettings(engine="vllm", vllm_gpu_memory_utilization=1.5)


def test_a_missing_vllm_says_how_to_install_it(unpadded_dir) -> None:
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    from teacher_server.engines.vllm_engine import VLLMEngine

    with pytest.raises(RuntimeError, match=r"pip install '\.\[vllm\]'"):
        VLLMEngine(str(unpadded_dir), device="cuda")


def test_the_server_answers_422_for_a_temperature_the_engine_cannot_serve(fake_vllm, unpadded_dir, unpadded_hf,
                                                                         tmp_path) -> None:
    from fastapi.testclient import TestClient

    from shared.wire import decode_topk_response, encode_topk_request
    from teacher_server.app import create_app
    from teacher_server.engines.vllm_engine import VLLMEngine
    from teacher_server.settings import TeacherSettings

    engine = VLLMEngine(str(unpadded_dir), device="cuda", max_k=16)
    settings = TeacherSettings(engine="vllm", model=str(unpadded_dir), max_k=16, default_k=4,
                               data_root=str(tmp_path), cache_root=str(tmp_path))
    app = create_app(settings, engine=engine)
    headers = {"Content-Type": "application/json"}
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        hot = client.post("/v1/topk", content=encode_topk_request([[5, 17, 200]], k=4, temperature=2.0, fmt="json"),
                          headers=headers)
        assert hot.status_code == 422, hot.text
        assert "temperature 1.0 only" in hot.json()["error"]["message"]
        ok = client.post("/v1/topk", content=encode_topk_request([[5, 17, 200]], k=4, temperature=1.0, fmt="json"),
                         headers=headers)
        assert ok.status_code == 200, ok.text
    decoded = decode_topk_response(ok.content, "json")
    want = unpadded_hf.topk([EngineRequest([np.array([5, 17, 200])], k=4, temperature=1.0)])[0]
    np.testing.assert_array_equal(decoded.indices, want.indices)


# ---- the real vLLM on CUDA (skipped without a GPU or without vllm) ----


@pytest.fixture
def real_vllm():
    return pytest.importorskip("vllm", reason="vllm is an optional extra: pip install '.[vllm]' in its own env")


def _release(engine) -> None:
    """Shut a vLLM engine down so the next test gets its GPU memory back."""
    import gc

    core = getattr(getattr(engine.llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-3), ("bfloat16", 5e-2)])
def test_vllm_matches_the_hf_engine_on_cuda(real_vllm, unpadded_dir, dtype: str, atol: float) -> None:
    from teacher_server.engines.hf import HFEngine
    from teacher_server.engines.vllm_engine import VLLMEngine

    hf = HFEngine(str(unpadded_dir), device="cuda", dtype=dtype)
    engine = VLLMEngine(str(unpadded_dir), device="cuda", dtype=dtype, max_k=32, gpu_memory_utilization=0.2,
                        max_model_len=512)
    try:
        requests = [EngineRequest([random_ids(n, n) for n in (1, 7, 64, 300)], k=8, temperature=1.0),
                    EngineRequest([random_ids(99, 50)], k=32, temperature=1.0)]
        for req, got, want in zip(requests, engine.topk(requests), hf.topk(requests)):
            assert got.indices.shape == want.indices.shape and got.indices.max() < TINY_VOCAB
            # low precision may reorder near-ties: ids must match exactly in fp32, top-1 and tail always
            if dtype == "float32":
                np.testing.assert_array_equal(got.indices, want.indices)
                np.testing.assert_allclose(got.logprobs, want.logprobs, atol=atol)
            np.testing.assert_allclose(got.logprobs[:, 0], want.logprobs[:, 0], atol=atol)
            np.testing.assert_allclose(got.tail_logprob, want.tail_logprob, atol=atol)
    finally:
        _release(engine)


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_matches_the_hf_engine_on_the_embedded_teacher(real_vllm, tmp_path_factory) -> None:
    from teacher_server.engines.hf import HFEngine
    from teacher_server.engines.model_source import ModelSourceError, embedded_gguf_path
    from teacher_server.engines.vllm_engine import VLLMEngine

    try:
        embedded_gguf_path()
    except ModelSourceError as exc:
        pytest.skip(str(exc))
    hf = HFEngine("smollm2-135m-instruct", device="cuda", dtype="float32")
    engine = VLLMEngine("smollm2-135m-instruct", device="cuda", dtype="float32", max_k=64, gpu_memory_utilization=0.3,
                        max_model_len=1024)
    try:
        ids = np.asarray(hf.tokenizer("The quick brown fox jumps over the lazy dog. " * 20)["input_ids"][:256])
        req = EngineRequest([ids, ids[:17]], k=64, temperature=1.0)
        got, want = engine.topk([req])[0], hf.topk([req])[0]
        assert (got.indices[:, 0] == want.indices[:, 0]).mean() > 0.99
        np.testing.assert_allclose(got.logprobs[:, 0], want.logprobs[:, 0], atol=1e-2)
        np.testing.assert_allclose(np.exp(got.tail_logprob), np.exp(want.tail_logprob), atol=1e-3)
    finally:
        _release(engine)
