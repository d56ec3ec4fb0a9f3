"""Top-k log-probabilities and the exact tail from hidden states, a few rows at a time.

For ``N`` rows and vocabulary ``V`` the full fp32 logits would be ``N * V * 4`` bytes (4 GB for
8 x 1024 tokens of a 128K vocab), so the LM head and the softmax statistics run on row chunks of
about ``chunk_bytes`` each. The tail is ``logsumexp`` over the ids *outside* the top k minus the
full ``logsumexp``: exact, and free of the cancellation in ``log(1 - sum(exp(top_k)))`` when the
top k hold nearly all the mass. Scores of arbitrary ids (wire v1.1 ``score_ids``) are gathered
from the same chunk of tempered logits, so they cost no second pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TopKRows:
    """Targets for ``N`` rows: ``indices [N, k]`` int32, ``logprobs [N, k]`` float32, ``tail [N]`` float32;
    when asked for (v1.1), ``score_logprobs [N, m]`` float32 and ``logsumexp [N]`` float32 of ``logits / T``."""

    indices: np.ndarray
    logprobs: np.ndarray
    tail_logprob: np.ndarray
    score_logprobs: np.ndarray | None = None
    logsumexp: np.ndarray | None = None


@torch.no_grad()
def topk_from_hidden(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    temperature: float,
    vocab_size: int,
    chunk_bytes: int = 1 << 28,
    logit_softcap: float | None = None,
    score_ids: np.ndarray | None = None,
    return_logsumexp: bool = False,
    sample_n: int | None = None,
    sample_seed: int = 0,
) -> TopKRows:
    """Top-k of ``log_softmax(logits / T)`` and the tail, per row.

    Args:
        hidden: ``[N, d]`` final hidden states (after the model's last norm).
        lm_head: maps ``[n, d]`` to logits ``[n, V_head]``; ``V_head >= vocab_size``.
        k: entries per row, ``1 <= k <= vocab_size``.
        temperature: divides the raw logits before the softmax (the student must use the same T).
        vocab_size: the tokenizer's length; LM-head rows beyond it (padding) are never returned.
        chunk_bytes: budget for one chunk of fp32 logits.
        logit_softcap: ``cap * tanh(z / cap)`` as some models (Gemma 2) apply before the softmax.
        score_ids: ``[N, m]`` ids in ``[0, vocab_size)`` whose ``log_softmax(logits / T)`` to return.
        return_logsumexp: also return ``logsumexp(logits / T)`` per row.
        sample_n: instead of the top k, draw ``sample_n`` ids per row from ``softmax(logits / T)``
            (sparse logit sampling, :func:`sample_from_logits`); then ``k`` must equal ``sample_n`` and
            the rows hold the unique drawn ids with ``logprobs = log(count / n)`` and tail ``-inf``.
        sample_seed: seeds the draws (the same hidden states and seed give the same targets).

    Returns:
        :class:`TopKRows` with ids sorted by descending probability (and the scores asked for).
    """
    if sample_n is not None and sample_n != k:
        raise ValueError(f"sampled targets hold at most sample_n ids a row: k must equal sample_n={sample_n}, found {k}")
    generator = torch.Generator(device=hidden.device).manual_seed(sample_seed) if sample_n else None
    rows = hidden.shape[0]
    chunk_rows = max(1, chunk_bytes // (4 * vocab_size))
    indices = np.empty((rows, k), dtype=np.int32)
    logprobs = np.empty((rows, k), dtype=np.float32)
    tail = np.empty((rows,), dtype=np.float32)
    scores = None if score_ids is None else np.empty(score_ids.shape, dtype=np.float32)
    lse_out = np.empty((rows,), dtype=np.float32) if return_logsumexp else None
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        logits = lm_head(hidden[start:stop])[:, :vocab_size].float()
        if logit_softcap:
            logits = torch.tanh(logits / logit_softcap) * logit_softcap
        logits = logits / temperature  # a fresh fp32 tensor we own: safe to overwrite below
        lse = torch.logsumexp(logits, dim=-1)
        if generator is not None:
            ids, counts = sample_from_logits(logits, k, generator)
            indices[start:stop] = ids.to(torch.int32).cpu().numpy()
            logprobs[start:stop] = torch.log(counts.double() / k).float().cpu().numpy()  # log 0 = -inf: padding
            tail[start:stop] = float("-inf")
            if lse_out is not None:
                lse_out[start:stop] = lse.cpu().numpy()
            if scores is not None:
                ids_s = torch.from_numpy(np.ascontiguousarray(score_ids[start:stop], dtype=np.int64)).to(logits.device)
                scores[start:stop] = (logits.gather(-1, ids_s) - lse[:, None]).cpu().numpy()
            continue
        top_vals, top_ids = torch.topk(logits, k, dim=-1, sorted=True)
        if scores is not None:  # before the top k are overwritten below
            ids = torch.from_numpy(np.ascontiguousarray(score_ids[start:stop], dtype=np.int64)).to(logits.device)
            scores[start:stop] = (logits.gather(-1, ids) - lse[:, None]).cpu().numpy()
        if lse_out is not None:
            lse_out[start:stop] = lse.cpu().numpy()
        logits.scatter_(-1, top_ids, float("-inf"))
        rest_lse = torch.logsumexp(logits, dim=-1)  # -inf when k == vocab_size: the tail is empty
        indices[start:stop] = top_ids.to(torch.int32).cpu().numpy()
        logprobs[start:stop] = (top_vals - lse[:, None]).cpu().numpy()
        tail[start:stop] = (rest_lse - lse).cpu().numpy()
    return TopKRows(indices=indices, logprobs=logprobs, tail_logprob=tail, score_logprobs=scores, logsumexp=lse_out)


@torch.no_grad()
def sample_from_logits(logits: torch.Tensor, n: int, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` ids per row from ``softmax(logits)`` with replacement; return unique ids and counts.

    Sparse logit sampling (Anshumann et al., ACL 2025): with ``p_hat = count / n`` as the target the
    forward-KL gradient w.r.t. the student logits, ``softmax(z) - p_hat``, is an unbiased estimate of
    the dense ``softmax(z) - p`` (top-k targets are biased towards the head).

    Args:
        logits: ``[R, V]`` float, already divided by the temperature.
        n: draws per row, ``1 <= n``.
        generator: for reproducible draws.

    Returns:
        ``ids [R, n]`` int64 and ``counts [R, n]`` int64: each row's distinct drawn ids, most drawn
        first (ties by id), padded with id 0 and count 0; every row's counts sum to ``n``.
    """
    if n < 1:
        raise ValueError(f"sample n must be >= 1, found {n}")
    probs = torch.softmax(logits.float(), dim=-1)
    draws = torch.multinomial(probs, n, replacement=True, generator=generator).sort(dim=-1).values  # [R, n]
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = new.long().cumsum(dim=-1) - 1  # which distinct id each draw is
    counts = torch.zeros_like(draws).scatter_add_(1, group, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, group, draws)
    # most drawn first, as the top-k contract (descending probability) asks; padding (count 0) last
    order = torch.sort(counts * (draws.new_tensor(1) << 32) - ids, dim=-1, descending=True).indices
    return ids.gather(1, order), counts.gather(1, order)
