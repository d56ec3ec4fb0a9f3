"""How good a model's own text is, judged by the teacher (issue 15, item 3).

Perplexity, KL and agreement measure the student on the data's tokens (teacher forcing). What a user
sees is the student's *own* text, where exposure bias shows: these metrics score generations.

- ``teacher_nll``: the teacher's mean negative log-likelihood (nats) per generated token, given the
  prompt and the tokens generated before it: low = text the teacher finds likely.
- ``distinct_2``, ``distinct_3``: distinct n-grams / all n-grams over all generations (Li et al. 2016):
  low = the same phrases again and again.
- ``repetition_4``: the share of a generation's 4-grams that already occurred earlier in the same
  generation, over all generations: high = loops.

The same metrics of the teacher's own answers to the same prompts are the reference.

Where the model that wrote the text is given (the student's answers), the teacher NLL is taken apart,
full vocabulary, at every generated position (``[V]`` distributions at temperature 1):

- ``reverse_kl``: KL(p_writer || p_teacher), the quantity on-policy distillation lowers;
- ``writer_entropy`` and ``teacher_entropy``: H(p_writer) and H(p_teacher) there.

For text sampled at temperature 1 the expected teacher NLL is ``reverse_kl + writer_entropy``: a student
that matches a teacher which is unsure in the places the student's text leads to (high
``teacher_entropy``) writes text of *higher* teacher NLL than a sharper, worse-matched one. So read the
three together: the NLL alone rewards a low-entropy writer (RESULTS.md, on-policy).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

GENERATION_METRICS = ("teacher_nll", "distinct_2", "distinct_3", "repetition_4")
DECOMPOSITION_METRICS = ("reverse_kl", "writer_entropy", "teacher_entropy")


def distinct_n(generations: Sequence[Sequence[int]], n: int) -> float | None:
    """Distinct n-grams over all n-grams of all ``generations`` (token id lists); None if none has n tokens."""
    grams = [tuple(ids[i:i + n]) for ids in generations for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(generations: Sequence[Sequence[int]], n: int = 4) -> float | None:
    """The share of n-grams that repeat an earlier n-gram of the same generation; None if there are none."""
    repeats = total = 0
    for ids in generations:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(ids) - n + 1):
            gram = tuple(ids[i:i + n])
            repeats += gram in seen
            total += 1
            seen.add(gram)
    return repeats / total if total else None


def _teacher_logprobs(teacher_lm: Any, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]],
                      vocab: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per non-empty generation: ``ids [1, P + G]`` (prompt + generation), the generated ids ``[G]`` and the
    teacher's log-probs ``[G, V]`` at the G positions that predict them, from one causal forward, over the
    tokenizer's ``vocab`` ids (the padded rows of an LM head excluded, unless a generation holds such an
    id: then the softmax spans up to it)."""
    device = next(teacher_lm.parameters()).device
    for prompt, generated in zip(prompts, generations):
        if not generated:
            continue
        ids = torch.tensor([list(prompt) + list(generated)], device=device)
        rows = max(vocab, max(generated) + 1)
        logits = teacher_lm(input_ids=ids).logits[0, len(prompt) - 1:-1, :rows].float()  # [G, V]
        yield ids, torch.tensor(list(generated), device=device), torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def teacher_nll(teacher_lm: Any, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]],
                vocab: int) -> float | None:
    """The teacher's mean NLL per generated token, given the prompt and the tokens before it (over the
    ids of :func:`_teacher_logprobs`). None if nothing was generated."""
    total, count = 0.0, 0
    for _, generated, teacher_lp in _teacher_logprobs(teacher_lm, prompts, generations, vocab):
        total -= float(teacher_lp.gather(1, generated[:, None]).sum())
        count += len(generated)
    return total / count if count else None


@torch.no_grad()
def teacher_nll_parts(teacher_lm: Any, writer: Any, prompts: Sequence[Sequence[int]],
                      generations: Sequence[Sequence[int]], vocab: int) -> dict[str, float | None]:
    """Means per generated token of KL(p_writer || p_teacher), H(p_writer) and H(p_teacher), full vocabulary,
    and the teacher NLL itself (from the same teacher forward).

    ``writer``: the model that wrote ``generations``, called as ``writer(ids [1, L]) -> logits [1, L, V']``
    (a student); the teacher is a Hugging Face causal LM. Both are restricted to the same ids as
    :func:`teacher_nll`. All None if nothing was generated.
    """
    sums = dict.fromkeys(("teacher_nll", *DECOMPOSITION_METRICS), 0.0)
    count = 0
    for ids, generated, teacher_lp in _teacher_logprobs(teacher_lm, prompts, generations, vocab):
        positions = slice(ids.size(1) - 1 - len(generated), ids.size(1) - 1)  # those that predict a generated id
        writer_lp = torch.log_softmax(writer(ids)[0, positions, :teacher_lp.size(1)].float(), dim=-1)  # [G, V]
        writer_p, teacher_p = writer_lp.exp(), teacher_lp.exp()
        sums["teacher_nll"] -= float(teacher_lp.gather(1, generated[:, None]).sum())
        sums["reverse_kl"] += float((writer_p * (writer_lp - teacher_lp)).sum())
        sums["writer_entropy"] -= float((writer_p * writer_lp).sum())
        sums["teacher_entropy"] -= float((teacher_p * teacher_lp).sum())
        count += len(generated)
    return {key: (value / count if count else None) for key, value in sums.items()}


def generation_metrics(teacher_lm: Any, vocab: int, prompts: Sequence[Sequence[int]],
                       generations: Sequence[Sequence[int]], writer: Any = None) -> dict[str, float | None]:
    """All :data:`GENERATION_METRICS` of ``generations`` (one id list per prompt) and their token count;
    with ``writer`` (the model that wrote them) also :data:`DECOMPOSITION_METRICS`."""
    # with a writer, one teacher forward per answer gives the NLL and its parts
    scored = ({"teacher_nll": teacher_nll(teacher_lm, prompts, generations, vocab)} if writer is None
              else teacher_nll_parts(teacher_lm, writer, prompts, generations, vocab))
    metrics = {
        "teacher_nll": scored.pop("teacher_nll"),
        "distinct_2": distinct_n(generations, 2),
        "distinct_3": distinct_n(generations, 3),
        "repetition_4": repetition_rate(generations, 4),
        "tokens": float(sum(len(g) for g in generations)),
    }
    metrics.update(scored)  # the parts, when there is a writer
    return metrics
