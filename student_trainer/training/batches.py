"""Micro-batches as the training step sees them, and the queue that reads them ahead of the step."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable

import torch

from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import PretokenizedShardDataset, collate_rows
from student_trainer.teachers.base import TeacherSource


@dataclass
class Batch:
    """A micro-batch: ``input_ids [B, L]``, ``row_mask [B, L]`` (row t supervised), ``labels [B, L]``."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    indices: torch.Tensor
    row_mask: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> "Batch":
        batch = collate_rows(rows)
        longest = int(batch["lengths"].max())
        input_ids, loss_mask = batch["input_ids"][:, :longest], batch["loss_mask"][:, :longest]
        # Row t predicts token t+1: it is supervised when token t+1 is a target (mask is 0 on padding).
        row_mask = torch.zeros_like(loss_mask)
        row_mask[:, :-1] = loss_mask[:, 1:]
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = input_ids[:, 1:]
        return cls(input_ids, batch["lengths"], batch["indices"], row_mask, labels)


class UpcomingBatches:
    """Micro-batches read ahead of the step, so a teacher with ``prefetch`` (network mode) fetches
    their targets while the current step computes. Checkpoints record the sampler position of the
    first batch not yet trained on, so a resumed run sees exactly the batches it had not trained on.

    ``wants_targets(n)``: whether the ``n``-th batch of the run (counted from ``first_batch``) needs the
    teacher's targets of its own rows; an on-policy step's batches give only prompts, so their targets
    are not fetched.
    """

    def __init__(self, dataset: PretokenizedShardDataset, sampler: ShardSampler, batch_size: int,
                 teacher: TeacherSource, depth: int, first_batch: int = 0,
                 wants_targets: Callable[[int], bool] = lambda n: True) -> None:
        self.dataset, self.sampler, self.batch_size, self.teacher = dataset, sampler, batch_size, teacher
        self.set_depth(depth)
        self._queue: collections.deque[tuple[dict[str, Any], Batch]] = collections.deque()
        self._read, self.wants_targets = first_batch, wants_targets

    def next(self) -> Batch:
        while len(self._queue) < self.depth + 1:
            state = self.sampler.state_dict()
            batch = Batch.from_rows([self.dataset[i] for i in self.sampler.take(self.batch_size)])
            if self.depth and self.wants_targets(self._read):
                self.teacher.prefetch(batch.input_ids, batch.lengths, batch.indices)
            self._read += 1
            self._queue.append((state, batch))
        return self._queue.popleft()[1]

    def set_depth(self, depth: int) -> None:
        """Read ``depth`` batches ahead from now on (0 turns prefetching off)."""
        self.depth = depth if hasattr(self.teacher, "prefetch") else 0

    def sampler_state(self) -> dict[str, Any]:
        return self._queue[0][0] if self._queue else self.sampler.state_dict()
