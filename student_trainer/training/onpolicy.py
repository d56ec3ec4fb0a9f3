"""On-policy distillation: the student writes continuations of the batch's prompts, the teacher scores
them, and the loss is a divergence on the student's own text (README: On-policy distillation).

Off-policy KD trains the student on text the teacher's data holds; at generation time it conditions on
its own tokens and drifts (exposure bias). On an on-policy step (``onpolicy_fraction`` of the KD steps):

1. **Prompts**: each row's tokens up to its first target token (a chat row: the turns before the first
   assistant answer, header included); a row that is a target from its first token (plain text): its
   first half. At most ``max_seq_length - onpolicy_max_new_tokens`` tokens, the last ones kept.
2. **Sampling** without gradients through the student's batched recurrent state (``prefill`` with
   one position per row, then ``step``), at ``onpolicy_temperature`` and ``onpolicy_top_p``, until a stop id or
   ``onpolicy_max_new_tokens``; the sampler's RNG is saved in every checkpoint.
3. **Scoring** (wire v1.1): one teacher request per micro-batch gives the teacher's top k (+ tail) at
   every written position and, via ``score_ids``, its exact log-probs of the student's own top
   ``onpolicy_student_topk`` ids and of the sampled token. Requests run on a background thread, so
   micro-batch j is scored while j+1 is sampled and j-1 trains.
4. **Loss** on the written positions only: the reverse KL (or JSD(beta)) over the union support: each
   id of (teacher top k) U (student top k) U (sampled token) is its own bucket, and every other id is
   one rest bucket on each side (the student's by an exact masked logsumexp, the teacher's as one
   minus the union's mass). This is the divergence of the two distributions coarsened to that
   partition: exact, and equal to the full one when the rest holds no mass.
5. **Sequence term** (``onpolicy_sequence_weight`` > 0): the token-level divergence judges each written
   token by the next-token distributions at its own position only, blind to where the token leads (into
   text the teacher is unsure of, say). The sequence term adds the policy gradient of the rewards of the
   tokens *after* each written token (MiniLLM's long-term part): reward ``r_j = log p_t(y_j) - log p_s(y_j)``
   (``reverse_kl``, the sequence-level reverse KL) or ``log p_t(y_j)`` (``teacher_logprob``), both from
   the scoring and the sampling (no extra forward), of the sampled token (``sampled``) or in expectation
   over the student's sampling distribution at ``j`` restricted to its scored top k (``expected``, the
   default: the same expected return without the noise of the later draws, which the gradient for token
   ``t`` does not need); return ``R_t`` = the discounted mean of ``r_j`` over the row's written ``j > t``
   (``onpolicy_sequence_discount``); advantage ``A_t`` = ``R_t`` whitened over the micro-batch's written
   tokens (0 for a row's last one, which has no future); loss ``w * A_t * (-log p_s(y_t))`` at temperature
   1, the score function of the student (exact for samples at temperature 1 and top-p 1, a biased but
   lower-variance estimate otherwise).
"""

from __future__ import annotations

import base64
import dataclasses
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from student_trainer.training.batches import Batch
from student_trainer.training.losses import REVERSE_KL_LOGPROB_FLOOR, LossConfig
from student_trainer.model.student import RetNetStudent, sample_next_token
from student_trainer.teachers.targets import PAD_INDEX, PAD_LOGPROB, TeacherScores, TeacherTargets
from student_trainer.teachers.base import TeacherSource


@dataclass
class OnPolicySettings:
    """The ``onpolicy_*`` keys of a run (see :class:`student_trainer.training.config.TrainConfig`)."""

    fraction: float
    max_new_tokens: int
    temperature: float
    student_topk: int
    divergence: str  # reverse_kl | jsd
    jsd_beta: float
    stop_ids: list[int]
    max_seq_length: int
    top_p: float = 1.0  # nucleus filtering of the sampling (1: none)
    teacher_temperature: float | None = None  # the teacher's when it scores (None: the loss's temperature)
    sequence_weight: float = 0.0  # weight of the sequence term (0: off)
    sequence_reward: str = "reverse_kl"  # reverse_kl | teacher_logprob
    sequence_discount: float = 0.9  # of the future rewards in a written token's return, in [0, 1]
    sequence_return: str = "expected"  # expected | sampled: each later position's reward, see the docstring
    reward_temperature: float = 1.0  # the student's log-probs of its tokens in the reward (the teacher's T)

    @property
    def scored_ids(self) -> int:
        """Ids the teacher scores at each written position: the student's top k and the sampled token."""
        return self.student_topk + 1

    def is_onpolicy(self, kd_step: int) -> bool:
        """Whether KD step ``kd_step`` (0 = the first after stage 1) is on-policy: spread evenly, e.g.
        0.25 -> steps 3, 7, 11, ...; deterministic, so a resumed run keeps the schedule."""
        return kd_step >= 0 and math.floor((kd_step + 1) * self.fraction) > math.floor(kd_step * self.fraction)

    def loss_config(self, base: LossConfig) -> LossConfig:
        """The off-policy loss's settings with the on-policy divergence and no hard-label CE (the
        student's own samples are not labels)."""
        divergence = "reverse" if self.divergence == "reverse_kl" else "jsd"
        return dataclasses.replace(base, alpha=0.0, divergence=divergence, jsd_beta=self.jsd_beta,
                                   target_temperature=self.teacher_temperature, sequence_weight=self.sequence_weight)


@dataclass
class Rollout:
    """A micro-batch of the student's text: ``batch`` (prompt + written tokens but the last, which is only
    a target; ``row_mask`` on the written positions, the written tokens as their labels) and ``score_ids
    [B, L, m]`` (the student's top k and the sampled token at each written position, 0 elsewhere). With
    the sequence term on, also ``student_logprobs [B, L, m]`` (the student's log-probs of those ids at
    ``reward_temperature``) and ``policy [B, L, m - 1]`` (its sampling distribution over its top k:
    ``onpolicy_temperature``, renormalised over the k); zeros elsewhere and otherwise."""

    batch: Batch
    score_ids: torch.Tensor
    student_logprobs: torch.Tensor
    policy: torch.Tensor
    prompt_tokens: int
    written_tokens: int


def prompts_of(batch: Batch, max_prompt_tokens: int) -> list[torch.Tensor]:
    """Each row's prompt ``[P_i]``: its tokens before the first target token, or (no such prefix) the
    first half of the row; the last ``max_prompt_tokens`` of it."""
    prompts = []
    for row, length in enumerate(batch.lengths.tolist()):
        supervised = batch.row_mask[row, :length].nonzero()
        first_target = int(supervised[0, 0]) + 1 if len(supervised) else length
        end = first_target if first_target > 1 else max(1, length // 2)
        prompts.append(batch.input_ids[row, max(0, end - max_prompt_tokens):end])
    return prompts


@torch.no_grad()
def sample_rollout(student: RetNetStudent, batch: Batch, settings: OnPolicySettings, generator: torch.Generator,
                   vocab_limit: int, device: torch.device, autocast: Any) -> Rollout:
    """The student's continuations of ``batch``'s prompts, decoded together through one recurrent state.

    ``vocab_limit``: ids the teacher has (a student with a padded head never writes or offers the rest).
    """
    prompts = prompts_of(batch, settings.max_seq_length - settings.max_new_tokens)
    rows, width = len(prompts), max(len(p) for p in prompts)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    padded = torch.zeros((rows, width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    k = min(settings.student_topk, vocab_limit)
    written = torch.zeros((rows, settings.max_new_tokens), dtype=torch.int64, device=device)
    support = torch.zeros((rows, settings.max_new_tokens, k + 1), dtype=torch.int64, device=device)
    logprobs = torch.zeros((rows, settings.max_new_tokens, k + 1), dtype=torch.float32, device=device)
    policy = torch.zeros((rows, settings.max_new_tokens, k), dtype=torch.float32, device=device)
    counts = torch.zeros(rows, dtype=torch.int64, device=device)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    stops = torch.tensor(settings.stop_ids, dtype=torch.int64, device=device)
    was_training = student.training
    student.eval()
    try:
        with autocast:
            logits, state = student.prefill(padded.to(device), lengths=prompt_lengths.to(device))
            for i in range(settings.max_new_tokens):
                logits = logits[:, :vocab_limit].float()
                token = sample_next_token(logits, settings.temperature, settings.top_p, generator)
                top = logits.topk(k, dim=-1)
                support[:, i, :k] = top.indices
                support[:, i, k] = token
                if settings.sequence_weight:  # what the sequence term's rewards need from the student
                    tempered = logits / settings.reward_temperature if settings.reward_temperature != 1.0 else logits
                    logprobs[:, i] = tempered.gather(1, support[:, i]) - tempered.logsumexp(dim=-1, keepdim=True)
                    policy[:, i] = torch.softmax(top.values / settings.temperature, dim=-1)
                written[:, i] = token
                counts += active
                active &= ~torch.isin(token, stops)
                if i + 1 == settings.max_new_tokens or not bool(active.any()):
                    break
                logits, state = student.step(token, state, overwrite=True)
    finally:
        student.train(was_training)
    return _rollout_batch(batch, prompts, written.cpu(), support.cpu(), logprobs.cpu(), policy.cpu(), counts.cpu())


def _rollout_batch(batch: Batch, prompts: list[torch.Tensor], written: torch.Tensor, support: torch.Tensor,
                   logprobs: torch.Tensor, policy: torch.Tensor, counts: torch.Tensor) -> Rollout:
    """Prompt + written tokens, right-padded; the last written token is a target only (not an input)."""
    lengths = torch.tensor([len(p) + int(n) - 1 for p, n in zip(prompts, counts)], dtype=torch.int64)
    width = int(lengths.max())
    input_ids = torch.zeros((len(prompts), width), dtype=torch.int64)
    row_mask = torch.zeros((len(prompts), width), dtype=batch.row_mask.dtype)
    score_ids = torch.zeros((len(prompts), width, support.size(-1)), dtype=torch.int64)
    labels = torch.full_like(input_ids, -100)
    student_logprobs = torch.zeros((len(prompts), width, logprobs.size(-1)), dtype=torch.float32)
    sampling = torch.zeros((len(prompts), width, policy.size(-1)), dtype=torch.float32)
    for row, (prompt, n) in enumerate(zip(prompts, counts.tolist())):
        start = len(prompt)
        input_ids[row, :start] = prompt
        input_ids[row, start:start + n - 1] = written[row, :n - 1]
        row_mask[row, start - 1:start + n - 1] = 1  # row t predicts token t + 1: the written ones
        score_ids[row, start - 1:start + n - 1] = support[row, :n]
        labels[row, start - 1:start + n - 1] = written[row, :n]
        student_logprobs[row, start - 1:start + n - 1] = logprobs[row, :n]
        sampling[row, start - 1:start + n - 1] = policy[row, :n]
    rollout = Batch(input_ids, lengths, batch.indices, row_mask, labels)
    return Rollout(rollout, score_ids, student_logprobs, sampling, sum(len(p) for p in prompts), int(counts.sum()))


def sequence_rewards(rollout: Rollout, scores: TeacherScores, settings: OnPolicySettings) -> torch.Tensor:
    """Each written position's reward ``[B, L]`` (garbage elsewhere): ``log p_t(y)`` (``teacher_logprob``) or
    ``log p_t(y) - log p_s(y)`` (``reverse_kl``) of the sampled token (``sampled``), or its expectation
    under the student's sampling distribution over its top k (``expected``: the same expected return,
    without the noise of which token was drawn at each later position)."""
    # floored: a padding row's -inf (and an id the teacher gives no mass) must not make the whitening NaN
    teacher = scores.score_logprobs.float().clamp_min(REVERSE_KL_LOGPROB_FLOOR)  # [B, L, m]
    per_id = teacher - rollout.student_logprobs if settings.sequence_reward == "reverse_kl" else teacher
    if settings.sequence_return == "sampled":
        return per_id[..., -1]
    return (rollout.policy * per_id[..., :-1]).sum(dim=-1)


def future_advantages(rewards: torch.Tensor, written: torch.Tensor, discount: float) -> torch.Tensor:
    """The sequence term's advantages ``[B, L]`` from per-token ``rewards [B, L]`` on the ``written [B, L]``
    positions (each row's written positions contiguous, in order).

    ``R_t = sum_{j > t} discount^(j-t-1) r_j / sum_{j > t} discount^(j-t-1)`` over the row's written ``j``
    (the discounted mean of the rewards of the tokens after ``t``); the advantage is ``R`` whitened over the
    written positions that have a future, and 0 at the others (a row's last token, padding, the prompt).
    """
    mask = written.bool()
    w = mask.double()
    width = rewards.size(1)
    offsets = torch.arange(width, dtype=torch.float64)[None, :] - torch.arange(width, dtype=torch.float64)[:, None] - 1
    after = offsets >= 0  # [t, j]: j > t
    weights = torch.where(after, torch.tensor(float(discount), dtype=torch.float64) ** offsets.clamp_min(0), 0.0)
    numerator = (rewards.double() * w) @ weights.T  # [B, L]: sum_j weights[t, j] * r_j over written j
    denominator = w @ weights.T
    has_future = mask & (denominator > 0)
    returns = torch.where(has_future, numerator / denominator.clamp_min(1e-300), 0.0)
    advantages = torch.zeros_like(returns)
    if int(has_future.sum()) > 1:
        picked = returns[has_future]
        advantages[has_future] = (picked - picked.mean()) / (picked.std() + 1e-6)
    return advantages.float()


def union_targets(scores: TeacherScores, row_mask: torch.Tensor) -> TeacherTargets:
    """Targets over the union support on the rows of ``row_mask [B, L]``: ``[B, L, k + m]`` (teacher's top
    k, then the scored ids that are not among them; repeats are padding entries), with the teacher's mass
    outside the union as the tail. Ids of both sets take the scored, exact float32 log-prob."""
    targets = scores.targets
    mask = row_mask.bool()
    ids_t, lp_t = targets.indices[mask].long(), targets.logprobs[mask].float()  # [N, k]
    ids_s, lp_s = scores.score_ids[mask].long(), scores.score_logprobs[mask].float()  # [N, m]
    tail = targets.tail_logprob[mask].double()  # [N]
    valid_t = lp_t > -math.inf
    match = (ids_s[:, :, None] == ids_t[:, None, :]) & valid_t[:, None, :]  # [N, m, k]
    exact = torch.where(match, lp_s[:, :, None], -math.inf).amax(dim=1)  # [N, k]
    lp_t = torch.where(match.any(dim=1), exact, lp_t)
    m = ids_s.size(1)
    earlier = torch.ones(m, m, dtype=torch.bool, device=ids_s.device).tril(diagonal=-1)
    repeated = ((ids_s[:, :, None] == ids_s[:, None, :]) & earlier).any(dim=-1)  # [N, m]: an earlier twin
    fresh = ~match.any(dim=-1) & ~repeated
    lp_new = torch.where(fresh, lp_s, -math.inf)
    # the teacher's mass outside the union = its tail (outside the top k) minus the fresh scored ids' mass
    rest = tail.exp() - lp_new.double().exp().sum(dim=-1)  # <= 0: the union holds all of it (to rounding)
    tail_u = torch.where(rest > 0, rest.clamp_min(1e-300).log(), -math.inf)

    batch_shape = tuple(row_mask.shape)
    k_all = ids_t.size(1) + m
    indices = torch.full((*batch_shape, k_all), PAD_INDEX, dtype=torch.int64, device=ids_t.device)
    logprobs = torch.full((*batch_shape, k_all), PAD_LOGPROB, dtype=torch.float32, device=ids_t.device)
    tails = torch.full(batch_shape, PAD_LOGPROB, dtype=torch.float32, device=ids_t.device)
    indices[mask] = torch.cat([ids_t, ids_s], dim=1)
    logprobs[mask] = torch.cat([lp_t, lp_new], dim=1)
    tails[mask] = tail_u.float()
    return TeacherTargets(indices, logprobs, tails, temperature=targets.temperature)


class OnPolicy:
    """Samples the on-policy micro-batches of a step and has the teacher score them in the background.

    Args:
        settings: the run's on-policy keys.
        teacher: a source with ``scores_for`` (direct, network, or a fallback chain of those).
        vocab_limit: the teacher's vocabulary size.
        device, autocast: where and how the student runs.
        seed: the sampler's seed (one per rank).
    """

    def __init__(self, settings: OnPolicySettings, teacher: TeacherSource, vocab_limit: int, device: torch.device,
                 autocast: Any, seed: int) -> None:
        limit = getattr(teacher, "max_score_ids", None)
        if limit is not None and settings.scored_ids > limit:
            raise ValueError(f"on-policy scoring sends onpolicy_student_topk + 1 = {settings.scored_ids} ids per "
                             f"position but teacher {teacher.name} scores at most {limit} (TEACHER_MAX_SCORE_IDS); "
                             "lower onpolicy_student_topk or raise the service's limit")
        if not hasattr(teacher, "scores_for"):
            raise ValueError(f"teacher {teacher.name} cannot score the student's text; on-policy steps need a "
                             "direct or network teacher")
        self.settings, self.teacher, self.vocab_limit = settings, teacher, vocab_limit
        self.device, self.autocast = device, autocast
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onpolicy-scoring")

    def start(self, student: RetNetStudent, micro_batches: list[Batch]) -> list[tuple[Rollout, Future]]:
        """Sample each micro-batch's continuations and queue its scoring request (in order)."""
        started = []
        for batch in micro_batches:
            rollout = sample_rollout(student, batch, self.settings, self.generator, self.vocab_limit, self.device,
                                     self.autocast)
            future = self._scoring.submit(self.teacher.scores_for, rollout.batch.input_ids, rollout.batch.lengths,
                                          rollout.score_ids, self.settings.teacher_temperature)
            started.append((rollout, future))
        return started

    def targets(self, rollout: Rollout, scoring: Future) -> tuple[TeacherTargets, torch.Tensor | None, float | None]:
        """Wait for a rollout's scores (re-raising the teacher's error) -> union-support targets, the
        sequence term's advantages ``[B, L]`` and the mean reward of the written tokens (both None when the
        term is off)."""
        scores = scoring.result()
        targets = union_targets(scores, rollout.batch.row_mask)
        if not self.settings.sequence_weight:
            return targets, None, None
        written = rollout.batch.row_mask.bool()
        rewards = torch.where(written, sequence_rewards(rollout, scores, self.settings), 0.0)
        advantages = future_advantages(rewards, written, self.settings.sequence_discount)
        return targets, advantages, float(rewards[written].mean()) if written.any() else 0.0

    def state_dict(self) -> str:
        """The sampler's RNG state (base64), for the checkpoint."""
        return base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()

    def load_state_dict(self, state: str) -> None:
        raw = torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8)
        self.generator.set_state(raw)

    def close(self) -> None:
        self._scoring.shutdown(wait=False, cancel_futures=True)
