"""Direct mode: the teacher service's own engine, run inside the trainer's process."""

from __future__ import annotations

import numpy as np
import torch

from student_trainer.teachers.targets import TeacherScores, TeacherTargets, packed_score_ids, unpadded_rows
from teacher_server.engines.base import EngineRequest, TopKEngine


class DirectTeacher:
    """Teacher targets from an in-process :class:`TopKEngine` (the server's engine class).

    The engine runs on its own device (``teacher_device``), which may differ from the student's;
    the targets come back on the CPU and the training loop moves them.

    Args:
        engine: a loaded engine, e.g. ``HFEngine("smollm2-135m-instruct")``.
        k: top entries per position.
        temperature: applied to the teacher's logits (the loss uses the same T).
    """

    def __init__(self, engine: TopKEngine, k: int, temperature: float) -> None:
        if not 1 <= k <= engine.vocab_size:
            raise ValueError(f"teacher_topk must be in [1, {engine.vocab_size}], found {k}")
        self.engine = engine
        self.name = f"direct:{engine.model_name}"
        self.vocab_size = engine.vocab_size
        self.tokenizer_sha256 = engine.tokenizer_sha256
        self.weights_fingerprint = engine.weights_fingerprint
        self.k = k
        self.temperature = temperature

    @classmethod
    def load(cls, model: str, k: int, temperature: float, device: str = "auto", dtype: str = "auto",
             cache_dir: str = "~/.cache/retnet-distill/models") -> "DirectTeacher":
        """Load ``model`` with the Hugging Face engine (any name ``retnet-teacher --model`` accepts)."""
        from teacher_server.engines.hf import HFEngine

        return cls(HFEngine(model, device=device, dtype=dtype, cache_dir=cache_dir), k, temperature)

    def targets_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor,
                    split: str = "train") -> TeacherTargets:
        """``input_ids [B, L]``, ``lengths [B]`` -> targets ``[B, L, k]`` (padding rows: -inf)."""
        return self._targets(self._rows(input_ids, lengths, self.temperature), input_ids, lengths, self.temperature)

    def scores_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, score_ids: torch.Tensor,
                   temperature: float | None = None) -> TeacherScores:
        """Targets ``[B, L, k]`` and the exact log-probs of ``score_ids [B, L, m]`` at every position,
        from one forward (e.g. a student's sampled tokens and its own top k, for on-policy losses).
        ``temperature``: the teacher's for this request (None: the run's)."""
        temperature = self.temperature if temperature is None else temperature
        rows = self._rows(input_ids, lengths, temperature, packed_score_ids(score_ids, lengths.tolist()))
        return TeacherScores.from_rows(self._targets(rows, input_ids, lengths, temperature), score_ids,
                                       rows.score_logprobs, rows.logsumexp, lengths.tolist())

    def _rows(self, input_ids: torch.Tensor, lengths: torch.Tensor, temperature: float,
              score_ids: np.ndarray | None = None):
        request = EngineRequest(unpadded_rows(input_ids, lengths), self.k, temperature, score_ids,
                                return_logsumexp=score_ids is not None)
        return self.engine.topk([request])[0]

    def _targets(self, rows, input_ids: torch.Tensor, lengths: torch.Tensor, temperature: float) -> TeacherTargets:
        return TeacherTargets.from_rows(rows.indices, rows.logprobs, rows.tail_logprob, lengths.tolist(),
                                        seq_len=input_ids.shape[1], temperature=temperature)

    def close(self) -> None:
        pass
