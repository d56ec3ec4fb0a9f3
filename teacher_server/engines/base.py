"""The engine interface: token ids in, top-k teacher targets out. No web framework here.

The trainer runs the very same engine in-process for direct mode, so this layer must not import
FastAPI or anything of the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from teacher_server.engines.topk_math import TopKRows


@dataclass
class EngineRequest:
    """One client's work: ``sequences`` (int64 arrays ``[L_i]``), its ``k`` and ``temperature``, and
    (wire v1.1) ``score_ids`` int64 ``[sum(L), m]`` to score at each position and ``return_logsumexp``;
    ``sample_n`` / ``sample_seed``: sampled targets instead of the top k (cache type ``sampled``)."""

    sequences: list[np.ndarray]
    k: int
    temperature: float
    score_ids: np.ndarray | None = None
    return_logsumexp: bool = False
    sample_n: int | None = None  # sparse logit sampling: draw this many ids (k == sample_n) instead of the top k
    sample_seed: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def wants_scores(self) -> bool:
        """True when the request asks for more than v1's top k and tail."""
        return self.score_ids is not None or self.return_logsumexp


class TopKEngine(Protocol):
    """What the server (and the trainer's direct mode) needs from a teacher engine."""

    model_name: str
    vocab_size: int  # the tokenizer's length; ids >= vocab_size are never returned
    tokenizer_sha256: str
    weights_fingerprint: str  # changes when the weights change (a finetuned teacher is another teacher)
    max_sequence_length: int | None
    device: str
    supports_scoring: bool  # wire v1.1: score_ids and logsumexp (an engine without them refuses such requests)

    def topk(self, requests: list[EngineRequest]) -> list[TopKRows]:
        """Targets for every request, rows packed sequence after sequence (row t predicts t+1); each
        request's own ``score_logprobs`` and ``logsumexp`` when it asks for them."""
        ...
