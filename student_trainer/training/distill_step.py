"""One distillation step's pieces: the student's loss on a micro-batch, as one module's forward
(:class:`DistillStep`, what DDP / FSDP2 wrap), the step's row totals and metrics, and the held-out
:class:`Evaluator`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from student_trainer.training.config import TrainConfig
from student_trainer.training.batches import Batch
from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import PretokenizedShardDataset
from student_trainer.training.distributed import Distributed
from student_trainer.training.losses import LossConfig, LossOutput, distillation_loss
from student_trainer.model.student import RetNetStudent
from student_trainer.teachers.targets import TeacherTargets
from student_trainer.teachers import TeacherSource


def student_loss(model: RetNetStudent, batch: Batch, targets: TeacherTargets, config: LossConfig,
                 device: torch.device, autocast: Any, row_totals: tuple[float, float] | None = None,
                 advantages: torch.Tensor | None = None) -> LossOutput:
    """The distillation loss of ``batch``; ``advantages [B, L]``: an on-policy step's sequence term's."""
    with autocast:
        hidden = model.hidden_states(batch.input_ids.to(device))
    return distillation_loss(hidden, model.output_projection.weight, targets.to(device),
                             batch.labels.to(device), batch.row_mask.to(device), config, row_totals,
                             None if advantages is None else advantages.to(device))


def step_row_totals(batches: list[Batch], dist: Distributed) -> tuple[float, float]:
    """``(supervised rows, rows with a label)`` of a whole optimiser step (every micro-batch, every
    rank), per rank: each rank divides its loss sums by these, DDP averages the gradients over the
    ranks, and so every supervised row of the step weighs the same (assistant-only masks make the
    micro-batches uneven)."""
    rows = sum(int(batch.row_mask.sum()) for batch in batches)
    labelled = sum(int((batch.row_mask.bool() & (batch.labels >= 0)).sum()) for batch in batches)
    totals = dist.all_reduce_sum({"rows": rows, "labelled": labelled})
    return totals["rows"] / dist.world_size, totals["labelled"] / dist.world_size


def combine_micro_metrics(micro_metrics: list[dict[str, float]],
                          row_totals: tuple[float, float] | None) -> dict[str, float]:
    """One step's metrics from its micro-batches', such that their mean over the ranks is the step's.

    Stage 1 (``row_totals`` None): plain means. KD: each micro-batch's ``train/total`` is already its
    share of the step's loss (summed); the other means are summed weighted by their rows (CE: rows
    with a label) and divided by the step's per-rank row counts, as the loss itself is.
    """
    if row_totals is None:
        return {key: float(np.mean([m[key] for m in micro_metrics])) for key in micro_metrics[0]}
    rows, labelled = (max(total, 1e-12) for total in row_totals)
    combined = {}
    for key in micro_metrics[0]:
        if key in ("train/total", "train/rows", "train/label_rows"):
            combined[key] = float(sum(m[key] for m in micro_metrics))
        elif key == "train/ce":
            combined[key] = float(sum(m[key] * m["train/label_rows"] for m in micro_metrics)) / labelled
        else:
            combined[key] = float(sum(m[key] * m["train/rows"] for m in micro_metrics)) / rows
    return combined


class DistillStep(nn.Module):
    """The student's forward pass and its distillation loss as one module's ``forward``.

    DDP and FSDP2 hook ``forward``; the chunked loss uses the LM head's weight outside the student's
    own forward, so the whole computation has to be one ``forward`` for them to see it.
    """

    def __init__(self, student: RetNetStudent, losses: LossConfig, device: torch.device, autocast: Any) -> None:
        super().__init__()
        self.student, self.losses, self.device, self.autocast = student, losses, device, autocast

    def forward(self, batch: Batch, targets: TeacherTargets, row_totals: tuple[float, float] | None = None,
                losses: LossConfig | None = None, advantages: torch.Tensor | None = None) -> LossOutput:
        """``losses``: this batch's loss settings (an on-policy step's), None: the run's; ``advantages
        [B, L]``: the on-policy sequence term's (None: off)."""
        return student_loss(self.student, batch, targets, losses or self.losses, self.device, self.autocast, row_totals,
                            advantages)


class Evaluator:
    """Held-out loss, KL to the teacher, perplexity and top-1 agreement on fixed batches.

    The batches and their teacher targets are computed once and reused at every evaluation.
    """

    def __init__(self, dataset: PretokenizedShardDataset, teacher: TeacherSource, losses: LossConfig,
                 config: TrainConfig, device: torch.device, autocast: Any) -> None:
        self.losses, self.device, self.autocast = losses, device, autocast
        order = ShardSampler(len(dataset), shuffle=False)
        count = min(config.eval_batches, max(1, len(dataset) // config.batch_size))
        self.batches = []
        for _ in range(count):
            batch = Batch.from_rows([dataset[i] for i in order.take(config.batch_size)])
            targets = teacher.targets_for(batch.input_ids, batch.lengths, batch.indices, split=dataset.split)
            self.batches.append((batch, targets))

    @torch.no_grad()
    def run(self, model: RetNetStudent | nn.Module) -> dict[str, float]:
        """Evaluate a student, or the training step module (:class:`DistillStep`, possibly wrapped by
        DDP / FSDP2): under torchrun every rank evaluates the same batches (FSDP2 needs all ranks in
        every forward) and gets the same numbers."""
        step = DistillStep(model, self.losses, self.device, self.autocast) if isinstance(model, RetNetStudent) else model
        step.eval()
        totals: dict[str, float] = {}
        rows = 0
        for batch, targets in self.batches:
            out = step(batch, targets)
            for key, value in out.metrics("eval/").items():
                totals[key] = totals.get(key, 0.0) + value * out.n_rows
            rows += out.n_rows
        result = {key: value / max(rows, 1) for key, value in totals.items() if key not in ("eval/rows", "eval/label_rows")}
        result["eval/ppl"] = math.exp(min(result.get("eval/ce", 0.0), 50.0))
        result["eval/rows"] = float(rows)
        return result
