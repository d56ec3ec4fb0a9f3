"""Long-context evaluation: held-out loss of the student by position, on rows longer than it trained on.

``retnet-distill evaluate ... --context N`` builds rows of ``N`` tokens by concatenating the held-out
split's rows in order (their valid tokens only, never padding: packed rows are consecutive slices of one
document stream, so this restores the stream; unpacked rows get an EOS between documents as the packer
puts one), scores every next token of each row with the student (hidden states on the config's path,
chunkwise and linear-cost on long rows; the LM head on row chunks so ``[N, V]`` logits never exist at
once), and reports loss and perplexity per position bucket. The teacher is scored on the same rows when
they fit its ``max_position_embeddings``, and skipped (with the reason) when they do not.

A prediction at position ``t`` (0-based) sees tokens ``0 .. t`` and predicts token ``t + 1``; bucket
``a-b`` holds the predictions at positions ``a <= t < b``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from student_trainer.data.shards import PretokenizedShardDataset
from student_trainer.evaluation.evaluate import EvaluationError
from student_trainer.model.student import RetNetStudent

DEFAULT_FIRST_EDGE = 512  # default buckets 0-512, 512-2K, 2K-8K, 8K-32K, ... (each edge 4x the last)
HEAD_CHUNK = 512  # positions per LM-head product: [512, V] logits at a time
# Largest [H, C, C] retention score tensor (fp32, one row) the evaluation accepts: C is the whole context
# on the parallel path and recurrent_chunk_size on the chunkwise one.
MAX_RETENTION_SCORE_BYTES = 4 << 30
SATURATION_NOTE = ("Loss by position bucket: a loss that falls from bucket to bucket means the model uses the longer "
                   "context. A student whose loss stops falling after the first bucket (saturation, known for "
                   "fixed-decay retention on retrieval: old tokens decay out of the state) is reported as it is.")


def bucket_edges(context: int, edges: list[int] | None = None) -> list[tuple[int, int | None]]:
    """The position buckets ``[(start, end), ...]`` that predictions ``0 .. context - 2`` reach.

    ``edges``: ascending inner edges, e.g. ``[512, 2048, 8192]`` -> 0-512, 512-2K, 2K-8K, 8K+ (``end``
    None: open). None: 512, 2048, 8192, ... (x4) until they cover the context (no open bucket).
    """
    last = context - 2  # the last scored position
    if edges is None:
        edges = [DEFAULT_FIRST_EDGE]
        while edges[-1] <= last:
            edges.append(edges[-1] * 4)
    elif not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise EvaluationError(f"--buckets must be ascending positive positions (e.g. 512 2048 8192), found {edges}")
    bounds: list[tuple[int, int | None]] = []
    start = 0
    for edge in list(edges) + [None]:
        if start > last:
            break
        bounds.append((start, edge))
        if edge is None:
            break
        start = edge
    return bounds


def bucket_label(start: int, end: int | None) -> str:
    """``0-512``, ``512-2K``, ``8K+`` (a multiple of 1024 from 1024 up is written in K)."""
    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{short(start)}+" if end is None else f"{short(start)}-{short(end)}"


def long_rows(dataset: PretokenizedShardDataset, context: int, rows: int) -> list[torch.Tensor]:
    """Up to ``rows`` consecutive, non-overlapping rows of ``context`` tokens (``[context]`` int64 each)
    from the split's rows in order: each row's first ``length`` tokens, and an EOS after an unpacked
    document that does not end with one. Raises EvaluationError when not even one row fits."""
    manifest = dataset.manifest
    packed = manifest.get("parameters", {}).get("pack", True)
    eos_id = manifest.get("eos_id")
    wanted = context * rows
    pieces: list[torch.Tensor] = []
    total = 0
    for index in range(len(dataset)):
        row = dataset[index]
        tokens = row["input_ids"][: row["length"]]
        if not packed and eos_id is not None and int(tokens[-1]) != eos_id:
            tokens = torch.cat([tokens, torch.tensor([eos_id])])
        pieces.append(tokens)
        total += tokens.numel()
        if total >= wanted:
            break
    if total < context:
        raise EvaluationError(
            f"{dataset.folder} split {dataset.split!r} holds {total} tokens in {len(dataset)} rows (valid tokens, no "
            f"padding), fewer than --context {context} asks for one row; pass --context {total} or less, or a "
            "larger split (--split train, or preprocess with a larger --val-fraction)")
    stream = torch.cat(pieces)
    return [stream[i * context:(i + 1) * context] for i in range(min(rows, total // context))]


def check_student_path(student: RetNetStudent, context: int, max_bytes: int = MAX_RETENTION_SCORE_BYTES) -> str:
    """Which retention path scores rows of ``context`` tokens (``"parallel"`` / ``"chunkwise (chunk C)"``);
    raises EvaluationError naming the setting when its ``[H, C, C]`` scores would exceed ``max_bytes``."""
    config = student.config
    if config.uses_chunkwise(context):
        side, path = min(config.recurrent_chunk_size, context), f"chunkwise (chunk {config.recurrent_chunk_size})"
        fix = f"lower recurrent_chunk_size ({config.recurrent_chunk_size}) in the student's config.json"
    else:
        side, path = context, "parallel"
        fix = (f"set chunkwise_min_length (now {config.chunkwise_min_length}) to at most {context} in the student's "
               "config.json (e.g. 1024) so long rows run chunkwise")
    needed = config.n_heads * side * side * 4
    if needed > max_bytes:
        raise EvaluationError(
            f"--context {context} runs the student's {path} retention path, whose [{config.n_heads}, {side}, {side}] "
            f"scores need {needed / 2**30:.1f} GiB per layer (limit {max_bytes / 2**30:.1f} GiB); {fix}, "
            "or evaluate a shorter --context")
    return path


def _nll_from_hidden(hidden: torch.Tensor, head: Any, ids: torch.Tensor, vocab: int, head_chunk: int,
                     softcap: float | None = None) -> torch.Tensor:
    """Next-token NLL ``[L - 1]`` fp32 from final hidden states ``hidden [L, d]`` of ``ids [L]``: ``head``
    (``[c, d] -> [c, V_model]``) on ``head_chunk`` positions at a time, softmax over the first ``vocab``."""
    if head_chunk < 1:
        raise EvaluationError(f"the LM-head chunk must be at least 1 position, found {head_chunk}")
    losses = []
    for start in range(0, ids.numel() - 1, head_chunk):
        end = min(start + head_chunk, ids.numel() - 1)
        logits = head(hidden[start:end])[:, :vocab].float()  # [c, vocab]
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        losses.append(F.cross_entropy(logits, ids[start + 1:end + 1], reduction="none"))
    return torch.cat(losses)


@torch.no_grad()
def student_position_nll(student: RetNetStudent, ids: torch.Tensor, vocab: int, head_chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """The student's next-token NLL at every position of ``ids [L]``: ``[L - 1]`` fp32 nats."""
    hidden = student.hidden_states(ids[None])[0]  # [L, d]; chunkwise (linear cost) on long rows
    return _nll_from_hidden(hidden, student.logits_from_hidden, ids, vocab, head_chunk)


@torch.no_grad()
def teacher_position_nll(teacher_lm: Any, ids: torch.Tensor, vocab: int, head_chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """The same for a Hugging Face causal LM (its backbone's last hidden state, then its head in chunks,
    with the config's final logit soft-capping when it has one): ``[L - 1]`` fp32 nats."""
    hidden = teacher_lm.base_model(input_ids=ids[None].to(teacher_lm.device)).last_hidden_state[0]  # [L, d]
    softcap = getattr(teacher_lm.config, "final_logit_softcapping", None)
    return _nll_from_hidden(hidden, teacher_lm.get_output_embeddings(), ids.to(teacher_lm.device), vocab, head_chunk,
                            softcap).to(ids.device)


def _loss(total: float, tokens: int) -> tuple[float, float]:
    mean = total / tokens
    return mean, math.exp(mean)


def bucket_table(nll: list[torch.Tensor], bounds: list[tuple[int, int | None]]) -> list[dict[str, Any]]:
    """Per bucket: label, positions, token count, mean loss (nats/token) and perplexity over all rows'
    ``nll [L - 1]``."""
    table = []
    for start, end in bounds:
        values = torch.cat([row[start:end] for row in nll])
        loss, ppl = _loss(float(values.double().sum()), values.numel())
        table.append({"bucket": bucket_label(start, end), "start": start, "end": end, "tokens": values.numel(),
                      "loss": loss, "perplexity": ppl})
    return table


def long_context_metrics(student: RetNetStudent, teacher_lm: Any, dataset: PretokenizedShardDataset, vocab: int,
                         context: int, rows: int = 1, edges: list[int] | None = None, head_chunk: int = HEAD_CHUNK,
                         train_context: int | None = None) -> dict[str, Any]:
    """The report's ``long_context`` section for ``rows`` rows of ``context`` tokens (see the module doc).

    ``teacher_lm``: a Hugging Face causal LM, or None to skip it. ``train_context``: the run's
    ``max_seq_length``, recorded for the reader.
    """
    if context < 2:
        raise EvaluationError(f"--context must be at least 2 tokens (one prediction), found {context}")
    if rows < 1:
        raise EvaluationError(f"--context-rows must be at least 1, found {rows}")
    path = check_student_path(student, context)
    bounds = bucket_edges(context, edges)
    device = next(student.parameters()).device
    batch = [ids.to(device) for ids in long_rows(dataset, context, rows)]
    student_nll = [student_position_nll(student, ids, vocab, head_chunk) for ids in batch]

    limit = getattr(getattr(teacher_lm, "config", None), "max_position_embeddings", None)
    skipped = None
    if teacher_lm is None:
        skipped = "no teacher"
    elif limit is not None and context > limit:
        skipped = f"context {context} > the teacher's {limit} positions"
    teacher_nll = None if skipped else [teacher_position_nll(teacher_lm, ids, vocab, head_chunk) for ids in batch]

    buckets = bucket_table(student_nll, bounds)
    teacher_buckets = bucket_table(teacher_nll, bounds) if teacher_nll else None
    for i, bucket in enumerate(buckets):
        bucket["student_loss"], bucket["student_perplexity"] = bucket.pop("loss"), bucket.pop("perplexity")
        bucket["teacher_loss"] = teacher_buckets[i]["loss"] if teacher_buckets else None
        bucket["teacher_perplexity"] = teacher_buckets[i]["perplexity"] if teacher_buckets else None
    tokens = sum(row.numel() for row in student_nll)
    student_loss, student_ppl = _loss(sum(float(row.double().sum()) for row in student_nll), tokens)
    teacher = None
    if teacher_nll:
        loss, ppl = _loss(sum(float(row.double().sum()) for row in teacher_nll), tokens)
        teacher = {"loss": loss, "perplexity": ppl}
    return {
        "context": context, "rows": len(batch), "tokens": tokens, "data": str(dataset.folder), "split": dataset.split,
        "scored": "every next token of each row (positions 0 .. context-2; the loss mask is not applied)",
        "student_max_seq_len": student.config.max_seq_len, "train_context": train_context,
        "student_path": path, "teacher_max_positions": limit,
        "student": {"loss": student_loss, "perplexity": student_ppl},
        "teacher": teacher, "teacher_skipped": skipped,
        "buckets": buckets, "note": SATURATION_NOTE,
    }


def print_long_context(console: Any, section: dict[str, Any]) -> None:
    """The bucket table of :func:`long_context_metrics` on a rich console."""
    from rich.table import Table

    table = Table(title=f"long context: {section['rows']} row(s) of {section['context']} tokens "
                        f"({section['split']} split; student trained on {section['train_context'] or '?'}, "
                        f"{section['student_path']})")
    for name in ("positions", "tokens", "student loss", "student ppl", "teacher loss", "teacher ppl"):
        table.add_column(name, justify="left" if name == "positions" else "right")
    for b in section["buckets"]:
        teacher = ((f"{b['teacher_loss']:.3f}", f"{b['teacher_perplexity']:.1f}") if b["teacher_loss"] is not None
                   else ("-", "-"))
        table.add_row(b["bucket"], str(b["tokens"]), f"{b['student_loss']:.3f}", f"{b['student_perplexity']:.1f}", *teacher)
    console.print(table)
    if section["teacher_skipped"]:
        console.print(f"teacher skipped: {section['teacher_skipped']}")
    console.print(section["note"])
