"""A chain of teacher sources: the first that answers serves the batch; the primary is probed and
returned to when it comes back. The batch that failed on one source is served by the next, so no
step is lost, skipped or computed twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from student_trainer.teachers.targets import TeacherScores, TeacherTargets
from student_trainer.teachers.base import TeacherSource
from student_trainer.teachers.network import TeacherMismatch, TeacherUnavailable, refuse_or_warn

log = logging.getLogger(__name__)


class FallbackTeacher:
    """``sources[0]`` (usually network) backed by ``sources[1:]`` (direct or cached), in order.

    Args:
        sources: teacher sources with the same tokenizer, k, temperature and weights.
        probe_interval_s: while on a fallback, how often to check whether the primary is back.
        on_switch: called with ``(from_name, to_name, reason)`` on every switch (telemetry).
        allow_mismatch: only warn when the sources' weights fingerprints differ.

    Only :class:`TeacherUnavailable` moves to the next source; a refused request or another
    teacher (:class:`TeacherRejected`, :class:`TeacherMismatch`) stops the run, since a fallback
    would hide a configuration error.
    """

    def __init__(self, sources: list[TeacherSource], probe_interval_s: float = 10.0,
                 on_switch: Callable[[str, str, str], None] | None = None, allow_mismatch: bool = False) -> None:
        first = sources[0]
        for other in sources[1:]:
            if (other.tokenizer_sha256, other.k, other.temperature) != (first.tokenizer_sha256, first.k, first.temperature):
                raise TeacherMismatch(f"fallback teacher {other.name} differs from {first.name} in tokenizer, k or "
                                      "temperature; every teacher of the chain must give the same targets")
            ours, theirs = getattr(first, "weights_fingerprint", ""), getattr(other, "weights_fingerprint", "")
            if ours and theirs and ours != theirs:
                refuse_or_warn(f"fallback teacher {other.name} has weights fingerprint {theirs[:16]}... but "
                               f"{first.name} has {ours[:16]}...: a switch would change the teacher in the middle "
                               "of the run; use the same weights on both sides", allow_mismatch)
        self.sources, self.probe_interval_s, self.on_switch = sources, probe_interval_s, on_switch
        self.active = 0
        self._last_probe = 0.0
        self.switches = 0
        self.name = " -> ".join(source.name for source in sources)
        self.vocab_size, self.tokenizer_sha256 = first.vocab_size, first.tokenizer_sha256
        self.k, self.temperature = first.k, first.temperature

    @property
    def max_score_ids(self) -> int | None:
        """The fewest ids per position any source of the chain scores (None: no source says)."""
        limits = [source.max_score_ids for source in self.sources if getattr(source, "max_score_ids", None) is not None]
        return min(limits) if limits else None

    @property
    def stats(self) -> dict:
        return {**getattr(self.sources[0], "stats", {}), "active_source": self.active, "switches": self.switches}

    def _switch(self, to: int, reason: str) -> None:
        before, self.active = self.sources[self.active].name, to
        self.switches += 1
        log.warning("teacher switch: %s -> %s (%s)", before, self.sources[to].name, reason)
        if self.on_switch is not None:
            self.on_switch(before, self.sources[to].name, reason)

    def _maybe_return_to_primary(self) -> None:
        now = time.monotonic()
        if self.active == 0 or now - self._last_probe < self.probe_interval_s:
            return
        self._last_probe = now
        probe = getattr(self.sources[0], "healthy", None)
        if probe is not None and probe():
            self._switch(0, "the primary answers again")

    def prefetch(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, split: str = "train") -> None:
        if self.active == 0 and hasattr(self.sources[0], "prefetch"):
            self.sources[0].prefetch(input_ids, lengths, indices, split)

    def targets_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor,
                    split: str = "train") -> TeacherTargets:
        return self._on_active(lambda source: source.targets_for(input_ids, lengths, indices, split))

    def scores_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, score_ids: torch.Tensor,
                   temperature: float | None = None) -> TeacherScores:
        """Scores of ids (wire v1.1) from the active source, falling over like :meth:`targets_for`; a
        cached source cannot score ids the cache never saw, and says so."""
        def scores(source: TeacherSource) -> TeacherScores:
            if not hasattr(source, "scores_for"):
                raise ValueError(f"teacher {source.name} cannot score arbitrary ids (a cache holds only the top k of "
                                 "its own data); fall back to a direct teacher instead (teacher_fallback: [direct])")
            return source.scores_for(input_ids, lengths, score_ids, temperature)

        return self._on_active(scores)

    def _on_active(self, ask: Callable[[TeacherSource], Any]) -> Any:
        """``ask(source)`` on the active source; on TeacherUnavailable, the next source in the chain."""
        self._maybe_return_to_primary()
        while True:
            source = self.sources[self.active]
            try:
                return ask(source)
            except TeacherUnavailable as exc:
                if self.active + 1 >= len(self.sources):
                    raise
                if hasattr(source, "drop_prefetched"):
                    source.drop_prefetched()
                self._last_probe = time.monotonic()
                self._switch(self.active + 1, str(exc)[:300])

    def close(self) -> None:
        for source in self.sources:
            source.close()
