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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

GENERATION_METRICS = ("teacher_nll", "distinct_2", "distinct_3", "repetition_4")


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


@torch.no_grad()
def teacher_nll(teacher_lm: Any, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]],
                vocab: int) -> float | None:
    """The teacher's mean NLL per generated token: each ``prompt + generation`` in one causal forward
    (``[1, P + G]``), scored at the G generated positions over the tokenizer's ``vocab`` ids (the
    padded rows of an LM head excluded, unless a generation holds such an id: then the softmax spans
    up to it). None if nothing was generated."""
    total, count = 0.0, 0
    device = next(teacher_lm.parameters()).device
    for prompt, generated in zip(prompts, generations):
        if not generated:
            continue
        ids = torch.tensor([list(prompt) + list(generated)], device=device)
        rows = max(vocab, max(generated) + 1)
        logits = teacher_lm(input_ids=ids).logits[0, len(prompt) - 1:-1, :rows].float()  # [G, V]
        targets = torch.tensor(list(generated), device=device)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(generated)
    return total / count if count else None


def generation_metrics(teacher_lm: Any, vocab: int, prompts: Sequence[Sequence[int]],
                       generations: Sequence[Sequence[int]]) -> dict[str, float | None]:
    """All :data:`GENERATION_METRICS` of ``generations`` (one id list per prompt) and their token count."""
    return {
        "teacher_nll": teacher_nll(teacher_lm, prompts, generations, vocab),
        "distinct_2": distinct_n(generations, 2),
        "distinct_3": distinct_n(generations, 3),
        "repetition_4": repetition_rate(generations, 4),
        "tokens": float(sum(len(g) for g in generations)),
    }
