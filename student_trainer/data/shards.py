"""The trainer's view of pre-tokenized shards: a torch ``Dataset`` and batch collation.

The on-disk format, its writer and the memory-mapped reader live in :mod:`shared.token_shards`
(the teacher server reads the same files); this module adds torch tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.token_shards import (  # noqa: F401  (re-exported: the trainer's single import point)
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    ShardError,
    ShardWriter,
    TokenShardReader,
    atomic_write,
    read_manifest,
    sha256_file,
)


class PretokenizedShardDataset(torch.utils.data.Dataset):
    """Random access to the rows of one split of a shard folder, memory-mapped (flat RSS).

    ``dataset[i]`` is ``{"input_ids": int64 [L], "loss_mask": bool [L], "length": int, "index": int}``.
    Arguments as :class:`shared.token_shards.TokenShardReader`.
    """

    def __init__(self, folder: str | Path, split: str = "train", verify: bool = False, release_bytes: int = 64 << 20) -> None:
        self.reader = TokenShardReader(folder, split, verify, release_bytes)
        self.folder, self.split, self.seq_len, self.manifest = self.reader.folder, split, self.reader.seq_len, self.reader.manifest

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tokens, mask, length = self.reader.row(index)
        return {
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "loss_mask": torch.from_numpy(mask.astype(bool)),
            "length": length,
            "index": index,
        }

    @property
    def fingerprint(self) -> str:
        return self.reader.fingerprint


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset rows into ``input_ids [B, L]``, ``loss_mask [B, L]``, ``lengths [B]``, ``indices [B]``."""
    return {
        "input_ids": torch.stack([r["input_ids"] for r in rows]),
        "loss_mask": torch.stack([r["loss_mask"] for r in rows]),
        "lengths": torch.tensor([r["length"] for r in rows], dtype=torch.int64),
        "indices": torch.tensor([r["index"] for r in rows], dtype=torch.int64),
    }
