"""Optimisers, learning-rate schedule and gradient clipping for the student (DESIGN.md section 8).

Design:

- **Muon + AdamW.** ``torch.optim.Muon`` updates the 2-D weight matrices inside the RetNet blocks
  (q/k/v/g/out projections, SwiGLU fc1/gate/fc2; see :func:`~student_trainer.model.student.split_params_for_muon`).
  AdamW updates everything else: the embedding (= the tied head), an untied head, norms, biases.
  The original project put the embedding under Muon and clipped ~75x every step; never do that.
- **One learning rate.** Muon runs with ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's rule,
  ``lr * 0.2 * sqrt(max(A, B))``), which scales its orthogonalised update to the RMS of an AdamW
  update, so both optimisers share ``OptimConfig.lr`` and ``weight_decay``; there is no second
  learning rate to tune, and the AdamW-only comparison uses the very same numbers.
- **Weight decay groups.** Decay goes on weight matrices only: the Muon group (or, in AdamW-only
  mode, the same block matrices in ``adamw_decay``) and an untied output head. No decay on the
  embedding (decay drags rare tokens' rows to zero; with tied embeddings it is also the head), norms
  (decay pulls their gains to 0, not to their identity value 1) or biases.
- **Named groups.** Every param group has ``name`` (``muon``, ``adamw_decay``, ``adamw_no_decay``),
  ``base_lr`` and ``param_names``, so LRs can be logged per group and restored with the optimiser.
- **Schedule composes with interventions.** :class:`LRController` sets, every step,
  ``lr = base_lr * lr_factor(step) * multiplier(step)``: an LR boost from the saddle detector is a
  factor in that product, so the schedule can no longer overwrite it (the original project's bug).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from student_trainer.model.student import HEAD_KEY, split_params_for_muon

OPTIMIZERS = ("muon", "adamw")
MUON_ADJUST_LR = "match_rms_adamw"  # lets Muon share AdamW's learning rate (see the module docstring)
ALLOC_CONF_VAR = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_CONF_DEFAULT = "expandable_segments:True"


@dataclass
class OptimConfig:
    """Optimiser, schedule and clipping settings.

    Attributes:
        optimizer: ``"muon"`` (Muon for block matrices + AdamW for the rest) or ``"adamw"`` (AdamW for all).
        lr: peak learning rate of every group; Muon shares it through ``adjust_lr_fn="match_rms_adamw"``.
        weight_decay: decoupled weight decay of the decayed groups (``muon``, ``adamw_decay``).
        betas, eps: AdamW's moment coefficients and denominator epsilon.
        momentum, nesterov, ns_steps: Muon's momentum, Nesterov flag and Newton-Schulz iterations.
        warmup_steps: linear warmup length in optimiser steps (0 = start at the peak).
        total_steps: step at which the cosine decay reaches ``min_lr_ratio * lr`` (held there after).
        min_lr_ratio: final LR as a fraction of the peak, in ``[0, 1]``.
        grad_clip: max global gradient L2 norm; ``None`` or ``0`` disables clipping (the norm is still measured).
    """

    optimizer: str = "muon"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    warmup_steps: int = 1000
    total_steps: int = 100_000
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"OptimConfig.optimizer must be one of {OPTIMIZERS}, found {self.optimizer!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"OptimConfig.lr must be a finite number > 0, found {self.lr!r} (e.g. lr=3e-4).")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, found {self.weight_decay!r}.")
        # YAML gives lists; keep a tuple so the config compares and serialises the same way.
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), found {self.betas!r} "
                             "(e.g. betas=[0.9, 0.95]).")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps must be > 0, found {self.eps!r}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OptimConfig.momentum must be in [0, 1), found {self.momentum!r}.")
        for name in ("ns_steps", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OptimConfig.{name} must be an integer >= 1, found {value!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be an integer >= 0, found {self.warmup_steps!r}.")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"OptimConfig.warmup_steps={self.warmup_steps} must be < total_steps={self.total_steps}; "
                "shorten the warmup or raise total_steps."
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], found {self.min_lr_ratio!r}.")
        if self.grad_clip is not None and not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"OptimConfig.grad_clip must be a finite number >= 0 or None (no clipping), "
                             f"found {self.grad_clip!r}.")


def build_optimizers(model: nn.Module, config: OptimConfig) -> list[torch.optim.Optimizer]:
    """The optimisers for ``model``: ``[Muon, AdamW]`` (``optimizer="muon"``) or ``[AdamW]``.

    Every trainable parameter lands in exactly one named group (``muon``, ``adamw_decay``,
    ``adamw_no_decay``; empty groups are left out). Step all returned optimisers every step.
    """
    block_matrices, rest = split_params_for_muon(model)
    # An untied head is a weight matrix like any other and gets decay; the embedding does not. A tied
    # head never shows up under its own name (named_parameters lists the shared tensor once, as the
    # embedding). Matching the name suffix also works on DDP / torch.compile wrappers.
    head_decay = [(n, p) for n, p in rest if n.endswith(HEAD_KEY)]
    no_decay = [(n, p) for n, p in rest if not n.endswith(HEAD_KEY)]

    adamw_kwargs = dict(betas=config.betas, eps=config.eps)
    if config.optimizer == "adamw":
        adamw_groups = [("adamw_decay", block_matrices + head_decay, config.weight_decay)]
    else:
        adamw_groups = [("adamw_decay", head_decay, config.weight_decay)]
    adamw_groups.append(("adamw_no_decay", no_decay, 0.0))

    optimizers: list[torch.optim.Optimizer] = []
    if config.optimizer == "muon" and block_matrices:
        _warn_if_muon_is_slow_here(block_matrices)
        optimizers.append(torch.optim.Muon(
            [_group("muon", block_matrices, config.lr, config.weight_decay)],
            lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
            nesterov=config.nesterov, ns_steps=config.ns_steps, adjust_lr_fn=MUON_ADJUST_LR,
        ))
    groups = [_group(name, named, config.lr, wd) for name, named, wd in adamw_groups if named]
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=config.lr, **adamw_kwargs))
    if not optimizers:
        raise ValueError(f"build_optimizers: {type(model).__name__} has no trainable parameters; "
                         "expected at least one parameter with requires_grad=True.")
    return optimizers


def _warn_if_muon_is_slow_here(named: list[tuple[str, nn.Parameter]]) -> None:
    # torch's Muon runs Newton-Schulz in bf16 (hard-coded); CPUs without AVX-512 compute bf16 matmuls
    # ~300x slower than fp32 (measured here: 340 s per step for SmolLM2-sized matrices, AVX2 only).
    largest = max(p.numel() for _, p in named)
    on_cpu = any(p.device.type == "cpu" for _, p in named)
    if on_cpu and largest >= 256 * 256 and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        warnings.warn(f"Muon on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512): torch's Muon "
                      "orthogonalises in bf16, which this CPU computes far slower than fp32; with matrices this "
                      "large a step can take minutes. Use optimizer=adamw on this machine.", stacklevel=3)


def _group(name: str, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> dict[str, Any]:
    # (name, param) pairs make torch store "param_names" in the group (and in its state_dict).
    return {"name": name, "params": named, "lr": lr, "base_lr": lr, "weight_decay": weight_decay}


def param_groups(optimizers: Iterable[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    """All param groups of ``optimizers``, in order."""
    return [group for optimizer in optimizers for group in optimizer.param_groups]


def group_lrs(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, float]:
    """Current LR of each named group, e.g. ``{"muon": 3e-4, "adamw_no_decay": 3e-4}``, for logging."""
    return {group.get("name", f"group{i}"): float(group["lr"]) for i, group in enumerate(param_groups(optimizers))}


# ----- schedule ----------------------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warmup + cosine LR factor for optimiser step ``step`` (0-based: the number of updates done).

    Linear warmup ``(step + 1) / (warmup_steps + 1)``: small but never zero at step 0 (a zero-LR
    step would waste a batch), exactly 1.0 at ``step == warmup_steps``. Then a cosine from 1.0 down to
    ``min_lr_ratio`` at ``step == total_steps``, held there after.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRController:
    """Sets every group's ``lr = base_lr * lr_factor(step) * multiplier(step)`` once per step.

    ``multiplier`` is typically :meth:`student_trainer.training.health.SaddleDetector.multiplier`; because the
    LR is recomputed from ``base_lr`` every step (never from the previous LR), an intervention and the
    schedule compose, and the LR returns to the plain schedule the step the intervention ends.
    ``base_lr`` lives in each param group, so it is saved and restored with the optimiser state.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], config: OptimConfig,
                 multiplier: Callable[[int], float] | None = None, first_step: int = 0) -> None:
        self.optimizers = optimizers
        self.config = config
        self.multiplier = multiplier
        self.first_step = first_step  # the schedule starts here (a second training stage starts mid-run)
        self.last_step: int | None = None
        for group in param_groups(optimizers):
            group.setdefault("base_lr", group["lr"])  # optimisers built elsewhere: their lr is the peak

    def factor(self, step: int) -> float:
        """The schedule factor at ``step`` (without the intervention multiplier)."""
        c = self.config
        return lr_factor(step - self.first_step, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    def apply(self, step: int) -> dict[str, float]:
        """Set the LRs for optimiser step ``step``; call before ``optimizer.step()``. Returns :func:`group_lrs`."""
        scale = self.factor(step) * (self.multiplier(step) if self.multiplier is not None else 1.0)
        for group in param_groups(self.optimizers):
            group["lr"] = group["base_lr"] * scale
        self.last_step = step
        return group_lrs(self.optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]


# ----- gradients and memory ------------------------------------------------------------------------------


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Global L2 norm of the gradients *before* clipping; scales them to at most ``max_norm``.

    A non-finite norm (NaN/inf) is returned as is and the gradients are left untouched: the step
    is going to be skipped (see :class:`~student_trainer.training.health.NonFiniteGuard`), and scaling by
    ``max_norm / inf`` would only turn the finite gradients into zeros or NaNs. ``max_norm`` ``None``
    or ``0`` measures without clipping. Parameters without a gradient are ignored.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    value = float(total)  # one host sync per step; the guard and the logs need the number anyway
    if max_norm and math.isfinite(value):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return value


def configure_cuda_allocator(environ: dict[str, str] | None = None) -> str | None:
    """Default ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set an allocator config.

    Expandable segments let the caching allocator grow blocks in place instead of fragmenting memory
    across varying sequence lengths. The allocator reads the variable once, when CUDA initialises,
    so call this at process start, before anything touches CUDA; afterwards it warns and changes
    nothing for this process. ``PYTORCH_ALLOC_CONF`` (torch's newer name) counts as set too. Harmless
    on CPU-only machines. Returns the allocator config now in the environment (``None`` if none).
    """
    env = os.environ if environ is None else environ
    existing = env.get(ALLOC_CONF_VAR) or env.get("PYTORCH_ALLOC_CONF")
    if existing:
        return existing  # an explicit choice always wins
    if torch.cuda.is_initialized():
        warnings.warn(
            f"configure_cuda_allocator: CUDA is already initialised, so setting {ALLOC_CONF_VAR} now has "
            "no effect in this process; call it before the first CUDA operation.",
            stacklevel=2,
        )
        return None
    env[ALLOC_CONF_VAR] = ALLOC_CONF_DEFAULT
    return ALLOC_CONF_DEFAULT
