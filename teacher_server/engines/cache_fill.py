"""Filling a teacher cache from a pre-tokenized shard set, shard by shard, resumably.

The same function runs in the trainer's process (``retnet-distill cache``) and behind the
server's cache-writer route; only ``score`` differs (the engine called directly, or through the
server's dynamic batcher so cache jobs share the engine with ``/v1/topk``). No web framework here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.cache_format import CacheSpec, CacheWriter
from shared.token_shards import TokenShardReader
from teacher_server.engines.base import EngineRequest, TopKEngine
from teacher_server.engines.topk_math import TopKRows

# Scores the sequences of one request: the engine itself, or a call through the batcher.
ScoreFn = Callable[[EngineRequest], TopKRows]


@dataclass
class CacheProgress:
    """Where a fill stands; passed to the progress callback after every shard."""

    shards_done: int
    shards_total: int
    sequences_done: int
    tokens_done: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.seconds if self.seconds > 0 else 0.0


class FillCancelled(RuntimeError):
    """The fill stopped because it was cancelled; the shards written so far stay valid."""


def cache_spec(engine: TopKEngine, data_dir: str | Path, split: str, k: int, temperature: float,
               shard_size: int, target_type: str = "topk_fp16", q8_step: float | None = None,
               code_step: float | None = None, code_knee: float | None = None,
               mass_cutoff: float | None = None) -> CacheSpec:
    """The identity of a cache of ``engine``'s targets for one split of a shard set.

    ``target_type="sampled"``: ``k`` is the number of draws per position (the engine samples them);
    ``code_step`` / ``code_knee`` / ``mass_cutoff`` apply to ``topk_coded`` only (None = defaults).
    """
    coded = target_type == "topk_coded"
    reader = TokenShardReader(data_dir, split)
    return CacheSpec(
        teacher_model=engine.model_name, teacher_fingerprint=engine.weights_fingerprint,
        tokenizer_sha256=engine.tokenizer_sha256, vocab_size=engine.vocab_size, k=k, temperature=temperature,
        target_type=target_type, dataset_path=str(Path(data_dir).resolve()), dataset_fingerprint=reader.fingerprint,
        split=split, max_seq_length=reader.seq_len, num_sequences=len(reader), shard_size=shard_size,
        q8_step=q8_step if target_type == "topk_q8" else None,
        code_step=code_step if coded else None, code_knee=code_knee if coded else None,
        mass_cutoff=mass_cutoff if coded else None,
    )


def fill_request(spec: CacheSpec, sequences: list[np.ndarray], first_row: int) -> EngineRequest:
    """The engine request for ``sequences`` (dataset rows from ``first_row`` on) of a fill of ``spec``.

    Sampled targets are seeded by their first dataset row, so a resumed or repeated fill draws the
    same ids (given the same engine and device).
    """
    if spec.target_type == "sampled":
        return EngineRequest(sequences, spec.k, spec.temperature, sample_n=spec.k, sample_seed=first_row)
    return EngineRequest(sequences, spec.k, spec.temperature)


def fill_cache(
    score: ScoreFn,
    spec: CacheSpec,
    data_dir: str | Path,
    output: str | Path,
    sequences_per_request: int = 16,
    progress: Callable[[CacheProgress], None] | None = None,
    cancel: threading.Event | None = None,
    confine_to: str | Path | None = None,
) -> CacheProgress:
    """Write every missing shard of the cache at ``output``; returns the final progress.

    A killed fill resumes at the first missing shard (the writer keeps the manifest current after
    every shard). Each shard's sequences are scored ``sequences_per_request`` at a time, so a
    server fill interleaves with other clients' requests instead of holding the engine.
    ``confine_to`` (the server's cache root): the writer refuses an ``output`` that, once opened,
    lies outside it (see :class:`CacheWriter`).

    Raises:
        shared.cache_format.CacheMismatch: ``output`` holds a cache with another identity.
        FillCancelled: ``cancel`` was set (between requests).
    """
    # a server's job (confined) reads no symlinked dataset file, even one swapped in after its checks
    reader = TokenShardReader(data_dir, spec.split, follow_symlinks=confine_to is None)
    if spec.tokenizer_sha256 != reader.manifest["tokenizer_sha256"]:
        raise ValueError(f"{data_dir} was tokenized with another tokenizer than the teacher's; preprocess it "
                         "with the teacher's tokenizer first")
    started = time.perf_counter()
    with CacheWriter(output, spec, confine_to=confine_to) as writer:
        missing = writer.missing_shards()
        state = CacheProgress(spec.num_shards - len(missing), spec.num_shards, 0, 0, 0.0)
        for shard_index, first, count in missing:
            rows = [reader.row(i) for i in range(first, first + count)]
            input_ids = np.stack([tokens for tokens, _, _ in rows]).astype(np.int32)
            lengths = np.asarray([length for _, _, length in rows], dtype=np.int32)
            parts: list[TopKRows] = []
            for start in range(0, count, sequences_per_request):
                if cancel is not None and cancel.is_set():
                    raise FillCancelled(f"cancelled after {state.shards_done} of {state.shards_total} shards")
                sequences = [input_ids[i, : lengths[i]].astype(np.int64)
                             for i in range(start, min(count, start + sequences_per_request))]
                parts.append(score(fill_request(spec, sequences, first + start)))
            writer.write_shard(
                shard_index, input_ids, lengths,
                np.concatenate([p.indices for p in parts]), np.concatenate([p.logprobs for p in parts]),
                np.concatenate([p.tail_logprob for p in parts]),
            )
            state.shards_done += 1
            state.sequences_done += count
            state.tokens_done += int(lengths.sum())
            state.seconds = time.perf_counter() - started
            if progress is not None:
                progress(state)
    state.seconds = time.perf_counter() - started
    return state
