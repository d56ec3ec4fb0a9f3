"""The interface every teacher-target source implements, so the training loop does not care which."""

from __future__ import annotations

from typing import Protocol

import torch

from student_trainer.teachers.targets import TeacherTargets


class TeacherSource(Protocol):
    """Gives teacher targets for a batch of token ids.

    ``targets_for`` gets ``input_ids [B, L]`` (right-padded), ``lengths [B]`` (real tokens per row),
    ``indices [B]`` and ``split`` (dataset rows, for sources that look targets up by row) and returns
    :class:`TeacherTargets` ``[B, L, k]``, where row ``t`` is the teacher's distribution of the token
    after ``x_t``; rows beyond a sequence's length are padding (index 0, log-prob -inf).
    """

    name: str
    vocab_size: int
    tokenizer_sha256: str
    weights_fingerprint: str  # changes when the teacher's weights change ("" when a source cannot tell)
    k: int
    temperature: float

    def targets_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor,
                    split: str = "train") -> TeacherTargets: ...

    def close(self) -> None: ...
