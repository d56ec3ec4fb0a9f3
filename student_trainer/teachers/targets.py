"""Teacher targets in the trainer: one type for the direct, cached and network modes.

Row ``t`` of a sequence ``x_0..x_{L-1}`` is the teacher's distribution over the token *after* ``x_t``
(``p(. | x_0..x_t)``), which is exactly what the student's ``logits[:, t]`` predicts: nothing here
shifts. Padding (rows beyond a sequence's length, or entries beyond the teacher's k) uses index 0,
log-prob ``-inf`` and tail ``-inf``, so that it carries zero teacher mass and contributes exactly zero
to the losses in :mod:`student_trainer.training.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

PAD_INDEX = 0
PAD_LOGPROB = float("-inf")


@dataclass
class TeacherTargets:
    """Top-k teacher log-probabilities for a batch, padded to ``[B, L]``.

    Attributes:
        indices: ``[B, L, k]`` int64 or int32 token ids, sorted by descending teacher probability.
        logprobs: ``[B, L, k]`` float, ``log p_T(id | prefix)`` at temperature ``T``; ``-inf`` marks
            padded entries (and ids with zero teacher probability).
        tail_logprob: ``[B, L]`` float, ``log(1 - sum_k p_T)``; ``-inf`` when the k ids hold all the mass.
        temperature: the teacher temperature the targets were computed at, when known; the loss
            refuses a different student temperature (dividing only one side by T trains towards p^2).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    temperature: float | None = None

    def __post_init__(self) -> None:
        for name in ("indices", "logprobs", "tail_logprob"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"TeacherTargets.{name} must be a torch.Tensor, found {type(value).__name__}; "
                    "build targets from numpy arrays with TeacherTargets.from_rows"
                )
        if self.indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"TeacherTargets.indices must be int64 or int32, found {self.indices.dtype}; "
                "convert uint16 ids with .long() (or use TeacherTargets.from_rows)"
            )
        for name in ("logprobs", "tail_logprob"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"TeacherTargets.{name} must be floating point, found {getattr(self, name).dtype}")
        if self.indices.dim() != 3:
            raise ValueError(f"TeacherTargets.indices must be [B, L, k], found shape {tuple(self.indices.shape)}")
        if self.logprobs.shape != self.indices.shape:
            raise ValueError(
                f"TeacherTargets.logprobs must have the shape of indices {tuple(self.indices.shape)}, "
                f"found {tuple(self.logprobs.shape)}"
            )
        if self.tail_logprob.shape != self.indices.shape[:2]:
            raise ValueError(
                f"TeacherTargets.tail_logprob must be [B, L] = {tuple(self.indices.shape[:2])}, "
                f"found {tuple(self.tail_logprob.shape)}"
            )
        if self.indices.shape[2] < 1:
            raise ValueError("TeacherTargets need k >= 1 entries per row, found k = 0")
        devices = {t.device for t in (self.indices, self.logprobs, self.tail_logprob)}
        if len(devices) != 1:
            raise ValueError(f"TeacherTargets tensors must be on one device, found {sorted(map(str, devices))}")
        if self.temperature is not None and not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"TeacherTargets.temperature must be a finite number > 0, found {self.temperature}")

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def seq_len(self) -> int:
        return self.indices.shape[1]

    @property
    def k(self) -> int:
        return self.indices.shape[2]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """The same targets on ``device`` (dtypes unchanged)."""
        return TeacherTargets(
            indices=self.indices.to(device, non_blocking=non_blocking),
            logprobs=self.logprobs.to(device, non_blocking=non_blocking),
            tail_logprob=self.tail_logprob.to(device, non_blocking=non_blocking),
            temperature=self.temperature,
        )

    def select(self, mask: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows where ``mask [B, L]`` (bool) is true, checked against the student's vocab.

        Returns:
            ``indices [N, k]`` int64, ``logprobs [N, k]``, ``tail_logprob [N]``. Rows outside the mask
            (padding, prompts) are never looked at, so they may hold anything.

        Raises:
            ValueError: ids outside ``[0, vocab_size)`` or NaN/+inf log-probs in a selected row (checked
                with one device sync: a bad id would otherwise be a CUDA device-side assert).
        """
        indices, logprobs, tail = self.indices[mask].long(), self.logprobs[mask], self.tail_logprob[mask]
        if indices.numel():
            bad = (logprobs.isnan() | (logprobs == math.inf)).sum() + (tail.isnan() | (tail == math.inf)).sum()
            id_min, id_max, n_bad = torch.stack([indices.min(), indices.max(), bad]).tolist()
            if id_min < 0 or id_max >= vocab_size:
                raise ValueError(
                    f"teacher ids must be in [0, {vocab_size}) (the student's vocab), found ids in "
                    f"[{id_min}, {id_max}]; the student's head must cover the teacher's tokenizer"
                )
            if n_bad:
                raise ValueError(f"teacher log-probs must be finite or -inf, found {n_bad} NaN/+inf in supervised rows")
        return indices, logprobs, tail

    @classmethod
    def from_rows(
        cls,
        indices: ArrayLike,
        logprobs: ArrayLike,
        tail_logprob: ArrayLike,
        lengths: Sequence[int],
        seq_len: int | None = None,
        temperature: float | None = None,
    ) -> TeacherTargets:
        """Pad rows packed sequence after sequence (as on the wire and in the cache) to ``[B, L]``.

        Args:
            indices: ``[N, k]`` token ids (uint16, int32 or int64; numpy or torch), ``N = sum(lengths)``.
            logprobs: ``[N, k]`` float (float16 from the wire is widened to float32).
            tail_logprob: ``[N]`` float.
            lengths: rows per sequence.
            seq_len: pad every sequence to this many rows (default: the longest sequence), e.g. the
                batch's padded input length.
            temperature: the teacher temperature, recorded for the loss's consistency check.

        Returns:
            Targets with ``indices [B, L, k]`` int64, ``logprobs [B, L, k]``, ``tail_logprob [B, L]``;
            padded rows have index 0, log-prob ``-inf`` and tail ``-inf``.
        """
        ids = _as_tensor(indices, "indices")
        lps = _as_tensor(logprobs, "logprobs")
        tail = _as_tensor(tail_logprob, "tail_logprob")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"indices must be integer token ids, found {ids.dtype}")
        ids = ids.long()  # gather/scatter want int64; uint16 has almost no torch ops
        if lps.dtype in (torch.float16, torch.bfloat16):
            lps = lps.float()  # the loss math runs in fp32 anyway; widen once here
        if tail.dtype in (torch.float16, torch.bfloat16):
            tail = tail.float()
        if ids.dim() != 2 or lps.shape != ids.shape:
            raise ValueError(
                f"from_rows expects indices and logprobs of shape [N, k], "
                f"found {tuple(ids.shape)} and {tuple(lps.shape)}"
            )
        if tail.shape != ids.shape[:1]:
            raise ValueError(f"from_rows expects tail_logprob [N] = [{ids.shape[0]}], found {tuple(tail.shape)}")
        lengths = [int(n) for n in lengths]
        if any(n < 0 for n in lengths) or sum(lengths) != ids.shape[0]:
            raise ValueError(
                f"lengths must be non-negative and sum to the number of rows {ids.shape[0]}, "
                f"found {lengths} (sum {sum(lengths)})"
            )
        longest = max(lengths, default=0)
        seq_len = longest if seq_len is None else int(seq_len)
        if seq_len < longest:
            raise ValueError(f"seq_len={seq_len} is shorter than the longest sequence; pass seq_len >= {longest}")

        return cls(pad_packed(ids, lengths, seq_len, PAD_INDEX), pad_packed(lps, lengths, seq_len, PAD_LOGPROB),
                   pad_packed(tail, lengths, seq_len, PAD_LOGPROB), temperature=temperature)


def pad_packed(packed: torch.Tensor, lengths: Sequence[int], seq_len: int, fill: float) -> torch.Tensor:
    """Rows packed sequence after sequence ``[sum(lengths), ...]`` -> ``[B, seq_len, ...]``, ``fill`` after
    each sequence's rows (same dtype and device)."""
    out = torch.full((len(lengths), seq_len, *packed.shape[1:]), fill, dtype=packed.dtype, device=packed.device)
    start = 0
    for row, n in enumerate(lengths):
        out[row, :n] = packed[start:start + n]
        start += n
    return out


def unpadded_rows(input_ids: torch.Tensor, lengths: torch.Tensor, dtype: type = np.int64) -> list[np.ndarray]:
    """``input_ids [B, L]`` (right-padded) -> one ``[lengths[i]]`` numpy array per row (the wire's sequences)."""
    ids = input_ids.cpu().numpy()
    return [ids[row, :n].astype(dtype) for row, n in enumerate(lengths.tolist())]


def _as_tensor(value: ArrayLike, name: str) -> torch.Tensor:
    """A torch view of a numpy array or tensor; uint16 goes through int32 (torch has few uint16 ops)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:
            value = value.astype(np.int32)
        if not value.flags.writeable:
            value = value.copy()  # wire buffers are read-only; torch warns on (and must not write to) them
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a numpy array or torch.Tensor, found {type(value).__name__}")


@dataclass
class TeacherScores:
    """The teacher's targets for a batch plus its log-probabilities of ids chosen by the caller (wire
    v1.1 ``score_ids``, e.g. the tokens a student sampled and its own top k), padded like the targets.

    Attributes:
        targets: the usual top-k targets ``[B, L, k]``.
        score_ids: ``[B, L, m]`` int64, the ids that were scored (padding rows: 0).
        score_logprobs: ``[B, L, m]`` float32 ``log p_T(id | prefix)``, exact (padding rows: ``-inf``).
        logsumexp: ``[B, L]`` float32 ``logsumexp(logits / T)`` (padding rows: ``-inf``).
    """

    targets: TeacherTargets
    score_ids: torch.Tensor
    score_logprobs: torch.Tensor
    logsumexp: torch.Tensor

    @classmethod
    def from_rows(cls, targets: TeacherTargets, score_ids: torch.Tensor, score_logprobs: ArrayLike,
                  logsumexp: ArrayLike, lengths: Sequence[int]) -> "TeacherScores":
        """``score_logprobs [N, m]`` and ``logsumexp [N]`` packed sequence after sequence (as on the
        wire) -> padded to ``score_ids``'s ``[B, L, m]``."""
        scores = _as_tensor(score_logprobs, "score_logprobs").float()
        lse = _as_tensor(logsumexp, "logsumexp").float()
        _, seq_len, m = score_ids.shape
        lengths = [int(n) for n in lengths]
        if scores.shape != (sum(lengths), m) or lse.shape != (sum(lengths),):
            raise ValueError(f"expected score_logprobs [{sum(lengths)}, {m}] and logsumexp [{sum(lengths)}], found "
                             f"{tuple(scores.shape)} and {tuple(lse.shape)}")
        return cls(targets, score_ids.long(), pad_packed(scores, lengths, seq_len, PAD_LOGPROB),
                   pad_packed(lse, lengths, seq_len, PAD_LOGPROB))


def packed_score_ids(score_ids: torch.Tensor, lengths: Sequence[int]) -> np.ndarray:
    """``[B, L, m]`` ids (right-padded) -> ``[sum(lengths), m]`` int64 rows, sequence after sequence
    (the wire's packed layout)."""
    if score_ids.dim() != 3 or score_ids.shape[0] != len(lengths):
        raise ValueError(f"score_ids must be [B, L, m] with B = {len(lengths)} rows, found {tuple(score_ids.shape)}")
    ids = score_ids.cpu().numpy()
    return np.concatenate([ids[row, :n] for row, n in enumerate(int(n) for n in lengths)]).astype(np.int64)
