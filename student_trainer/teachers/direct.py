"""Direct mode: the teacher service's own engine, run inside the trainer's process."""

from __future__ import annotations

import numpy as np
import torch

from student_trainer.targets import TeacherScores, TeacherTargets, packed_score_ids
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
        ids = input_ids.cpu().numpy()
        sequences = [ids[row, :n].astype(np.int64) for row, n in enumerate(lengths.tolist())]
        rows = self.engine.topk([EngineRequest(sequences, self.k, self.temperature)])[0]
        return TeacherTargets.from_rows(
            rows.indices, rows.logprobs, rows.tail_logprob, lengths.tolist(), seq_len=input_ids.shape[1],
            temperature=self.temperature,
        )

    def scores_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, score_ids: torch.Tensor) -> TeacherScores:
        """Targets ``[B, L, k]`` and the exact log-probs of ``score_ids [B, L, m]`` at every position,
        from one forward (e.g. a student's sampled tokens and its own top k, for on-policy losses)."""
        ids = input_ids.cpu().numpy()
        sequences = [ids[row, :n].astype(np.int64) for row, n in enumerate(lengths.tolist())]
        request = EngineRequest(sequences, self.k, self.temperature, packed_score_ids(score_ids, lengths.tolist()),
                                return_logsumexp=True)
        rows = self.engine.topk([request])[0]
        targets = TeacherTargets.from_rows(rows.indices, rows.logprobs, rows.tail_logprob, lengths.tolist(),
                                           seq_len=input_ids.shape[1], temperature=self.temperature)
        return TeacherScores.from_rows(targets, score_ids, rows.score_logprobs, rows.logsumexp, lengths.tolist())

    def close(self) -> None:
        pass
