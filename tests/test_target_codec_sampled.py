"""Sampled targets (sparse logit sampling): the engine's sampler, the codec round trip, and unbiasedness.

The claim behind the ``sampled`` target type: with ``logprobs = log(count / n)`` and tail ``-inf``,
the project's sparse forward-KL loss has a gradient w.r.t. the student logits whose mean over
draws is the dense KL gradient ``softmax(z) - p``; top-k targets (renormalised) are biased.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shared import target_codec as tc
from student_trainer.training.losses import LossConfig, distillation_loss_from_logits
from student_trainer.teachers.targets import TeacherTargets
from teacher_server.engines.topk_math import sample_from_logits, topk_from_hidden

V = 10


def kl_grad(indices: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d(mean forward KL)/dz per row ``[R, V]`` for targets ``[R, k]`` and student logits ``z [V]`` on every row."""
    rows = indices.shape[0]
    logits = z.expand(1, rows, V).clone().requires_grad_(True)
    targets = TeacherTargets(indices[None].long(), logprobs[None].float(), tail[None].float(), temperature=1.0)
    config = LossConfig(temperature=1.0, alpha=0.0)
    out = distillation_loss_from_logits(logits, targets, torch.full((1, rows), -100), torch.ones(1, rows), config)
    out.loss.backward()
    return logits.grad[0] * rows  # the loss is a mean over rows: undo it to get each row's own gradient


def test_sampled_kl_gradient_is_unbiased_and_topk_is_not():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(V, generator=g) * 2
    z = torch.randn(V, generator=g)
    p = torch.softmax(teacher, -1)
    dense = torch.softmax(z, -1) - p  # d KL(p || softmax(z)) / dz
    rows, n = 20000, 12
    ids, counts = sample_from_logits(teacher.expand(rows, V), n, torch.Generator().manual_seed(1))
    assert torch.all(counts.sum(-1) == n)
    # through the codec, as the cache stores them
    decoded = tc.decode(tc.encode_sampled(ids.numpy(), counts.numpy(), n, V))
    grads = kl_grad(torch.from_numpy(decoded.indices.astype(np.int64)), torch.from_numpy(decoded.logprobs),
                    torch.from_numpy(decoded.tail_logprob), z)
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(rows)
    assert torch.all((mean - dense).abs() <= 5 * sem + 1e-4), f"sampled mean {mean} vs dense {dense} (sem {sem})"
    # the loss sees the same thing as the exact per-draw formula softmax(z) - count / n
    p_hat = torch.zeros(rows, V).scatter_add_(1, ids, counts.double().float() / n)
    torch.testing.assert_close(grads, torch.softmax(z, -1).expand(rows, V) - p_hat, rtol=1e-4, atol=1e-5)
    # top-3 targets without a tail: the same estimator is biased (so this test can tell the two apart)
    top = torch.topk(torch.log_softmax(teacher, -1), 3)
    top_grad = kl_grad(top.indices[None], top.values[None], torch.tensor([-math.inf]), z)[0]
    assert (top_grad - dense).abs().max() > 20 * sem.max()


def test_sampler_counts_and_order():
    logits = torch.tensor([[0.0, 5.0, 5.0, -30.0], [10.0, -10.0, -10.0, -10.0]])
    ids, counts = sample_from_logits(logits, 24, torch.Generator().manual_seed(0))
    assert ids.shape == counts.shape == (2, 24)
    assert torch.all(counts.sum(-1) == 24)
    assert torch.all(counts[:, :-1] >= counts[:, 1:]), "most drawn first, padding (count 0) last"
    assert ids[1, 0] == 0 and counts[1, 0] == 24  # a near-certain token gets every draw
    assert set(ids[0][counts[0] > 0].tolist()) <= {0, 1, 2}
    empirical = torch.zeros(4).scatter_add_(0, ids[0], counts[0].float()) / 24
    assert empirical[1] + empirical[2] > 0.8


def test_topk_from_hidden_samples_reproducibly():
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8), torch.randn(V, 8)
    a = topk_from_hidden(hidden, lambda h: h @ weight.T, 12, 1.0, V, sample_n=12, sample_seed=7)
    b = topk_from_hidden(hidden, lambda h: h @ weight.T, 12, 1.0, V, sample_n=12, sample_seed=7)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert np.all(a.tail_logprob == -np.inf)
    counts = tc.sampled_from_targets(a.indices, a.logprobs, 12)
    assert np.all(counts.sum(axis=1) == 12)
    np.testing.assert_array_equal(a.logprobs, -np.sort(-a.logprobs, axis=1))  # descending, -inf padding last
