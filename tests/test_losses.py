"""Distillation losses (DESIGN.md section 7) against a plain dense implementation, on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from student_trainer.training.losses import (
    DIVERGENCES,
    REVERSE_KL_LOGPROB_FLOOR,
    LossConfig,
    distillation_loss,
    distillation_loss_from_logits,
)
from student_trainer.teachers.targets import TeacherTargets

NEG_INF = -math.inf


def targets_from_logits(teacher_logits: torch.Tensor, k: int, temperature: float) -> TeacherTargets:
    """Exact top-k targets ``[B, L, k]`` and tail from teacher logits ``[B, L, V]``, as the server makes them."""
    logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, top.indices, NEG_INF), dim=-1)  # -inf when k == V
    return TeacherTargets(top.indices, top.values, tail)


def make_batch(seed: int = 0, vocab: int = 37, k: int = 5, temperature: float = 2.0) -> tuple:
    """Random student (hidden, head), exact teacher targets, labels with an ignored last position, a mask."""
    gen = torch.Generator().manual_seed(seed)
    batch, length = 2, 7
    teacher_logits = 2.0 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    targets = targets_from_logits(teacher_logits, k, temperature)
    hidden = torch.randn(batch, length, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (0.7 * torch.randn(vocab, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, -1] = -100  # no next token after the last position
    mask = torch.ones(batch, length)
    mask[0, :2] = 0  # prompt
    mask[1, -2:] = 0  # padding
    return hidden, weight, targets, labels, mask


def reference_loss(
    logits: torch.Tensor, targets: TeacherTargets, labels: torch.Tensor, mask: torch.Tensor, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Row by row, from the full softmax: buckets by explicit id sets, tail mass as a plain sum of probs."""
    temp, vocab = cfg.temperature, logits.shape[-1]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("ce", "kl", "div", "floor", "hs", "ht")}
    for b, t in mask.nonzero().tolist():
        z = logits[b, t]
        p_student = torch.softmax(z / temp, dim=-1)
        keep = targets.logprobs[b, t] > NEG_INF
        ids = targets.indices[b, t][keep]
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[ids] = False
        q, p = [p_student[ids]], [targets.logprobs[b, t][keep].double().exp()]
        if outside.any():
            q.append(p_student[outside].sum()[None])
            p.append(targets.tail_logprob[b, t].double().exp()[None])
        q, p = torch.cat(q), torch.cat(p)
        p = p / p.sum()
        pos = p > 0
        kl = (p[pos] * (p[pos].log() - q[pos].log())).sum()
        h_t, h_s = -(p[pos] * p[pos].log()).sum(), -(q * q.log()).sum()
        if cfg.divergence == "forward":
            div = kl
        elif cfg.divergence == "reverse":
            div = (q * (q.log() - p.log().clamp_min(REVERSE_KL_LOGPROB_FLOOR))).sum()
        elif cfg.divergence == "skew":
            mix = cfg.skew_beta * p + (1 - cfg.skew_beta) * q
            div = (p[pos] * (p[pos].log() - mix[pos].log())).sum()
        else:
            mix = cfg.jsd_beta * p + (1 - cfg.jsd_beta) * q
            div = (cfg.jsd_beta * (p[pos] * (p[pos].log() - mix[pos].log())).sum()
                   + (1 - cfg.jsd_beta) * (q * (q.log() - mix.log())).sum())
        parts["kl"].append(kl)
        parts["div"].append(div)
        parts["floor"].append(torch.relu(h_t - h_s))
        parts["hs"].append(h_s)
        parts["ht"].append(h_t)
        if labels[b, t] >= 0:
            parts["ce"].append(-torch.log_softmax(z, dim=-1)[labels[b, t]])
    mean = {name: torch.stack(values).mean() for name, values in parts.items()}
    mean["loss"] = (
        cfg.alpha * mean["ce"] + (1 - cfg.alpha) * temp**2 * mean["div"] + cfg.lambda_div * mean["floor"]
    )
    return mean


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_kl_equals_dense_kl_when_k_covers_the_vocab(temperature: float) -> None:
    hidden, weight, _, labels, mask = make_batch(seed=1)
    vocab = weight.shape[0]
    teacher_logits = 2.0 * torch.randn(2, 7, vocab, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    targets = targets_from_logits(teacher_logits, k=vocab, temperature=temperature)
    assert torch.isneginf(targets.tail_logprob).all()  # the tail is empty
    cfg = LossConfig(temperature=temperature, alpha=0.0)
    logits = hidden @ weight.T

    p_t = torch.softmax(teacher_logits / temperature, dim=-1)
    dense = (p_t * (p_t.log() - torch.log_softmax(logits / temperature, dim=-1))).sum(-1)
    expected = dense[mask.bool()].mean()
    outs = [
        distillation_loss_from_logits(logits, targets, labels, mask, cfg),
        distillation_loss(hidden, weight, targets, labels, mask, cfg),
    ]
    for out in outs:
        assert_close(out.kl, expected.detach())
        assert_close(out.loss, temperature**2 * expected)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_below_vocab_matches_the_dense_reference(divergence: str) -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=2, k=4)
    cfg = LossConfig(temperature=2.0, alpha=0.3, lambda_div=0.5, divergence=divergence)
    ref = reference_loss(hidden @ weight.T, targets, labels, mask, cfg)
    out = distillation_loss(hidden, weight, targets, labels, mask, cfg)
    assert_close(out.loss, ref["loss"])
    assert_close(out.kl, ref["kl"].detach())
    assert_close(out.divergence, ref["div"].detach())
    assert_close(out.entropy_student, ref["hs"].detach())
    assert_close(out.entropy_teacher, ref["ht"].detach())
    assert_close(out.ce, ref["ce"].detach())
    assert out.n_rows == 10 and out.n_label_rows == 9


def test_student_tail_is_exact_when_top_k_hold_nearly_all_mass() -> None:
    """fp32 student with ~1e-38 mass outside K: log1p(-sum p) would give -inf or ~-16; the bucket is ~-88."""
    vocab, k = 64, 4
    z = torch.full((1, 1, vocab), -90.0)
    z[0, 0, :k] = torch.tensor([0.0, -0.5, -1.0, -1.5])
    p_top = torch.tensor([0.5, 0.2, 0.1, 0.1], dtype=torch.float64)  # teacher keeps 0.1 for the tail
    tail = torch.tensor([[math.log(0.1)]])
    targets = TeacherTargets(torch.arange(k)[None, None], p_top.log().float()[None, None], tail)
    labels, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    cfg = LossConfig(alpha=0.0)
    out = distillation_loss_from_logits(z, targets, labels, mask, cfg)
    ref = reference_loss(z.double(), targets, labels, mask, cfg)
    assert ref["kl"] > 8.0  # the tail bucket dominates: 0.1 * (log 0.1 - (-88))
    assert_close(out.kl.double(), ref["kl"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_gradients_match_dense_autograd(divergence: str) -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=3)
    cfg = LossConfig(temperature=2.0, alpha=0.3, lambda_div=0.5, divergence=divergence, skew_beta=0.2)
    ref = reference_loss(hidden @ weight.T, targets, labels, mask, cfg)
    assert ref["floor"] > 0  # the entropy floor is active in some rows, so its gradient is checked too
    ref_grads = torch.autograd.grad(1.7 * ref["loss"], (hidden, weight))
    n_rows = int(mask.sum())
    for chunk_rows in (1, 3, 4, n_rows, 100):  # 3 and 4 do not divide the 10 supervised rows
        cfg.chunk_rows = chunk_rows
        out = distillation_loss(hidden, weight, targets, labels, mask, cfg)
        assert_close(out.loss, ref["loss"])
        grads = torch.autograd.grad(1.7 * out.loss, (hidden, weight))  # the backward scales by grad_output
        assert_close(grads, ref_grads)
    logits = (hidden @ weight.T).detach().requires_grad_()
    (logits_grad,) = torch.autograd.grad(distillation_loss_from_logits(logits, targets, labels, mask, cfg).loss, logits)
    (ref_logits_grad,) = torch.autograd.grad(reference_loss(logits, targets, labels, mask, cfg)["loss"], logits)
    assert_close(logits_grad, ref_logits_grad)


def test_the_sequence_term_is_an_advantage_weighted_ce_of_the_labels_in_every_chunking() -> None:
    """loss + w * sum_rows A * (-log_softmax(z)[label]) / rows, with its gradient, chunked or dense; the
    advantages are constants and rows without a label add nothing."""
    hidden, weight, targets, labels, mask = make_batch(seed=5)
    gen = torch.Generator().manual_seed(1)
    advantages = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    base = LossConfig(temperature=1.0, alpha=0.0, divergence="reverse")
    cfg = LossConfig(temperature=1.0, alpha=0.0, divergence="reverse", sequence_weight=0.7)
    logits = hidden @ weight.T
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    counted = mask.bool() & (labels >= 0)
    expected = reference_loss(logits, targets, labels, mask, base)["loss"] \
        + 0.7 * (advantages * nll)[counted].sum() / mask.sum()
    ref_grads = torch.autograd.grad(expected, (hidden, weight))
    for chunk_rows in (1, 3, 100):  # offsets into the advantages across chunk boundaries
        cfg.chunk_rows = chunk_rows
        out = distillation_loss(hidden, weight, targets, labels, mask, cfg, advantages=advantages)
        assert_close(out.loss, expected)
        assert_close(torch.autograd.grad(out.loss, (hidden, weight)), ref_grads)
    dense = distillation_loss_from_logits(logits, targets, labels, mask, cfg, advantages=advantages)
    assert_close(dense.loss, expected)
    # the term is off at weight 0 whatever the advantages, and the divergence is not changed by it
    plain = distillation_loss(hidden, weight, targets, labels, mask, base, advantages=advantages)
    assert_close(plain.loss, reference_loss(logits, targets, labels, mask, base)["loss"])
    assert_close(out.divergence, plain.divergence)


def test_the_sequence_term_needs_advantages_of_the_batch_shape() -> None:
    hidden, weight, targets, labels, mask = make_batch()
    cfg = LossConfig(alpha=0.0, temperature=2.0, sequence_weight=1.0)
    with pytest.raises(ValueError, match="needs float advantages"):
        distillation_loss(hidden, weight, targets, labels, mask, cfg)
    with pytest.raises(ValueError, match="needs float advantages"):
        distillation_loss(hidden, weight, targets, labels, mask, cfg, advantages=torch.zeros(2, 3))


# ------------------------------------------------------------------------------ -inf and masks


def padded_targets(vocab: int) -> TeacherTargets:
    """Sequences of 4 and 2 rows padded to 5; k == V with some entries padded (index 0, -inf) and -inf tails."""
    gen = torch.Generator().manual_seed(7)
    rows = torch.log_softmax(torch.randn(6, vocab, generator=gen), dim=-1).sort(dim=-1, descending=True)
    ids, lps = rows.indices.clone(), rows.values.clone()
    tail = torch.full((6,), NEG_INF)  # rows 0 and 5: every id listed, the tail is empty
    for row, n_valid in ((1, 3), (2, 2)):  # rows 1-2: a few ids, the rest padding, a real tail
        lps[row, n_valid:], ids[row, n_valid:] = NEG_INF, 0
        tail[row] = torch.logsumexp(rows.values[row, n_valid:], dim=0)
    lps[3, 2:], ids[3, 2:] = NEG_INF, 0  # row 3: the teacher puts all its mass on 2 ids, tail -inf
    lps[3, :2] = torch.log_softmax(lps[3, :2], dim=0)
    lps[4, 1:], ids[4, 1:], lps[4, 0] = NEG_INF, 0, 0.0  # row 4: one id holds all the mass
    return TeacherTargets.from_rows(ids, lps, tail, lengths=[4, 2], seq_len=5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_no_nan_with_padded_entries_and_neg_inf_tails(divergence: str, temperature: float) -> None:
    vocab, dim = 6, 4
    targets = padded_targets(vocab)
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 5, dim, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    cfg = LossConfig(temperature=temperature, lambda_div=0.3, divergence=divergence, chunk_rows=2)
    out = distillation_loss(hidden, weight, targets, labels, mask, cfg)
    out.loss.backward()
    parts = (out.loss, out.kl, out.divergence, out.diversity, out.entropy_student, out.entropy_teacher)
    for value in (*parts, hidden.grad, weight.grad):
        assert torch.isfinite(value).all(), value
    assert (out.kl >= 0) and (out.divergence >= 0)
    logits = (hidden @ weight.T).detach().requires_grad_()
    ref = reference_loss(logits.double(), targets, labels, mask, cfg)
    assert_close(out.loss.double(), ref["loss"], rtol=1e-5, atol=1e-5)
    from_logits = distillation_loss_from_logits(logits, targets, labels, mask, cfg)
    from_logits.loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_k_changes_nothing(divergence: str) -> None:
    """Extra (index 0, -inf) entries are not buckets: token 0's student mass stays in the tail."""
    hidden, weight, targets, labels, mask = make_batch(seed=4, k=3)
    assert (targets.indices != 0).all(-1).any()  # rows where token 0 is outside K and padding uses id 0
    pad = (*targets.indices.shape[:2], 4)
    wide = TeacherTargets(
        torch.cat([targets.indices, torch.zeros(pad, dtype=torch.long)], dim=-1),
        torch.cat([targets.logprobs, torch.full(pad, NEG_INF, dtype=torch.float64)], dim=-1),
        targets.tail_logprob,
    )
    cfg = LossConfig(temperature=2.0, lambda_div=0.5, divergence=divergence, chunk_rows=4)
    outs = [distillation_loss(hidden, weight, t, labels, mask, cfg) for t in (targets, wide)]
    assert_close(outs[0].loss, outs[1].loss)
    grads = [torch.autograd.grad(out.loss, (hidden, weight)) for out in outs]
    assert_close(grads[0], grads[1])


def test_teacher_buckets_are_renormalised() -> None:
    """fp16 log-probs leave the K+1 teacher buckets a little off one; a tail with no student ids to
    compare to (k == V, a rounding-error tail) is dropped. Both are renormalised away."""
    hidden, weight, targets, labels, mask = make_batch(seed=16, k=5)
    cfg = LossConfig(temperature=2.0, lambda_div=0.5, chunk_rows=4)
    off = TeacherTargets(targets.indices, targets.logprobs + 0.01, targets.tail_logprob + 0.01)
    expected = distillation_loss(hidden, weight, targets, labels, mask, cfg).loss
    assert_close(distillation_loss(hidden, weight, off, labels, mask, cfg).loss, expected)

    teacher_logits = torch.randn(2, 7, 37, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    full = targets_from_logits(teacher_logits, k=37, temperature=2.0)
    rounded = TeacherTargets(full.indices, full.logprobs, torch.full_like(full.tail_logprob, -20.0))
    out = distillation_loss(hidden, weight, rounded, labels, mask, cfg)
    assert_close(out.loss, distillation_loss(hidden, weight, full, labels, mask, cfg).loss)
    assert torch.isfinite(out.loss) and out.kl >= 0


def test_masked_rows_contribute_nothing() -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=5)
    cfg = LossConfig(temperature=2.0, alpha=0.4, lambda_div=0.2, chunk_rows=3)
    out = distillation_loss(hidden, weight, targets, labels, mask, cfg)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    assert (grads[0][~mask.bool()] == 0).all()

    masked = ~mask.bool()
    garbage = TeacherTargets(targets.indices.clone(), targets.logprobs.clone(), targets.tail_logprob.clone())
    garbage.indices[masked] = 10_000  # out of range, and NaN: never even looked at
    garbage.logprobs[masked] = math.nan
    garbage.tail_logprob[masked] = 5.0
    other_labels = labels.clone()
    other_labels[masked] = 3
    out2 = distillation_loss(hidden, weight, garbage, other_labels, mask, cfg)
    assert_close(out2.loss, out.loss)
    assert_close(torch.autograd.grad(out2.loss, (hidden, weight)), grads)


def test_no_supervised_rows_gives_zero_loss_and_zero_grads() -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=6)
    out = distillation_loss(hidden, weight, targets, labels, torch.zeros_like(mask), LossConfig())
    out.loss.backward()
    assert out.n_rows == 0 and out.loss.item() == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


# ------------------------------------------------------------------------------ formula


def test_alpha_mixing_and_temperature_squared() -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=9, temperature=3.0)
    logits = hidden @ weight.T
    outs = {
        alpha: distillation_loss(hidden, weight, targets, labels, mask, LossConfig(temperature=3.0, alpha=alpha))
        for alpha in (0.0, 0.25, 1.0)
    }
    assert_close(outs[0.0].loss.detach(), 9.0 * outs[0.0].kl)
    assert_close(outs[1.0].loss.detach(), outs[1.0].ce)
    assert_close(outs[0.25].loss.detach(), 0.25 * outs[1.0].ce + 0.75 * 9.0 * outs[0.0].kl)
    # CE at T = 1, a mean over supervised rows that have a label
    m = mask.bool()
    assert_close(outs[1.0].ce, F.cross_entropy(logits[m], labels[m], ignore_index=-100).detach())


def test_student_uses_the_teacher_temperature() -> None:
    teacher_logits = 3.0 * torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    targets = targets_from_logits(teacher_logits, k=6, temperature=3.0)
    labels, mask = torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6)
    cfg = LossConfig(temperature=3.0, alpha=0.0)
    same = distillation_loss_from_logits(teacher_logits, targets, labels, mask, cfg)
    assert same.kl.abs() < 1e-12 and same.top1_agreement == 1.0  # z / T on both sides: a perfect match
    pre_divided = distillation_loss_from_logits(teacher_logits / 3.0, targets, labels, mask, cfg)
    assert pre_divided.kl > 0.05  # dividing twice (or only one side) is not the teacher

    targets.temperature = 3.0
    with pytest.raises(ValueError, match="same T"):
        distillation_loss_from_logits(teacher_logits, targets, labels, mask, LossConfig(temperature=1.0))


def test_a_sharper_target_is_taken_only_when_asked_for() -> None:
    """target_temperature: the student at T = 1 against the teacher's p at T' = 0.5 on purpose (on-policy
    steps with a sharper teacher); the loss is the divergence to exactly that distribution."""
    teacher_logits = 2.0 * torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    sharp = targets_from_logits(teacher_logits, k=40, temperature=0.5)
    sharp.temperature = 0.5
    labels, mask = torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6)
    with pytest.raises(ValueError, match="same T"):
        distillation_loss_from_logits(teacher_logits, sharp, labels, mask, LossConfig(alpha=0.0))
    cfg = LossConfig(alpha=0.0, target_temperature=0.5, divergence="reverse")
    # a student whose logits are the teacher's / 0.5 matches the sharpened teacher exactly
    assert distillation_loss_from_logits(teacher_logits / 0.5, sharp, labels, mask, cfg).divergence.abs() < 1e-12
    out = distillation_loss_from_logits(teacher_logits, sharp, labels, mask, cfg)
    p_student = torch.softmax(teacher_logits, -1)
    dense = (p_student * (p_student.log() - torch.log_softmax(teacher_logits / 0.5, -1))).sum(-1).mean()
    assert_close(out.divergence, dense)


def test_entropy_floor_only_when_the_student_is_sharper() -> None:
    vocab, k = 20, 4
    p_teacher = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05], dtype=torch.float64)  # K then the tail
    targets = TeacherTargets(
        torch.arange(k).expand(2, 3, k), p_teacher[:k].log().expand(2, 3, k), p_teacher[k].log().expand(2, 3)
    )
    labels, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)

    def student(buckets: list[float]) -> torch.Tensor:
        """Logits whose softmax puts ``buckets[:k]`` on K and spreads ``buckets[k]`` over the other ids."""
        q = torch.tensor(buckets, dtype=torch.float64)
        row = torch.cat([q[:k].log(), (q[k] / (vocab - k)).log().expand(vocab - k)])
        return row.expand(2, 3, vocab)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log()).sum()

    cfg = LossConfig(alpha=0.0, lambda_div=0.7)
    flatter = distillation_loss_from_logits(student([0.2] * 5), targets, labels, mask, cfg)
    assert_close(flatter.entropy_student, torch.tensor(math.log(5), dtype=torch.float64))
    assert_close(flatter.entropy_teacher, entropy(p_teacher))
    assert flatter.diversity == 0.0
    sharp = [0.97, 0.01, 0.01, 0.005, 0.005]
    sharper = distillation_loss_from_logits(student(sharp), targets, labels, mask, cfg)
    expected = 0.7 * (entropy(p_teacher) - entropy(torch.tensor(sharp, dtype=torch.float64)))
    assert expected > 0.5
    assert_close(sharper.diversity, expected)
    without = distillation_loss_from_logits(student(sharp), targets, labels, mask, LossConfig(alpha=0.0))
    assert_close(sharper.loss - without.loss, expected)


# ------------------------------------------------------------------------------ memory, dtypes


def test_chunked_path_never_materialises_n_by_v_logits() -> None:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    n_rows, vocab, dim, k, chunk_rows = 2048, 32_000, 16, 8, 128
    gen = torch.Generator().manual_seed(12)
    idx = torch.randint(0, vocab, (2, n_rows // 2, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(2, n_rows // 2, k, generator=gen), dim=-1) - 1.0
    targets = TeacherTargets(idx, logprobs, torch.log1p(-logprobs.exp().sum(-1)))
    hidden = torch.randn(2, n_rows // 2, dim, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, dim, generator=gen)).requires_grad_()
    labels = torch.randint(0, vocab, (2, n_rows // 2), generator=gen)
    cfg = LossConfig(chunk_rows=chunk_rows, lambda_div=0.1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        distillation_loss(hidden, weight, targets, labels, torch.ones(2, n_rows // 2), cfg).loss.backward()

    full = n_rows * vocab * 4
    largest_op = max(event.cpu_memory_usage for event in prof.events())
    peak_live = 0  # the CPU allocator's running total at each allocation, forward and backward
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            peak_live = max(peak_live, event.extra_fields.total_allocated)
    assert largest_op <= chunk_rows * vocab * 4, (largest_op, full)
    assert 0 < peak_live < full / 3, (peak_live, full)
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_float32_and_bf16_autocast_agree_with_float64() -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=13, vocab=50, k=6)
    cfg = LossConfig(temperature=2.0, chunk_rows=4, lambda_div=0.1)
    exact = distillation_loss(hidden, weight, targets, labels, mask, cfg)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    out32 = distillation_loss(h32, w32, targets, labels, mask, cfg)
    out32.loss.backward()
    assert out32.loss.dtype == torch.float32 and h32.grad.dtype == torch.float32
    assert_close(out32.loss.double(), exact.loss, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = distillation_loss(h32, w32, targets, labels, mask, cfg)
    grads16 = torch.autograd.grad(out16.loss, (h32, w32))
    assert out16.loss.dtype == torch.float32 and grads16[1].dtype == torch.float32
    assert_close(out16.loss.double(), exact.loss, rtol=0.05, atol=0.05)


def test_no_grad_evaluation_returns_a_plain_loss() -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=14)
    with torch.no_grad():
        out = distillation_loss(hidden, weight, targets, labels, mask, LossConfig())
    assert not out.loss.requires_grad and set(out.metrics()) >= {"loss/total", "loss/kl", "loss/top1_agreement"}


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"target_temperature": 0.0}, "target_temperature"),
        ({"target_temperature": math.nan}, "target_temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"lambda_div": -0.1}, "lambda_div"),
        ({"divergence": "js"}, "divergence"),
        ({"skew_beta": 1.0}, "skew_beta"),
        ({"jsd_beta": 0.0}, "jsd_beta"),
        ({"jsd_beta": 1.0}, "jsd_beta"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": 2.5}, "chunk_rows"),
        ({"sequence_weight": -1.0}, "sequence_weight"),
        ({"sequence_weight": math.nan}, "sequence_weight"),
    ],
)
def test_loss_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


def test_loss_rejects_bad_inputs_with_clear_errors() -> None:
    hidden, weight, targets, labels, mask = make_batch(seed=15)
    cfg = LossConfig()
    bad_ids = TeacherTargets(targets.indices.clone(), targets.logprobs, targets.tail_logprob)
    bad_ids.indices[0, 3, 0] = weight.shape[0]
    with pytest.raises(ValueError, match="teacher ids must be in"):
        distillation_loss(hidden, weight, bad_ids, labels, mask, cfg)
    bad_labels = labels.clone()
    bad_labels[0, 3] = weight.shape[0]
    with pytest.raises(ValueError, match="labels must be <"):
        distillation_loss(hidden, weight, targets, bad_labels, mask, cfg)
    with pytest.raises(ValueError, match="loss_mask must cover"):
        distillation_loss(hidden, weight, targets, labels, mask[:, :3], cfg)
    with pytest.raises(ValueError, match="same d"):
        distillation_loss(hidden, weight[:, :3], targets, labels, mask, cfg)
    nan_lps = TeacherTargets(targets.indices, targets.logprobs.clone(), targets.tail_logprob)
    nan_lps.logprobs[0, 3, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        distillation_loss(hidden, weight, nan_lps, labels, mask, cfg)


def test_from_rows_pads_wire_rows_to_a_batch() -> None:
    ids = np.array([[3, 1], [2, 0], [5, 4], [1, 2]], dtype=np.uint16)
    lps = np.log(np.array([[0.6, 0.3], [0.5, 0.4], [0.9, 0.05], [0.7, 0.2]])).astype(np.float16)
    tail = np.log(np.array([0.1, 0.1, 0.05, 0.1])).astype(np.float32)
    ids.setflags(write=False)  # as decoded from a wire buffer
    targets = TeacherTargets.from_rows(ids, lps, tail, lengths=[3, 1], seq_len=4, temperature=1.0)
    assert targets.indices.shape == (2, 4, 2) and targets.indices.dtype == torch.int64
    assert targets.logprobs.dtype == torch.float32 and targets.tail_logprob.shape == (2, 4)
    assert targets.indices[1, 0].tolist() == [1, 2] and targets.indices[0, 2].tolist() == [5, 4]
    assert (targets.indices[0, 3] == 0).all() and torch.isneginf(targets.logprobs[1, 1:]).all()
    assert torch.isneginf(targets.tail_logprob[1, 1:]).all() and targets.temperature == 1.0
    assert targets.to("cpu").indices.equal(targets.indices)

    with pytest.raises(ValueError, match="sum to the number of rows"):
        TeacherTargets.from_rows(ids, lps, tail, lengths=[2, 1])
    with pytest.raises(ValueError, match="shorter than the longest"):
        TeacherTargets.from_rows(ids, lps, tail, lengths=[3, 1], seq_len=2)
    with pytest.raises(ValueError, match="tail_logprob must be"):
        TeacherTargets(targets.indices, targets.logprobs, targets.tail_logprob[:, :2])
    with pytest.raises(TypeError, match="int64 or int32"):
        TeacherTargets(targets.indices.float(), targets.logprobs, targets.tail_logprob)
