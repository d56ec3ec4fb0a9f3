"""Stage 1 of a retrofit: attention transfer (DESIGN.md section 14).

Only the retention projections (q, k, v, g, out and their biases) train. One teacher forward per
batch records, for every kept teacher layer, the normed hidden states its attention read and the
output it produced; each student layer's retention runs on those same inputs (the teacher's own
hidden states, not the student's) and is pulled towards that output. All layers train together
from the one teacher forward, so a step costs one teacher pass plus L retention blocks.

Losses (``attention_transfer_loss``):

- ``relative``: per layer ``sum((r - a)^2) / sum(a^2)`` over the valid rows, averaged over layers.
  Scale-free: a layer whose attention output is large does not drown the others.
- ``mse``: per layer ``mean((r - a)^2)``, averaged over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from student_trainer.model.student import RetNetStudent
from student_trainer.model.retrofit import valid_rows, capture_attention, retention_output

TRANSFER_LOSSES = ("relative", "mse")
RETENTION_PARAMETER = ".retention."


def retention_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every retention projection (q, k, v, g, out, biases)."""
    return [(name, param) for name, param in model.named_parameters() if RETENTION_PARAMETER in name]


def set_stage_trainable(model: nn.Module, retention_only: bool) -> None:
    """Stage 1: only the retention projections have ``requires_grad``; stage 2: every parameter."""
    for name, param in model.named_parameters():
        param.requires_grad_(not retention_only or RETENTION_PARAMETER in name)


@dataclass
class TransferOutput:
    """The stage-1 loss (scalar, with grad) and the detached per-layer losses for logging."""

    loss: torch.Tensor
    per_layer: list[float]
    n_rows: int
    teacher_seconds: float = 0.0

    def metrics(self, prefix: str = "train/") -> dict[str, float]:
        out = {f"{prefix}total": float(self.loss.detach()), f"{prefix}rows": float(self.n_rows)}
        out.update({f"transfer/layer_{j:02d}": value for j, value in enumerate(self.per_layer)})
        return out


class AttentionTransfer:
    """Stage-1 loss of a retrofitted ``student`` against ``teacher_lm`` (a HF causal LM in process).

    Args:
        teacher_layers: the teacher layer each student layer was copied from.
        loss: ``relative`` or ``mse`` (module docstring).
        autocast: the student's autocast context (the teacher runs as it is loaded).
    """

    def __init__(self, student: RetNetStudent, teacher_lm: nn.Module, teacher_layers: Sequence[int],
                 loss: str = "relative", autocast: Any = None) -> None:
        if loss not in TRANSFER_LOSSES:
            raise ValueError(f"attention_transfer_loss must be one of {TRANSFER_LOSSES}, found {loss!r}")
        if len(teacher_layers) != len(student.decoder.layers):
            raise ValueError(f"{len(teacher_layers)} teacher layers for a student of {len(student.decoder.layers)}")
        self.student, self.teacher_lm, self.teacher_layers = student, teacher_lm, list(teacher_layers)
        self.loss_kind = loss
        self.autocast = autocast if autocast is not None else torch.autocast("cpu", enabled=False)

    def __call__(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> TransferOutput:
        """``input_ids [B, L]`` (right-padded), ``lengths [B]`` -> the stage-1 loss over valid rows."""
        started = time.perf_counter()
        taps = capture_attention(self.teacher_lm, input_ids, self.teacher_layers)
        teacher_seconds = time.perf_counter() - started
        device = self.student.embed_tokens.weight.device
        losses = []
        for j, tap in enumerate(taps):
            with self.autocast:
                ours = retention_output(self.student, j, tap.inputs.to(device))
            ours = valid_rows(ours.float(), lengths)
            theirs = valid_rows(tap.outputs.to(device), lengths)
            squared = (ours - theirs).pow(2)
            losses.append(squared.sum() / theirs.pow(2).sum().clamp(min=1e-12) if self.loss_kind == "relative"
                          else squared.mean())
        stacked = torch.stack(losses)
        return TransferOutput(stacked.mean(), stacked.detach().tolist(), int(lengths.sum()), teacher_seconds)
