"""The HF engine on CUDA agrees with the CPU engine (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_server.engines.base import EngineRequest
from tests.conftest import TINY_VOCAB

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-3), ("bfloat16", 5e-2)])
def test_cuda_engine_matches_cpu(tiny_engine, tiny_model_dir, dtype: str, atol: float) -> None:
    from teacher_server.engines.hf import HFEngine

    cuda = HFEngine(str(tiny_model_dir), device="cuda", dtype=dtype)
    assert cuda.device == "cuda"
    rng = np.random.default_rng(0)
    request = EngineRequest([rng.integers(0, TINY_VOCAB, size=n) for n in (7, 64, 1)], k=8, temperature=1.0)
    on_cpu, on_gpu = tiny_engine.topk([request])[0], cuda.topk([request])[0]
    assert on_gpu.indices.max() < TINY_VOCAB
    # bf16 may reorder near-ties: compare the top-1 log-prob and the tail; ids must match exactly in fp32
    np.testing.assert_allclose(on_gpu.logprobs[:, 0], on_cpu.logprobs[:, 0], atol=atol)
    np.testing.assert_allclose(on_gpu.tail_logprob, on_cpu.tail_logprob, atol=atol)
    if dtype == "float32":
        np.testing.assert_array_equal(on_gpu.indices, on_cpu.indices)
