"""``F.linear`` for decoding on CPU: a handful of fp32 rows without autograd is computed as ``W @ x^T``,
split over the threads.

Decoding feeds one token per row, so every projection of a recurrent step is a product of a few rows
``x [n, d_in]`` with a weight ``W [d_out, d_in]``. MKL's fp32 GEMM (what ``F.linear`` calls on CPU) picks
a slow kernel for ``x @ W^T`` at such shapes; the same product in the other orientation, ``(W @ x^T)^T``,
is up to 3x faster for the 49k-wide LM head and 1.1-1.3x for the layers' projections. And MKL runs such a
product of a few columns on one thread: as a batch of ``torch.get_num_threads()`` products over equal
blocks of ``W``'s rows (one ``bmm`` of a view, ``W`` is not copied) every thread streams its own block.
Together they make one recurrent step of the 158M student 1.2x (1 row) to 1.6x (4 rows) faster than
``F.linear``, and 1.15x at 8-16 rows, with 2 threads on the 2-core VM (benchmarks/RESULTS.md, "Decoding
faster"; more threads split into more blocks, not measured here).
Each output is the same dot product, summed in another order (float32 rounding apart).

Only that case takes the other orientation: CPU, float32 input and weight, no autograd (decoding runs
under ``torch.no_grad``; training keeps ``F.linear`` and its exact numbers), no autocast (under bf16
autocast ``F.linear`` is faster), at most :data:`FEW_ROWS` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 16  # measured up to 16 rows (RESULTS.md); with the split, 1.1-1.15x at 8-16 rows too
SPLIT = True  # the product as a batch of one block of W's rows per thread (see the module docstring)


def _takes_other_orientation(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 1 and x.numel() <= FEW_ROWS * x.size(-1)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., d_in] @ weight [d_out, d_in]^T (+ bias [d_out]) -> [..., d_out]``, as ``F.linear``."""
    if not _takes_other_orientation(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.size(-1))
    d_out, d_in = weight.shape
    parts = torch.get_num_threads() if SPLIT else 1
    if parts > 1 and d_out % parts == 0 and weight.is_contiguous():
        blocks = weight.view(parts, d_out // parts, d_in)  # a view: W is not copied
        out = torch.bmm(blocks, rows.T.expand(parts, d_in, rows.size(0))).view(d_out, -1)  # [d_out, n]
    else:
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
