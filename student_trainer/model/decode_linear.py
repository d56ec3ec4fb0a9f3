"""``F.linear`` for decoding on CPU: a handful of fp32 rows without autograd is computed as ``W @ x^T``.

Decoding feeds one token per row, so every projection of a recurrent step is a product of a few rows
``x [n, d_in]`` with a weight ``W [d_out, d_in]``. MKL's fp32 GEMM (what ``F.linear`` calls on CPU) picks
a slow kernel for ``x @ W^T`` at such shapes; the same product in the other orientation, ``(W @ x^T)^T``,
is up to 3x faster for the 49k-wide LM head and 1.1-1.3x for the layers' projections, which makes one
recurrent step of the 158M student ~1.35x faster at 2-4 rows (benchmarks/RESULTS.md, "Decoding
faster"). The numbers are the same product summed in another order (float32 rounding apart).

Only that case takes the other orientation: CPU, float32 input and weight, no autograd (decoding runs
under ``torch.no_grad``; training keeps ``F.linear`` and its exact numbers), no autocast (under bf16
autocast ``F.linear`` is faster), at most :data:`FEW_ROWS` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 4  # measured: 1.35-1.4x per step at 2-4 rows; at 5-16 rows no better than MKL's own (RESULTS.md)


def _takes_other_orientation(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 1 and x.numel() <= FEW_ROWS * x.size(-1)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., d_in] @ weight [d_out, d_in]^T (+ bias [d_out]) -> [..., d_out]``, as ``F.linear``."""
    if not _takes_other_orientation(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.size(-1))
    out = torch.mm(weight, rows.T)  # [d_out, n]
    if bias is not None:
        out += bias[:, None]
    return out.T.contiguous().view(*x.shape[:-1], weight.size(0))


class DecodeLinear(nn.Linear):
    """``nn.Linear`` computing with :func:`linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_decode_linear(model: nn.Module) -> None:
    """Make every plain ``nn.Linear`` inside ``model`` a :class:`DecodeLinear` (in place; TorchScale builds
    its projections as ``nn.Linear``, so they are converted after construction)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
