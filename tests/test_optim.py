"""Optimisers, schedule, LR controller, gradient clipping and the CUDA allocator default (student_trainer.training.optim)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.model.student import RetNetStudent
from student_trainer.training.optim import (
    ALLOC_CONF_DEFAULT,
    ALLOC_CONF_VAR,
    LRController,
    OptimConfig,
    build_optimizers,
    clip_grad_norm,
    configure_cuda_allocator,
    group_lrs,
    lr_factor,
    param_groups,
)
from tests.conftest import tiny_student

VOCAB = 320
BLOCK_MATRIX = re.compile(r"decoder\.layers\.\d+\.(retention\.(q|k|v|g|out)_proj|ffn\.(fc1|fc2|gate))\.weight")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> RetNetStudent:
    return tiny_student(VOCAB, **overrides)


def groups_by_name(optimizers) -> dict[str, dict]:
    groups = param_groups(optimizers)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), names
    return {g["name"]: g for g in groups}


def assert_partition(model: nn.Module, optimizers) -> None:
    """Every trainable parameter is in exactly one group, and nothing else is."""
    seen = [id(p) for g in param_groups(optimizers) for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable


# ----- parameter groups ----------------------------------------------------------------------------------


def test_muon_mode_groups():
    model = tiny()
    optimizers = build_optimizers(model, OptimConfig(weight_decay=0.05))
    assert [type(o) for o in optimizers] == [torch.optim.Muon, torch.optim.AdamW]
    groups = groups_by_name(optimizers)
    assert set(groups) == {"muon", "adamw_no_decay"}  # tied head: no untied matrix to decay under AdamW
    assert_partition(model, optimizers)

    muon = groups["muon"]
    assert all(p.ndim == 2 for p in muon["params"])
    assert all(BLOCK_MATRIX.fullmatch(n) for n in muon["param_names"]), muon["param_names"]
    assert len(muon["param_names"]) == 8 * model.config.n_layers  # q k v g out fc1 fc2 gate per layer
    assert muon["adjust_lr_fn"] == "match_rms_adamw" and muon["weight_decay"] == 0.05

    no_decay = groups["adamw_no_decay"]
    assert no_decay["weight_decay"] == 0.0
    assert "decoder.embed_tokens.weight" in no_decay["param_names"]
    assert "decoder.layer_norm.weight" in no_decay["param_names"]
    assert all(n.endswith("layer_norm.weight") or n == "decoder.embed_tokens.weight" for n in no_decay["param_names"])


def test_untied_head_is_decayed_under_adamw():
    model = tiny(tie_embeddings=False)
    optimizers = build_optimizers(model, OptimConfig())
    groups = groups_by_name(optimizers)
    assert groups["adamw_decay"]["param_names"] == ["decoder.output_projection.weight"]
    assert groups["adamw_decay"]["weight_decay"] == 0.1
    assert "decoder.embed_tokens.weight" in groups["adamw_no_decay"]["param_names"]
    assert_partition(model, optimizers)

    wrapper = nn.Module()  # as DDP wraps it: every name gains a "module." prefix
    wrapper.module = model
    wrapped = groups_by_name(build_optimizers(wrapper, OptimConfig()))
    assert wrapped["adamw_decay"]["param_names"] == ["module.decoder.output_projection.weight"]
    assert len(wrapped["muon"]["params"]) == len(groups["muon"]["params"])


def test_adamw_only_mode():
    model = tiny()
    optimizers = build_optimizers(model, OptimConfig(optimizer="adamw"))
    assert [type(o) for o in optimizers] == [torch.optim.AdamW]
    groups = groups_by_name(optimizers)
    assert set(groups) == {"adamw_decay", "adamw_no_decay"}
    assert all(BLOCK_MATRIX.fullmatch(n) for n in groups["adamw_decay"]["param_names"])
    assert len(groups["adamw_decay"]["params"]) == 8 * model.config.n_layers
    assert_partition(model, optimizers)


def test_frozen_parameters_are_left_out():
    model = tiny()
    model.embed_tokens.weight.requires_grad_(False)
    optimizers = build_optimizers(model, OptimConfig())
    assert_partition(model, optimizers)
    assert "decoder.embed_tokens.weight" not in groups_by_name(optimizers)["adamw_no_decay"]["param_names"]


@pytest.mark.parametrize("overrides, match", [
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(betas=(0.9,)), "betas must be two numbers"),
    (dict(betas=(0.9, 1.0)), "betas must be two numbers"),
    (dict(momentum=1.0), "momentum must be in"),
    (dict(warmup_steps=100, total_steps=100), "warmup_steps=100 must be < total_steps=100"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(total_steps=0), "total_steps must be an integer >= 1"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio must be in"),
    (dict(grad_clip=float("inf")), "grad_clip must be"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**overrides)


def test_config_betas_from_yaml_list():
    assert OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


# ----- schedule --------------------------------------------------------------------------------------------


def test_lr_factor_warmup_peak_cosine_floor():
    warmup, total, floor = 10, 110, 0.1
    factors = [lr_factor(s, warmup, total, floor) for s in range(total + 20)]
    assert factors[0] == pytest.approx(1 / 11)  # small but not a wasted zero-LR step
    steps = [b - a for a, b in zip(factors[:warmup + 1], factors[1:warmup + 1])]
    assert steps == pytest.approx([1 / 11] * warmup)  # linear
    assert factors[warmup] == 1.0 and max(factors) == 1.0  # peak exactly at the warmup end
    assert factors[warmup + 50] == pytest.approx((1 + floor) / 2)  # cosine midpoint
    assert factors[total] == pytest.approx(floor)
    assert factors[total:] == pytest.approx([floor] * 20)  # held after total_steps
    decay = factors[warmup:total + 1]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_factor(0, 0, 100, 0.0) == 1.0  # no warmup: start at the peak


def test_controller_sets_group_lrs_every_step():
    model = tiny(tie_embeddings=False)
    config = OptimConfig(lr=1e-3, warmup_steps=5, total_steps=50, min_lr_ratio=0.2)
    optimizers = build_optimizers(model, config)
    boost = {7: 3.0, 8: 3.0}
    controller = LRController(optimizers, config, multiplier=lambda step: boost.get(step, 1.0))
    for step in range(60):
        lrs = controller.apply(step)
        expected = 1e-3 * lr_factor(step, 5, 50, 0.2) * boost.get(step, 1.0)
        assert set(lrs) == {"muon", "adamw_decay", "adamw_no_decay"}
        assert lrs == pytest.approx(dict.fromkeys(lrs, expected), rel=1e-12)
        assert all(g["lr"] == lrs[g["name"]] for g in param_groups(optimizers))
    assert controller.state_dict() == {"last_step": 59}


def test_base_lr_survives_optimizer_resume():
    config = OptimConfig(lr=2e-3, warmup_steps=3, total_steps=10)
    saved = build_optimizers(tiny(), config)
    LRController(saved, config).apply(1)  # scheduled lr != base lr now
    resumed = build_optimizers(tiny(), OptimConfig(lr=5e-4, warmup_steps=3, total_steps=10))
    for optimizer, source in zip(resumed, saved):
        optimizer.load_state_dict(source.state_dict())
    assert all(g["base_lr"] == 2e-3 for g in param_groups(resumed))
    LRController(resumed, config).apply(4)
    assert group_lrs(resumed) == pytest.approx(dict.fromkeys(group_lrs(resumed), 2e-3 * lr_factor(4, 3, 10, 0.1)))


# ----- gradient clipping -------------------------------------------------------------------------------------


def params_with_grads(*grads: list[float]) -> list[nn.Parameter]:
    params = []
    for values in grads:
        p = nn.Parameter(torch.zeros(len(values)))
        p.grad = torch.tensor(values)
        params.append(p)
    return params


def test_clip_grad_norm_returns_preclip_norm_and_clips():
    params = params_with_grads([3.0, 0.0], [0.0, 4.0]) + [nn.Parameter(torch.ones(2))]  # last has no grad
    assert clip_grad_norm(params, max_norm=1.0) == pytest.approx(5.0)
    clipped = torch.cat([p.grad for p in params[:2]])
    torch.testing.assert_close(clipped, torch.tensor([0.6, 0.0, 0.0, 0.8]), rtol=1e-5, atol=1e-6)

    small = params_with_grads([0.3, 0.4])
    assert clip_grad_norm(small, max_norm=1.0) == pytest.approx(0.5)
    torch.testing.assert_close(small[0].grad, torch.tensor([0.3, 0.4]))  # below the max: untouched
    unclipped = params_with_grads([30.0, 40.0])
    assert clip_grad_norm(unclipped, max_norm=None) == pytest.approx(50.0)
    torch.testing.assert_close(unclipped[0].grad, torch.tensor([30.0, 40.0]))
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], max_norm=1.0) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_grad_norm_non_finite_leaves_grads(bad):
    params = params_with_grads([3.0, 4.0], [bad, 1.0])
    norm = clip_grad_norm(params, max_norm=1.0)
    assert not math.isfinite(norm)
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 4.0]))


# ----- CUDA allocator default --------------------------------------------------------------------------------


@pytest.fixture
def clean_alloc_env(monkeypatch):
    monkeypatch.delenv(ALLOC_CONF_VAR, raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    return monkeypatch


def test_allocator_default_is_set_when_unset(clean_alloc_env):
    import os

    assert configure_cuda_allocator() == ALLOC_CONF_DEFAULT == "expandable_segments:True"
    assert os.environ[ALLOC_CONF_VAR] == ALLOC_CONF_DEFAULT


@pytest.mark.parametrize("var", [ALLOC_CONF_VAR, "PYTORCH_ALLOC_CONF"])
def test_allocator_user_setting_wins(clean_alloc_env, var):
    import os

    clean_alloc_env.setenv(var, "max_split_size_mb:128")
    assert configure_cuda_allocator() == "max_split_size_mb:128"
    assert os.environ.get(ALLOC_CONF_VAR) == ("max_split_size_mb:128" if var == ALLOC_CONF_VAR else None)


def test_allocator_after_cuda_init_warns_and_changes_nothing(clean_alloc_env):
    clean_alloc_env.setattr(torch.cuda, "is_initialized", lambda: True)
    env: dict[str, str] = {}
    with pytest.warns(UserWarning, match="already initialised"):
        assert configure_cuda_allocator(env) is None
    assert env == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configure_cuda_allocator({ALLOC_CONF_VAR: "x"}) == "x"  # explicit setting: no warning


# ----- a real optimisation smoke test ------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_tiny_student_loss_decreases(optimizer, monkeypatch):
    model = tiny()
    config = OptimConfig(optimizer=optimizer, lr=3e-3, warmup_steps=2, total_steps=20, grad_clip=1.0)
    optimizers = build_optimizers(model, config)
    muon_shapes: list[tuple[int, ...]] = []
    original_step = torch.optim.Muon.step

    def spy_step(self, *args, **kwargs):
        muon_shapes.extend(tuple(p.shape) for g in self.param_groups for p in g["params"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Muon, "step", spy_step)
    controller = LRController(optimizers, config)
    ids = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(3))
    losses = []
    for step in range(12):
        controller.apply(step)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        assert math.isfinite(clip_grad_norm(model.parameters(), config.grad_clip))
        for o in optimizers:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # memorising one batch: ~6.4 -> ~1.1 (Muon), ~0.2 (AdamW)
    if optimizer == "muon":
        assert muon_shapes and all(len(shape) == 2 for shape in muon_shapes)
        assert len(muon_shapes) == 12 * 16  # 16 block matrices, every step
    else:
        assert muon_shapes == []
