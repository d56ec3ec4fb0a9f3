"""Training health: saddle/plateau detection with LR interventions, and the non-finite step guard.

DESIGN.md section 8. The original project's detector compared raw values with absolute thresholds
(which never fired) and its LR boost was overwritten by the scheduler on the next step. Here:

- every signal is *relative*: the smoothed loss against itself ``window`` updates ago, the smoothed
  gradient norm against the median of its own recent history;
- an intervention is a multiplier, :meth:`SaddleDetector.multiplier`, that
  :class:`~student_trainer.training.optim.LRController` multiplies into the scheduled LR every step, so the
  two compose and the boost ends exactly when it should;
- the whole detector state (EMAs, histories, events) is a JSON-able dict, checkpointed with the run.

Usage per optimiser step ``step`` (0-based)::

    lrs = controller.apply(step)                    # base * schedule(step) * detector.multiplier(step)
    loss.backward(); grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip)
    if guard.should_skip(loss, grad_norm, step):    # raises TrainingDiverged after too many
        zero grads, continue
    optimizer steps; event = detector.update(step, loss, grad_norm)   # log event if not None
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

STATE_VERSION = 1


class TrainingDiverged(RuntimeError):
    """Too many optimiser steps in a row (or in total) had a non-finite loss or gradient norm."""


@dataclass
class HealthConfig:
    """Saddle detection and non-finite guard settings. Steps are optimiser steps.

    Saddle / plateau detection (fires when, for ``patience`` consecutive updates, both hold):

    - the loss EMA (``ema_beta``) improved by less than ``min_rel_improvement`` (relative) over the
      last ``window`` updates, and
    - the grad-norm EMA is at most ``max_grad_ratio`` times the median of its last ``window`` values
      (gradients not growing: a rising grad norm means instability, where a boost would hurt).

    It never fires before ``warmup_steps`` (keep it past the LR warmup) nor more than
    ``max_interventions`` times. A firing at step ``s`` multiplies the LR by ``boost`` for steps
    ``[s + 1, s + 1 + duration)``; the next firing is possible from step ``s + 1 + duration + cooldown``.

    Guard: training stops with :class:`TrainingDiverged` after ``max_consecutive_nonfinite``
    consecutive skipped steps, or ``max_total_nonfinite`` in total (``None``: no total limit).
    """

    enabled: bool = True
    ema_beta: float = 0.98
    window: int = 200
    min_rel_improvement: float = 0.002
    max_grad_ratio: float = 1.2
    warmup_steps: int = 1000
    patience: int = 50
    boost: float = 2.0
    duration: int = 200
    cooldown: int = 1000
    max_interventions: int = 3
    max_consecutive_nonfinite: int = 10
    max_total_nonfinite: int | None = 100

    def __post_init__(self) -> None:
        if not 0.0 < self.ema_beta < 1.0:
            raise ValueError(f"HealthConfig.ema_beta must be in (0, 1), found {self.ema_beta!r} (e.g. 0.98).")
        for name, low in (("window", 1), ("patience", 1), ("duration", 1), ("max_consecutive_nonfinite", 1),
                          ("warmup_steps", 0), ("cooldown", 0), ("max_interventions", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"HealthConfig.{name} must be an integer >= {low}, found {value!r}.")
        total = self.max_total_nonfinite
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"HealthConfig.max_total_nonfinite must be an integer >= 1 or None (no limit), "
                             f"found {total!r}.")
        if not (math.isfinite(self.min_rel_improvement) and self.min_rel_improvement >= 0):
            raise ValueError(f"HealthConfig.min_rel_improvement must be a finite number >= 0, "
                             f"found {self.min_rel_improvement!r} (e.g. 0.002 = 0.2% per window).")
        if not (math.isfinite(self.max_grad_ratio) and self.max_grad_ratio > 0):
            raise ValueError(f"HealthConfig.max_grad_ratio must be a finite number > 0, found {self.max_grad_ratio!r}.")
        if not (math.isfinite(self.boost) and self.boost > 0):
            raise ValueError(f"HealthConfig.boost must be a finite number > 0 (the LR multiplier during an "
                             f"intervention), found {self.boost!r}.")


@dataclass
class SaddleEvent:
    """One intervention: fired at ``step``, LR x ``boost`` for steps ``[start, end)``, with the measurements."""

    step: int
    reason: str
    start: int
    end: int
    boost: float
    loss_ema: float
    rel_improvement: float
    grad_norm_ema: float
    grad_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Measure:
    loss_ema: float
    rel_improvement: float
    grad_norm_ema: float
    grad_ratio: float


class SaddleDetector:
    """Plateau detector driving LR interventions; see :class:`HealthConfig` for the rule.

    Call :meth:`update` once per completed optimiser step with its (finite) loss and pre-clip grad
    norm; non-finite values are ignored (the :class:`NonFiniteGuard` deals with them).
    """

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.loss_ema: float | None = None
        self.grad_ema: float | None = None
        # window + 1 loss EMAs: the oldest is the value `window` updates before the newest.
        self.loss_history: deque[float] = deque(maxlen=config.window + 1)
        self.grad_history: deque[float] = deque(maxlen=config.window)
        self.stale = 0  # consecutive updates that looked like a plateau
        self.quiet_until = 0  # no firing before this step (intervention + cooldown)
        self.events: list[SaddleEvent] = []

    def multiplier(self, step: int) -> float:
        """LR multiplier for optimiser step ``step``: ``boost`` inside an intervention, else 1.0."""
        if self.events:
            last = self.events[-1]
            if last.start <= step < last.end:
                return last.boost
        return 1.0

    def measure(self) -> _Measure | None:
        """Current smoothed loss, relative improvement over the window and grad-norm ratio (None until full)."""
        if len(self.loss_history) <= self.config.window:
            return None
        old, now = self.loss_history[0], self.loss_history[-1]
        rel = (old - now) / max(abs(old), 1e-12)
        reference = statistics.median(self.grad_history)
        ratio = self.grad_ema / reference if reference > 0 else 1.0
        return _Measure(now, rel, self.grad_ema, ratio)

    def update(self, step: int, loss: float | torch.Tensor, grad_norm: float | torch.Tensor) -> SaddleEvent | None:
        """Record step ``step``'s loss and grad norm; return the :class:`SaddleEvent` if this fires one."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return None
        c = self.config
        # EMAs start at the first value: no bias correction, no fake descent from 0.
        self.loss_ema = loss if self.loss_ema is None else c.ema_beta * self.loss_ema + (1 - c.ema_beta) * loss
        self.grad_ema = (grad_norm if self.grad_ema is None
                         else c.ema_beta * self.grad_ema + (1 - c.ema_beta) * grad_norm)
        self.loss_history.append(self.loss_ema)
        self.grad_history.append(self.grad_ema)

        m = self.measure()
        if (not c.enabled or m is None or len(self.events) >= c.max_interventions
                or step < c.warmup_steps or step < self.quiet_until):
            self.stale = 0
            return None
        plateau = m.rel_improvement < c.min_rel_improvement and m.grad_ratio <= c.max_grad_ratio
        self.stale = self.stale + 1 if plateau else 0
        if self.stale < c.patience:
            return None

        start = step + 1  # this step's update is done; the boost applies from the next one
        event = SaddleEvent(
            step=step,
            reason=(f"plateau: loss EMA {m.loss_ema:.4g} improved {100 * m.rel_improvement:.3f}% over "
                    f"{c.window} steps (< {100 * c.min_rel_improvement:.3f}%) for {c.patience} steps, "
                    f"grad-norm ratio {m.grad_ratio:.3f} (<= {c.max_grad_ratio})"),
            start=start, end=start + c.duration, boost=c.boost, loss_ema=m.loss_ema,
            rel_improvement=m.rel_improvement, grad_norm_ema=m.grad_norm_ema, grad_ratio=m.grad_ratio,
        )
        self.events.append(event)
        self.quiet_until = event.end + c.cooldown
        self.stale = 0
        return event

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; floats round-trip exactly through ``json``."""
        return {
            "version": STATE_VERSION,
            "loss_ema": self.loss_ema,
            "grad_ema": self.grad_ema,
            "loss_history": list(self.loss_history),
            "grad_history": list(self.grad_history),
            "stale": self.stale,
            "quiet_until": self.quiet_until,
            "events": [event.to_dict() for event in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the thresholds come from the current config)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SaddleDetector state version {state.get('version')!r} is not supported; "
                             f"expected {STATE_VERSION}. Resume with the code version that wrote the checkpoint.")
        self.loss_ema = state["loss_ema"]
        self.grad_ema = state["grad_ema"]
        self.loss_history = deque(state["loss_history"], maxlen=self.config.window + 1)
        self.grad_history = deque(state["grad_history"], maxlen=self.config.window)
        self.stale = state["stale"]
        self.quiet_until = state["quiet_until"]
        self.events = [SaddleEvent(**event) for event in state["events"]]


@dataclass
class NonFiniteGuard:
    """Skip optimiser steps whose loss or grad norm is NaN/inf; stop when that keeps happening.

    One bad batch (an fp16 overflow, a corrupt row) should cost one step, not the run; a run that
    produces nothing but NaNs should stop with a clear error instead of burning compute.
    """

    max_consecutive: int = 10
    max_total: int | None = 100
    total_skipped: int = 0
    consecutive: int = 0
    last_reason: str | None = field(default=None)

    @classmethod
    def from_config(cls, config: HealthConfig) -> "NonFiniteGuard":
        return cls(max_consecutive=config.max_consecutive_nonfinite, max_total=config.max_total_nonfinite)

    def __post_init__(self) -> None:
        limit = self.max_consecutive
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"NonFiniteGuard.max_consecutive must be an integer >= 1, found {self.max_consecutive!r}.")
        if self.max_total is not None and (not isinstance(self.max_total, int) or self.max_total < 1):
            raise ValueError(f"NonFiniteGuard.max_total must be an integer >= 1 or None, found {self.max_total!r}.")

    def should_skip(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None,
                    step: int | None = None) -> bool:
        """True (and counted) when the step must be skipped; raises :class:`TrainingDiverged` past the limits.

        ``grad_norm`` ``None`` checks the loss only. A finite step resets the consecutive count.
        """
        loss = float(loss)
        grad = None if grad_norm is None else float(grad_norm)
        if math.isfinite(loss) and (grad is None or math.isfinite(grad)):
            self.consecutive = 0
            return False
        self.total_skipped += 1
        self.consecutive += 1
        where = "" if step is None else f" at step {step}"
        self.last_reason = f"non-finite{where}: loss={loss}, grad_norm={grad}"
        if self.consecutive >= self.max_consecutive or (self.max_total is not None
                                                        and self.total_skipped >= self.max_total):
            raise TrainingDiverged(
                f"Training diverged: {self.consecutive} consecutive and {self.total_skipped} total steps had a "
                f"non-finite loss or gradient norm (limits: {self.max_consecutive} consecutive, "
                f"{self.max_total} total; last {self.last_reason}). Expected finite values; lower the "
                "learning rate or grad_clip, check the data for broken rows, or resume from an earlier "
                "checkpoint (limits: health.max_consecutive_nonfinite / health.max_total_nonfinite)."
            )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"total_skipped": self.total_skipped, "consecutive": self.consecutive, "last_reason": self.last_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_skipped = state["total_skipped"]
        self.consecutive = state["consecutive"]
        self.last_reason = state["last_reason"]
