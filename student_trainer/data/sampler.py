"""A deterministic, resumable, rank-aware order over dataset rows.

Epoch ``e`` visits the permutation ``default_rng([seed, e]).permutation(n)``; rank ``r`` of ``w``
takes every ``w``-th entry starting at ``r``, so the ranks partition each epoch exactly (no row
twice, no row lost; ranks differ by at most one row). ``state_dict()`` is ``(epoch, position)``
in that order, so a run resumed from it continues with exactly the rows an uninterrupted run
would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class ShardSampler:
    """Row indices for one rank, epoch after epoch.

    Args:
        num_rows: rows in the dataset.
        seed: shuffling seed (the same on every rank).
        rank, world_size: this process's place in a data-parallel job.
        shuffle: False visits rows in order (evaluation).
    """

    def __init__(self, num_rows: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise ValueError(f"num_rows must be positive, found {num_rows}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), found {rank}")
        if num_rows < world_size:
            raise ValueError(f"{num_rows} rows cannot be split over {world_size} ranks")
        self.num_rows, self.seed, self.rank, self.world_size, self.shuffle = num_rows, seed, rank, world_size, shuffle
        self.epoch = 0
        self.position = 0  # rows of this epoch already handed out by this rank

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's rows of ``epoch``, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.epoch_indices(0))

    def __iter__(self) -> Iterator[int]:
        """The rest of the current epoch; afterwards the sampler stands at the start of the next one."""
        order = self.epoch_indices(self.epoch)
        while self.position < len(order):
            index = int(order[self.position])
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def take(self, count: int) -> list[int]:
        """The next ``count`` rows, crossing into the next epoch when this one runs out."""
        rows: list[int] = []
        while len(rows) < count:
            order = self.epoch_indices(self.epoch)
            end = min(len(order), self.position + count - len(rows))
            rows.extend(int(i) for i in order[self.position : end])
            self.position = end
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_rows": self.num_rows, "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` left off; refuses a state made for another data set or layout."""
        for key in ("seed", "num_rows", "world_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this run has {key}={getattr(self, key)!r}; "
                    "resume with the same data, seed and number of ranks"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
