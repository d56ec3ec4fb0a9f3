"""Saddle/plateau detection, LR interventions composed with the schedule, checkpointed detector
state, and the non-finite step guard (student_trainer.training.health)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from student_trainer.training.health import HealthConfig, NonFiniteGuard, SaddleDetector, SaddleEvent, TrainingDiverged
from student_trainer.training.optim import LRController, OptimConfig, lr_factor

# Short windows so that a trace of ~1500 steps exercises several interventions.
FAST = dict(ema_beta=0.9, window=50, min_rel_improvement=0.005, max_grad_ratio=1.2, warmup_steps=100,
            patience=20, boost=2.5, duration=30, cooldown=100, max_interventions=10)
STEPS = 1500


def flat_trace(seed: int = 0, grad_growth: float = 0.0) -> list[tuple[float, float]]:
    """A plateau: loss 2.0 +- 0.05 noise; grad norm ~1, optionally growing by ``grad_growth`` per step."""
    rng = random.Random(seed)
    return [(2.0 + 0.05 * rng.gauss(0, 1), math.exp(grad_growth * t) * (1 + 0.1 * rng.gauss(0, 1)))
            for t in range(STEPS)]


def descending_trace(seed: int = 0) -> list[tuple[float, float]]:
    """Steady progress: loss 10/sqrt(t+1) with 2% noise, grad norm shrinking like a real run's."""
    rng = random.Random(seed)
    return [(10 / math.sqrt(t + 1) * (1 + 0.02 * rng.gauss(0, 1)), 3 / (t + 1) ** 0.25 * (1 + 0.1 * rng.gauss(0, 1)))
            for t in range(STEPS)]


def run(detector: SaddleDetector, trace, start: int = 0) -> tuple[list[SaddleEvent], list[float]]:
    """Feed ``trace[start:]``; return the fired events and the multiplier seen at each step."""
    events, multipliers = [], []
    for step in range(start, len(trace)):
        multipliers.append(detector.multiplier(step))  # what the LR controller applies before the step
        event = detector.update(step, *trace[step])
        if event is not None:
            events.append(event)
    return events, multipliers


# ----- detection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plateau_fires(seed):
    config = HealthConfig(**FAST)
    detector = SaddleDetector(config)
    events, _ = run(detector, flat_trace(seed))
    assert len(events) >= 3
    assert detector.events == events
    first = events[0]
    assert first.step >= config.warmup_steps + config.patience - 1  # warmup, then patience
    assert first.rel_improvement < config.min_rel_improvement and first.grad_ratio <= config.max_grad_ratio
    assert first.reason.startswith("plateau:") and "grad-norm ratio" in first.reason
    assert (first.start, first.end, first.boost) == (first.step + 1, first.step + 1 + config.duration, 2.5)
    json.dumps([e.to_dict() for e in events])  # events go to the logs as JSON


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steady_descent_never_fires(seed):
    detector = SaddleDetector(HealthConfig(**FAST))
    events, multipliers = run(detector, descending_trace(seed))
    assert events == [] and set(multipliers) == {1.0}


def test_growing_grad_norm_is_not_a_saddle():
    # Flat loss but gradients climbing 1%/step (~28% over half a window, above max_grad_ratio=1.2):
    # instability, where an LR boost would make things worse. Same loss noise as test_plateau_fires.
    events, _ = run(SaddleDetector(HealthConfig(**FAST)), flat_trace(0, grad_growth=0.01))
    assert events == []


def test_disabled_and_max_interventions():
    assert run(SaddleDetector(HealthConfig(**{**FAST, "enabled": False})), flat_trace())[0] == []
    assert len(run(SaddleDetector(HealthConfig(**{**FAST, "max_interventions": 2})), flat_trace())[0]) == 2


def test_non_finite_values_are_ignored():
    reference, detector = SaddleDetector(HealthConfig(**FAST)), SaddleDetector(HealthConfig(**FAST))
    for step, (loss, grad) in enumerate(flat_trace()[:200]):
        reference.update(step, loss, grad)
        detector.update(step, loss, grad)
        assert detector.update(step, float("nan"), grad) is None
        assert detector.update(step, torch.tensor(loss), float("inf")) is None
    assert detector.state_dict() == reference.state_dict()


def test_intervention_timing_and_cooldown():
    config = HealthConfig(**{**FAST, "max_interventions": 4})  # 4 whole boost windows inside the trace
    events, multipliers = run(SaddleDetector(config), flat_trace(1))
    assert len(events) == 4 and events[-1].end < STEPS
    for event in events:
        assert multipliers[event.step] == 1.0  # the firing step's own update was already made
        assert multipliers[event.start:event.end] == [config.boost] * config.duration
        assert multipliers[event.end] == 1.0  # back to the plain schedule exactly on time
    for previous, event in zip(events, events[1:]):
        assert event.step >= previous.end + config.cooldown
    boosted = {s for e in events for s in range(e.start, e.end)}
    assert all(m == (config.boost if s in boosted else 1.0) for s, m in enumerate(multipliers))


def test_boost_composes_with_schedule():
    health = HealthConfig(**FAST)
    optim = OptimConfig(lr=1e-3, warmup_steps=50, total_steps=STEPS, min_lr_ratio=0.1)
    detector = SaddleDetector(health)
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(2))], "name": "adamw_no_decay"}], lr=optim.lr)
    controller = LRController([optimizer], optim, multiplier=detector.multiplier)
    trace = flat_trace(2)
    for step, (loss, grad) in enumerate(trace):
        lr = controller.apply(step)["adamw_no_decay"]
        scheduled = 1e-3 * lr_factor(step, 50, STEPS, 0.1)
        in_boost = any(e.start <= step < e.end for e in detector.events)
        assert lr == pytest.approx(scheduled * (health.boost if in_boost else 1.0), rel=1e-12)
        detector.update(step, loss, grad)
    assert detector.events  # the composition was exercised


# ----- checkpoint / resume -------------------------------------------------------------------------------


# Seed 0 fires at steps 144 (boost 145-174, cooldown to 275) and 351: cut mid-patience before the first
# event, mid-boost, mid-cooldown, and mid-patience before the second.
@pytest.mark.parametrize("cut", [130, 160, 250, 340])
def test_state_round_trip_resumes_exactly(cut):
    trace = flat_trace(0)
    events, multipliers = run(SaddleDetector(HealthConfig(**FAST)), trace)

    first = SaddleDetector(HealthConfig(**FAST))
    events_a, multipliers_a = run(first, trace[:cut])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = SaddleDetector(HealthConfig(**FAST))
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    events_b, multipliers_b = run(resumed, trace, start=cut)

    assert [e.to_dict() for e in events_a + events_b] == [e.to_dict() for e in events]
    assert multipliers_a + multipliers_b == multipliers
    assert resumed.events == events


def test_state_version_checked():
    with pytest.raises(ValueError, match="version"):
        SaddleDetector(HealthConfig()).load_state_dict({"version": 99})


@pytest.mark.parametrize("overrides, match", [
    (dict(ema_beta=1.0), "ema_beta must be in"),
    (dict(window=0), "window must be an integer >= 1"),
    (dict(patience=2.5), "patience must be an integer"),
    (dict(cooldown=-1), "cooldown must be an integer >= 0"),
    (dict(boost=0.0), "boost must be a finite number > 0"),
    (dict(min_rel_improvement=-0.1), "min_rel_improvement must be"),
    (dict(max_grad_ratio=float("nan")), "max_grad_ratio must be"),
    (dict(max_total_nonfinite=0), "max_total_nonfinite must be"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        HealthConfig(**overrides)


# ----- non-finite guard ----------------------------------------------------------------------------------


def test_guard_skips_and_counts():
    guard = NonFiniteGuard(max_consecutive=3, max_total=None)
    assert guard.should_skip(2.0, 1.0) is False
    assert guard.should_skip(float("nan"), 1.0, step=5) is True
    assert "step 5" in guard.last_reason and "loss=nan" in guard.last_reason
    assert guard.should_skip(torch.tensor(2.0), float("inf")) is True
    assert (guard.total_skipped, guard.consecutive) == (2, 2)
    assert guard.should_skip(torch.tensor(2.0), torch.tensor(0.5)) is False  # a finite step resets the run
    assert (guard.total_skipped, guard.consecutive) == (2, 0)
    assert guard.should_skip(float("-inf"), None) is True  # no grad norm: loss only
    assert guard.should_skip(1.0, None) is False


def test_guard_raises_after_consecutive():
    guard = NonFiniteGuard(max_consecutive=3, max_total=None)
    guard.should_skip(math.nan, 1.0)
    guard.should_skip(1.0, math.inf)
    with pytest.raises(TrainingDiverged, match="3 consecutive and 3 total.*lower the learning rate"):
        guard.should_skip(math.nan, math.nan, step=42)


def test_guard_raises_after_total():
    guard = NonFiniteGuard.from_config(HealthConfig(max_consecutive_nonfinite=5, max_total_nonfinite=3))
    for _ in range(2):
        assert guard.should_skip(math.nan, 1.0)
        assert not guard.should_skip(1.0, 1.0)
    with pytest.raises(TrainingDiverged, match="1 consecutive and 3 total"):
        guard.should_skip(math.nan, 1.0)


def test_guard_state_round_trip():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.should_skip(math.nan, 1.0, step=1)
    guard.should_skip(math.nan, 1.0, step=2)
    resumed = NonFiniteGuard(max_consecutive=3)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert resumed == guard
    with pytest.raises(TrainingDiverged):  # the consecutive count survived the resume
        resumed.should_skip(math.nan, 1.0, step=3)
    with pytest.raises(ValueError, match="max_consecutive must be"):
        NonFiniteGuard(max_consecutive=0)
