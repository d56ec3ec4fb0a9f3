"""Cached mode: teacher targets read from a cache written by ``retnet-distill cache`` (or the route).

A cache folder holds one cache per split of the shard set (``CACHE/train``, ``CACHE/val``). Rows
are looked up by dataset index, and every looked-up row's cached input ids must equal the batch's,
so a cache can never be applied to the wrong data by accident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.cache_format import CacheMismatch
from shared.cache_reader import CacheReader
from student_trainer.teachers.targets import TeacherTargets


class CachedTeacher:
    """Targets from a teacher cache, memory-mapped.

    Args:
        cache_dir: folder with one cache per split (``train/``, optionally ``val/``).
        data_manifest: the training shard set's manifest (its fingerprint and tokenizer must match).
        k, temperature: what this run asks for; a cache made otherwise is refused.
        teacher_model: when given, the cache must have been made by this teacher.
        verify: check each shard's sha256 when its first row is read, once per shard file (a
            ``verified.json`` stamp in the cache remembers it): no hashing of the whole cache at start.
    """

    def __init__(self, cache_dir: str | Path, data_manifest: dict, k: int, temperature: float,
                 teacher_model: str | None = None, verify: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        splits = sorted(p.name for p in self.cache_dir.iterdir() if (p / "manifest.json").is_file()) \
            if self.cache_dir.is_dir() else []
        if "train" not in splits:
            raise FileNotFoundError(f"{self.cache_dir}/train/manifest.json not found: expected a cache folder written "
                                    f"by `retnet-distill cache --output {self.cache_dir}`")
        expected = {"tokenizer_sha256": data_manifest["tokenizer_sha256"], "k": k, "temperature": temperature,
                    "dataset_fingerprint": data_manifest["fingerprint"]}
        if teacher_model is not None:
            expected["teacher_model"] = teacher_model
        self.readers: dict[str, CacheReader] = {}
        for split in splits:
            reader = CacheReader(self.cache_dir / split, verify="first_read" if verify else False)
            reader.check_compatible(split=split, **expected)
            if not reader.complete:
                raise CacheMismatch(f"teacher cache {self.cache_dir / split} is incomplete; finish it by running the "
                                    "same `retnet-distill cache` command again (it resumes)")
            self.readers[split] = reader
        spec = self.readers["train"].spec
        self.name = f"cached:{spec.teacher_model}"
        self.vocab_size, self.tokenizer_sha256 = spec.vocab_size, spec.tokenizer_sha256
        self.weights_fingerprint = spec.teacher_fingerprint
        self.k, self.temperature = spec.k, spec.temperature

    def targets_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor,
                    split: str = "train") -> TeacherTargets:
        """Targets ``[B, L, k]`` for dataset rows ``indices`` of ``split``; checks the cached input ids."""
        if split not in self.readers:
            raise FileNotFoundError(f"the teacher cache {self.cache_dir} has no {split!r} split; build it with "
                                    f"`retnet-distill cache --split {split}`")
        reader = self.readers[split]
        rows = reader.lookup_many(indices.tolist())
        ids = input_ids.cpu().numpy()
        for b, (row, index) in enumerate(zip(rows, indices.tolist())):
            length = int(lengths[b])
            if row.length != length or not np.array_equal(row.input_ids[:length], ids[b, :length]):
                raise CacheMismatch(
                    f"dataset row {index} ({length} tokens) differs from the cached row ({row.length} tokens): the "
                    f"cache at {reader.directory} was made for other data; rebuild it for this shard set"
                )
        return TeacherTargets.from_rows(
            np.concatenate([row.indices for row in rows]), np.concatenate([row.logprobs for row in rows]),
            np.concatenate([row.tail_logprob for row in rows]), lengths.tolist(), seq_len=input_ids.shape[1],
            temperature=self.temperature,
        )

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
