"""Distillation losses over the teacher's top-k plus a tail bucket (DESIGN.md section 7).

For a supervised row with student logits ``z [V]``, temperature ``T`` and teacher targets
``(K, l_t, l_t_tail)``:

- buckets: each id in ``K`` whose teacher log-prob is finite, plus the tail (every other id).
  Entries with log-prob ``-inf`` (padding, zero teacher mass) are *not* buckets: their student mass
  belongs to the tail, so padding ``k`` never changes the loss, whatever index the padding uses.
- student ``l_s = log_softmax(z / T)`` on ``K``; student tail ``logsumexp(z/T over V \\ K) - logsumexp(z/T)``,
  a masked logsumexp (``log1p(-sum p_s)`` cancels catastrophically when ``K`` holds nearly all the mass).
- ``KL = sum_b p_t[b] * (l_t[b] - l_s[b])`` over the buckets; ``CE = -log_softmax(z)[y]`` at ``T = 1``.
- ``loss = alpha * CE + (1 - alpha) * T^2 * D + lambda_div * relu(H_t - H_s) + w_seq * A * CE``, each a
  mean over supervised rows; the last is the on-policy sequence term (a policy gradient: ``A`` a given
  per-row advantage of the row's label, the token the student wrote there, ``w_seq`` its weight). ``D``
  is the forward KL, the reverse KL, the skew KL ``KL(p_t || b p_t + (1-b) p_s)`` or the generalised
  Jensen-Shannon divergence ``b KL(p_t || M) + (1-b) KL(p_s || M)``, ``M = b p_t + (1-b) p_s`` (GKD's
  JSD(beta), bounded and symmetric at b = 0.5; the on-policy mode's choice next to the reverse KL).

The teacher buckets are renormalised to sum to one (fp16 log-probs and a dropped tail leave them a
little off), so KL >= 0 and is zero exactly when the student matches.

Memory: only supervised rows go through the LM head, ``chunk_rows`` of them at a time, and the
gradients w.r.t. hidden states and head weight are computed chunk by chunk *during the forward* (as
Liger's fused linear cross-entropy does), so no ``[N, V]`` logits or logit gradients ever exist and
the head matmul is not recomputed in the backward. Per chunk the loss needs only a few reductions of
the logits (:class:`_LogitStats`); autograd runs on the small ``[c, k+1]`` bucket graph from those,
and ``dL/dz`` follows by the chain rule (the derivative of a logsumexp is a softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from student_trainer.teachers.targets import TeacherTargets

DIVERGENCES = ("forward", "reverse", "skew", "jsd")
# Reverse KL is infinite where the student has mass and the teacher has none (a -inf tail). A floor on
# the teacher's bucket log-prob keeps it finite while still pushing that student mass down.
REVERSE_KL_LOGPROB_FLOOR = math.log(1e-10)
_LEAVES = ("log_norm", "picked", "rest", "log_norm_1", "label_logit")  # differentiable _LogitStats fields
_STATS = ("ce", "kl", "divergence", "diversity", "entropy_student", "entropy_teacher", "top1_agreement")


@dataclass
class LossConfig:
    """Distillation loss settings.

    Attributes:
        temperature: ``T > 0``; must equal the temperature the teacher targets were computed at.
        target_temperature: set only to train on targets of another temperature on purpose (on-policy
            steps with a sharper teacher: the student at ``T``, the teacher at ``target_temperature``);
            None: the targets must be at ``T``.
        alpha: weight of the hard-label CE in ``[0, 1]``; the divergence gets ``(1 - alpha) * T^2``.
        lambda_div: weight of the entropy floor ``relu(H_t - H_s)`` on the K+1 buckets (0 turns it off).
        divergence: ``"forward"`` KL(p_t || p_s), ``"reverse"`` KL(p_s || p_t), ``"skew"``
            KL(p_t || skew_beta * p_t + (1 - skew_beta) * p_s), or ``"jsd"``
            jsd_beta * KL(p_t || M) + (1 - jsd_beta) * KL(p_s || M) with M = jsd_beta * p_t + (1 - jsd_beta) * p_s.
        skew_beta: teacher share of the skew KL's mixture, in ``[0, 1)`` (0 is the forward KL).
        jsd_beta: teacher share of the JSD's mixture (and weight of its teacher term), in ``(0, 1)``.
        sequence_weight: weight ``w_seq >= 0`` of the advantage-weighted CE ``A * CE`` (the on-policy
            sequence term; needs ``advantages``; 0: off).
        chunk_rows: supervised rows per LM-head chunk; the chunk's fp32 work needs about
            ``5 * chunk_rows * V * 4`` bytes (1.3 GB for 512 rows of a 128K vocab).
    """

    temperature: float = 1.0
    target_temperature: float | None = None
    alpha: float = 0.5
    lambda_div: float = 0.0
    divergence: str = "forward"
    skew_beta: float = 0.1
    jsd_beta: float = 0.5
    sequence_weight: float = 0.0
    chunk_rows: int = 512

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"loss temperature must be a finite number > 0, found {self.temperature}")
        if self.target_temperature is not None and not (math.isfinite(self.target_temperature)
                                                        and self.target_temperature > 0):
            raise ValueError(f"loss target_temperature must be a finite number > 0 or None, found {self.target_temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss alpha must be in [0, 1] (1 = CE only, 0 = divergence only), found {self.alpha}")
        if not (math.isfinite(self.lambda_div) and self.lambda_div >= 0):
            raise ValueError(
                f"loss lambda_div must be a finite number >= 0 (0 turns the entropy floor off), found {self.lambda_div}"
            )
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"loss divergence must be one of {DIVERGENCES}, found {self.divergence!r}")
        if not 0.0 <= self.skew_beta < 1.0:
            raise ValueError(f"loss skew_beta must be in [0, 1) (1 makes the skew KL zero), found {self.skew_beta}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"loss jsd_beta must be in (0, 1) (0 and 1 make the JSD zero), found {self.jsd_beta}")
        if not (math.isfinite(self.sequence_weight) and self.sequence_weight >= 0):
            raise ValueError(f"loss sequence_weight must be a finite number >= 0 (0: off), found {self.sequence_weight}")
        if isinstance(self.chunk_rows, bool) or not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"loss chunk_rows must be an int >= 1, found {self.chunk_rows!r}")


@dataclass
class LossOutput:
    """The total loss (scalar, with grad) and detached per-row means over supervised rows for logging.

    ``ce`` is a mean over rows with a label; the others over all supervised rows. ``diversity`` is the
    entropy-floor term as added to the loss (``lambda_div * relu(H_t - H_s)``); entropies are over
    the K+1 buckets; ``kl`` is always the forward KL, ``divergence`` the one the loss uses.
    """

    loss: Tensor
    ce: Tensor
    kl: Tensor
    divergence: Tensor
    diversity: Tensor
    entropy_student: Tensor
    entropy_teacher: Tensor
    top1_agreement: Tensor
    n_rows: int
    n_label_rows: int

    def metrics(self, prefix: str = "loss/") -> dict[str, float]:
        """Python floats for a metrics logger (one device sync)."""
        values = torch.stack([self.loss.detach(), *(getattr(self, name) for name in _STATS)]).tolist()
        out = {f"{prefix}{name}": value for name, value in zip(("total", *_STATS), values)}
        out[f"{prefix}rows"] = float(self.n_rows)
        out[f"{prefix}label_rows"] = float(self.n_label_rows)
        return out


def distillation_loss(
    hidden: Tensor,
    head_weight: Tensor,
    targets: TeacherTargets,
    labels: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    row_totals: tuple[float, float] | None = None,
    advantages: Tensor | None = None,
) -> LossOutput:
    """Distillation loss from final hidden states and a (tied) output head, chunked over rows.

    Args:
        hidden: ``[B, L, d]`` student final hidden states (after the last norm).
        head_weight: ``[V, d]`` output head; ``logits = hidden @ head_weight.T``.
        targets: teacher targets ``[B, L, k]``; row ``t`` is the distribution of the token after ``x_t``.
        labels: ``[B, L]`` next-token ids (``labels[:, t] = input_ids[:, t + 1]``); negative (e.g. -100
            at the last position) = no CE for that row, which may still get the divergence.
        loss_mask: ``[B, L]`` 1 where row ``t`` is supervised, 0 for padding and prompt rows.
        config: loss settings.
        row_totals: ``(supervised rows, rows with a label)`` to divide the loss sums by; None: this
            batch's. Gradient accumulation and data parallelism pass the whole optimiser step's (per
            rank), so that every supervised row weighs the same however the rows fall into micro-batches.
        advantages: ``[B, L]`` float, the sequence term's advantage of each row's label (constants, no
            gradient); needed when ``config.sequence_weight > 0``, ignored otherwise.

    Returns:
        :class:`LossOutput`. Only supervised rows go through the head. Under autocast the head matmul
        runs in the autocast dtype (as ``nn.Linear`` would) and the loss math in fp32.
    """
    if hidden.dim() != 3 or head_weight.dim() != 2 or hidden.shape[-1] != head_weight.shape[-1]:
        raise ValueError(
            f"expected hidden [B, L, d] and head_weight [V, d] with the same d, "
            f"found {tuple(hidden.shape)} and {tuple(head_weight.shape)}"
        )
    vocab = head_weight.shape[0]
    mask, rows = _supervised_rows(targets, labels, loss_mask, hidden.shape[:2], hidden.device, config, vocab,
                                  row_totals, advantages)
    grad_on = torch.is_grad_enabled()
    loss, sums = _ChunkedHeadLoss.apply(
        hidden[mask], head_weight, rows, config,
        grad_on and hidden.requires_grad, grad_on and head_weight.requires_grad,
    )  # fmt: skip
    return _output(loss, sums, rows)


def distillation_loss_from_logits(
    logits: Tensor,
    targets: TeacherTargets,
    labels: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    advantages: Tensor | None = None,
) -> LossOutput:
    """The same loss from full logits ``[B, L, V]`` (small vocabularies and tests; plain autograd).

    Args and Returns as :func:`distillation_loss`, with ``logits`` in place of ``hidden`` and the head.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B, L, V], found shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    mask, rows = _supervised_rows(targets, labels, loss_mask, logits.shape[:2], logits.device, config, vocab,
                                  advantages=advantages)
    z = logits[mask].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    terms = _row_terms(_logit_stats(z, rows, config)[0], rows, config)
    return _output(_weighted_sum(terms, rows, config), _stat_sums(terms, config), rows)


# ---------------------------------------------------------------------------------------- rows


class _Rows(NamedTuple):
    """Targets of the ``N`` supervised rows, flattened."""

    indices: Tensor  # [N, k] int64
    logprobs: Tensor  # [N, k]
    tail: Tensor  # [N]
    labels: Tensor  # [N] int64, negative = no CE
    n_rows: int
    n_label_rows: int
    # what the loss sums are divided by: these rows' counts, or a whole optimiser step's (accumulation, DDP)
    norm_rows: float
    norm_label_rows: float
    advantages: Tensor | None = None  # [N] the sequence term's, None when it is off


def _supervised_rows(
    targets: TeacherTargets,
    labels: Tensor,
    loss_mask: Tensor,
    batch_shape: torch.Size,
    device: torch.device,
    config: LossConfig,
    vocab_size: int,
    row_totals: tuple[float, float] | None = None,
    advantages: Tensor | None = None,
) -> tuple[Tensor, _Rows]:
    """Check shapes and values; return the ``[B, L]`` bool mask and the supervised rows' targets."""
    expected = tuple(batch_shape)
    shapes = {"targets": targets.indices.shape[:2], "labels": labels.shape, "loss_mask": loss_mask.shape}
    for name, shape in shapes.items():
        if tuple(shape) != expected:
            raise ValueError(f"{name} must cover the student's [B, L] = {expected}, found {tuple(shape)}")
    for name, tensor in (("targets", targets.indices), ("labels", labels), ("loss_mask", loss_mask)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the student is on {device}; move it with .to()")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must be integer token ids, found {labels.dtype}")
    expected_temperature = config.temperature if config.target_temperature is None else config.target_temperature
    if targets.temperature is not None and abs(targets.temperature - expected_temperature) > 1e-6:
        raise ValueError(
            f"the teacher targets were computed at T={targets.temperature} but the loss expects targets at "
            f"T={expected_temperature}; set the loss temperature to the teacher's (both sides must use the same T)"
        )
    if config.sequence_weight > 0:
        if advantages is None or tuple(advantages.shape) != expected or not advantages.dtype.is_floating_point:
            found = None if advantages is None else f"{tuple(advantages.shape)} {advantages.dtype}"
            raise ValueError(f"loss sequence_weight={config.sequence_weight} needs float advantages [B, L] = "
                             f"{expected}, found {found}; pass the on-policy step's advantages or set it to 0")
    mask = loss_mask.bool()
    row_advantages = advantages[mask].float() if config.sequence_weight > 0 else None
    indices, logprobs, tail = targets.select(mask, vocab_size)
    labels = labels[mask].long()
    label_max = labels.max() if labels.numel() else labels.new_tensor(-1)
    label_max, n_label_rows = torch.stack([label_max, (labels >= 0).sum()]).tolist()  # one device sync
    if label_max >= vocab_size:
        raise ValueError(f"labels must be < the student's vocab {vocab_size} (or negative: no CE), found {label_max}")
    n_rows, n_label_rows = labels.shape[0], int(n_label_rows)
    norm_rows, norm_label_rows = row_totals if row_totals is not None else (n_rows, n_label_rows)
    return mask, _Rows(indices, logprobs, tail, labels, n_rows, n_label_rows, norm_rows, norm_label_rows,
                       row_advantages)


# ---------------------------------------------------------------------------------------- math


class _RowTerms(NamedTuple):
    """Per-row loss parts for ``c`` rows, each ``[c]``."""

    ce: Tensor  # 0 where the row has no label
    kl: Tensor  # forward KL over the K+1 buckets
    divergence: Tensor  # the divergence the loss uses
    floor: Tensor  # relu(H_t - H_s)
    entropy_student: Tensor
    entropy_teacher: Tensor
    agree: Tensor  # student argmax == teacher top-1


class _LogitStats(NamedTuple):
    """What the loss needs from student logits ``z [c, V]``: a few reductions, no ``[c, V]`` tensor."""

    log_norm: Tensor  # [c] logsumexp(z / T)
    picked: Tensor  # [c, k] z / T at the teacher ids
    rest: Tensor  # [c] logsumexp(z / T) over ids outside K (a finite stand-in where there is no tail)
    log_norm_1: Tensor  # [c] logsumexp(z), for the CE at T = 1
    label_logit: Tensor  # [c] z at the label (at id 0 where there is none)
    has_tail: Tensor  # [c] bool: some id lies outside K
    argmax: Tensor  # [c] student's top-1 id


def _k_mask(rows: _Rows, start: int, c: int, vocab: int) -> tuple[Tensor, Tensor]:
    """``[c, V]`` bool mask of ids in K (valid entries only) and ``[c]`` bool ``has_tail``.

    Invalid entries go to a sentinel column V that is dropped, so a padded index (0) never masks a
    real token; every write is the constant True, so duplicates are order-free.
    """
    valid = rows.logprobs[start : start + c] > -math.inf
    in_k = torch.zeros(c, vocab + 1, dtype=torch.bool, device=valid.device)
    in_k.scatter_(1, torch.where(valid, rows.indices[start : start + c], vocab), True)
    in_k = in_k[:, :vocab]
    has_tail = ~in_k.all(dim=-1)
    # Rows without a tail mask nothing (a finite, unused logsumexp) rather than taking logsumexp over
    # all -inf, whose backward is NaN even when multiplied by zero.
    return in_k & has_tail[:, None], has_tail


def _logit_stats(z: Tensor, rows: _Rows, config: LossConfig, start: int = 0) -> tuple[_LogitStats, Tensor, Tensor]:
    """Reductions of ``z [c, V]`` for rows ``start : start + c``; differentiable w.r.t. ``z``.

    Returns the stats, ``u = z / T`` and the ``[c, V]`` mask of K (for :func:`_grad_logits`).
    """
    c, vocab = z.shape
    idx, labels = rows.indices[start : start + c], rows.labels[start : start + c]
    in_k, has_tail = _k_mask(rows, start, c, vocab)
    u = z / config.temperature if config.temperature != 1.0 else z
    log_norm = torch.logsumexp(u, dim=-1)
    log_norm_1 = log_norm if config.temperature == 1.0 else torch.logsumexp(z, dim=-1)
    stats = _LogitStats(
        log_norm=log_norm,
        picked=u.gather(1, idx),
        rest=torch.logsumexp(u.masked_fill(in_k, -math.inf), dim=-1),  # exact, no cancellation
        log_norm_1=log_norm_1,
        label_logit=z.gather(1, labels.clamp_min(0)[:, None]).squeeze(1),
        has_tail=has_tail,
        argmax=u.detach().argmax(dim=-1),
    )
    return stats, u, in_k


def _row_terms(stats: _LogitStats, rows: _Rows, config: LossConfig, start: int = 0) -> _RowTerms:
    """Loss parts from logit stats of rows ``start : start + c``; only ``[c, k+1]`` tensors here."""
    c = stats.log_norm.shape[0]
    dtype = stats.log_norm.dtype
    idx, labels = rows.indices[start : start + c], rows.labels[start : start + c]
    lt_k = rows.logprobs[start : start + c].to(dtype)
    lt_tail = rows.tail[start : start + c].to(dtype)
    valid = lt_k > -math.inf  # [c, k] entries that are buckets
    neg_inf = torch.tensor(-math.inf, dtype=dtype, device=lt_k.device)

    # K+1 buckets. Teacher buckets need teacher mass (and, for the tail, a student tail to compare to).
    ok_s = torch.cat([valid, stats.has_tail[:, None]], dim=1)  # [c, k+1] student buckets
    ok_t = ok_s & torch.cat([valid, (lt_tail > -math.inf)[:, None]], dim=1)  # teacher buckets, a subset
    ls_k = stats.picked - stats.log_norm[:, None]
    ls_tail = stats.rest - stats.log_norm
    ls = torch.where(ok_s, torch.cat([ls_k, ls_tail[:, None]], dim=1), 0.0)  # 0: a safe stand-in
    lt = torch.cat([lt_k, lt_tail[:, None]], dim=1)
    lt_norm = torch.logsumexp(lt.masked_fill(~ok_t, -math.inf), dim=-1, keepdim=True)
    lt = torch.where(ok_t, lt - torch.nan_to_num(lt_norm, neginf=0.0), 0.0)
    p_t = torch.where(ok_t, lt.exp(), 0.0)
    p_s = torch.where(ok_s, ls.exp(), 0.0)

    kl = (p_t * (lt - ls)).sum(-1)
    entropy_t = -(p_t * lt).sum(-1)
    entropy_s = -(p_s * ls).sum(-1)
    if config.divergence == "forward":
        divergence = kl
    elif config.divergence == "reverse":
        lt_floor = torch.where(ok_t, lt, REVERSE_KL_LOGPROB_FLOOR).clamp_min(REVERSE_KL_LOGPROB_FLOOR)
        divergence = (p_s * (ls - lt_floor)).sum(-1)
    elif config.divergence == "skew":  # log(b p_t + (1 - b) p_s) is finite wherever p_t > 0
        beta = config.skew_beta
        log_teacher = torch.where(ok_t, lt, neg_inf) + (math.log(beta) if beta > 0 else -math.inf)
        log_mix = torch.logaddexp(log_teacher, ls + math.log1p(-beta))
        divergence = (p_t * (lt - torch.where(ok_t, log_mix, 0.0))).sum(-1)
    else:  # jsd: the mixture is > 0 on every student bucket, so both KLs are finite without a floor
        beta = config.jsd_beta
        log_mix = torch.logaddexp(torch.where(ok_t, lt, neg_inf) + math.log(beta), ls + math.log1p(-beta))
        log_mix = torch.where(ok_s, log_mix, 0.0)
        to_teacher = (p_t * (lt - log_mix)).sum(-1)
        to_student = (p_s * (ls - log_mix)).sum(-1)
        divergence = beta * to_teacher + (1.0 - beta) * to_student

    has_label = labels >= 0
    ce = torch.where(has_label, stats.log_norm_1 - stats.label_logit, 0.0)
    agree = (stats.argmax == idx[:, 0]) & valid[:, 0]
    return _RowTerms(ce, kl, divergence, torch.relu(entropy_t - entropy_s), entropy_s, entropy_t, agree)


def _grad_logits(
    z: Tensor,
    u: Tensor,
    in_k: Tensor,
    stats: _LogitStats,
    grads: dict[str, Tensor],
    rows: _Rows,
    config: LossConfig,
    start: int,
) -> Tensor:
    """``dL/dz [c, V]`` by the chain rule through the stats (the derivative of logsumexp is softmax).

    ``grads`` maps the differentiable stats (``_LEAVES``) to ``dL/dstat``.
    """
    g_norm, g_picked, g_rest, g_norm_1, g_label = (grads[name] for name in _LEAVES)
    c, temperature = z.shape[0], config.temperature
    if temperature == 1.0:  # log_norm and log_norm_1 are the same logsumexp
        grad_u = torch.exp(u - stats.log_norm[:, None]).mul_((g_norm + g_norm_1)[:, None])
    else:
        grad_u = torch.exp(u - stats.log_norm[:, None]).mul_(g_norm[:, None])
    grad_u += torch.exp(u - stats.rest[:, None]).masked_fill_(in_k, 0.0).mul_(g_rest[:, None])
    grad_u.scatter_add_(1, rows.indices[start : start + c], g_picked)
    grad_z = grad_u.div_(temperature) if temperature != 1.0 else grad_u
    if temperature != 1.0:
        grad_z += torch.exp(z - stats.log_norm_1[:, None]).mul_(g_norm_1[:, None])
    grad_z.scatter_add_(1, rows.labels[start : start + c].clamp_min(0)[:, None], g_label[:, None])
    return grad_z


def _weighted_sum(terms: _RowTerms, rows: _Rows, config: LossConfig, start: int = 0) -> Tensor:
    """These rows' share of the total loss: sums divided by the whole batch's row counts."""
    t2 = config.temperature**2
    soft = (1.0 - config.alpha) * t2 * terms.divergence + config.lambda_div * terms.floor
    if rows.advantages is not None:  # the policy gradient of the sequence term: A * (-log p_s(label))
        c = terms.ce.shape[0]
        soft = soft + config.sequence_weight * rows.advantages[start : start + c].to(terms.ce.dtype) * terms.ce
    return soft.sum() / max(rows.norm_rows, 1) + config.alpha * terms.ce.sum() / max(rows.norm_label_rows, 1)


def _stat_sums(terms: _RowTerms, config: LossConfig) -> Tensor:
    """``[7]`` detached sums of the logged parts, in the order of ``_STATS``."""
    parts = terms._replace(floor=config.lambda_div * terms.floor)  # logged as it enters the loss
    return torch.stack([part.detach().sum().to(terms.kl.dtype) for part in parts])


def _output(loss: Tensor, sums: Tensor, rows: _Rows) -> LossOutput:
    """Turn sums into means over supervised rows (CE over rows with a label)."""
    n, n_ce = max(rows.n_rows, 1), max(rows.n_label_rows, 1)
    ce, kl, divergence, floor, entropy_s, entropy_t, agree = sums.detach().unbind()
    return LossOutput(
        loss=loss, ce=ce / n_ce, kl=kl / n, divergence=divergence / n, diversity=floor / n,
        entropy_student=entropy_s / n, entropy_teacher=entropy_t / n, top1_agreement=agree / n,
        n_rows=rows.n_rows, n_label_rows=rows.n_label_rows,
    )  # fmt: skip


# ------------------------------------------------------------------------------- chunked head


class _ChunkedHeadLoss(torch.autograd.Function):
    """Head + loss over row chunks, with the gradients computed chunk by chunk in the forward.

    Per chunk: ``z = h_c @ W.T`` (``[c, V]``), its stats, the loss parts and ``dL/dstats`` by autograd,
    ``dL/dz`` by :func:`_grad_logits`, then ``dL/dh_c = dL/dz @ W`` and ``dL/dW += dL/dz.T @ h_c``; the
    chunk's ``[c, V]`` tensors are freed before the next. The backward only scales the saved ``[N, d]`` and
    ``[V, d]`` gradients by the incoming gradient (e.g. a gradient-accumulation factor).
    """

    @staticmethod
    def forward(ctx, hidden, weight, rows, config, need_grad_hidden, need_grad_weight):  # type: ignore[override]
        # Inside Function.forward grad mode is off, but enable_grad below would track the inputs.
        hidden, weight = hidden.detach(), weight.detach()
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            mm_dtype = torch.get_autocast_dtype(device_type)
        else:
            mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        math_dtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
        need_grad = need_grad_hidden or need_grad_weight
        w_mm = weight.to(mm_dtype)
        grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
        # fp32 accumulator for dL/dW even when the matmuls run in bf16 under autocast
        grad_weight = torch.zeros(weight.shape, dtype=math_dtype, device=weight.device) if need_grad_weight else None
        loss = torch.zeros((), dtype=math_dtype, device=hidden.device)
        sums = torch.zeros(len(_STATS), dtype=math_dtype, device=hidden.device)

        with torch.autocast(device_type, enabled=False):  # dtypes are explicit here
            for start in range(0, hidden.shape[0], config.chunk_rows):
                h_c = hidden[start : start + config.chunk_rows].to(mm_dtype)
                z = (h_c @ w_mm.T).to(math_dtype)  # [c, V], the only full-vocab tensors live here
                stats, u, in_k = _logit_stats(z, rows, config, start)
                # Autograd only on the small bucket graph: the stats become leaves.
                leaves = {name: getattr(stats, name).detach().requires_grad_(need_grad) for name in _LEAVES}
                with torch.enable_grad():
                    terms = _row_terms(stats._replace(**leaves), rows, config, start)
                    chunk_loss = _weighted_sum(terms, rows, config, start)
                loss += chunk_loss.detach()
                sums += _stat_sums(terms, config)
                if need_grad:
                    grads = torch.autograd.grad(chunk_loss, list(leaves.values()), materialize_grads=True)
                    grads = dict(zip(leaves, grads))
                    grad_z = _grad_logits(z, u, in_k, stats, grads, rows, config, start).to(mm_dtype)
                    if need_grad_hidden:
                        grad_hidden[start : start + h_c.shape[0]] = grad_z @ w_mm
                    if need_grad_weight:
                        grad_weight += grad_z.T @ h_c
                    del grad_z
                del z, u, in_k  # free this chunk's [c, V] tensors before the next one
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None
