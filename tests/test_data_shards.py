"""The memory-mapped shard dataset and the resumable, rank-aware sampler."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, PretokenizedShardDataset, ShardError, ShardWriter, atomic_write, collate_rows,
)


def write_shard_set(folder: Path, rows: int, seq_len: int, rows_per_shard: int, seed: int = 0) -> np.ndarray:
    """Random rows written with the real ShardWriter; returns the tokens for comparison."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, "train", seq_len, pad_id=0, rows_per_shard=rows_per_shard)
    tokens = rng.integers(1, 1000, size=(rows, seq_len), dtype=np.int32)
    for row in tokens:
        writer.add(row, (row % 2).astype(np.uint8))
    writer.flush()
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": "test", "max_seq_length": seq_len,
                "splits": {"train": {"rows": rows, "shards": writer.shards}}}
    atomic_write(folder / MANIFEST, json.dumps(manifest).encode())
    return tokens


def test_random_access_returns_the_written_rows(tmp_path) -> None:
    tokens = write_shard_set(tmp_path, rows=23, seq_len=8, rows_per_shard=5)
    dataset = PretokenizedShardDataset(tmp_path, verify=True)
    assert len(dataset) == 23
    for i in [0, 4, 5, 17, 22]:
        row = dataset[i]
        np.testing.assert_array_equal(row["input_ids"].numpy(), tokens[i])
        np.testing.assert_array_equal(row["loss_mask"].numpy(), tokens[i] % 2 == 1)
        assert row["length"] == 8 and row["index"] == i
    batch = collate_rows([dataset[i] for i in (3, 9)])
    assert batch["input_ids"].shape == (2, 8) and batch["indices"].tolist() == [3, 9]
    with pytest.raises(IndexError):
        dataset[23]


def test_truncated_missing_and_corrupted_shards_are_named(tmp_path) -> None:
    write_shard_set(tmp_path, rows=10, seq_len=8, rows_per_shard=5)
    victim = tmp_path / "train-00001.tokens.npy"
    data = victim.read_bytes()
    victim.write_bytes(data[:-20])
    with pytest.raises(ShardError, match="train-00001.tokens.npy is truncated"):
        PretokenizedShardDataset(tmp_path)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    victim.write_bytes(bytes(flipped))
    PretokenizedShardDataset(tmp_path)  # same size: only the checksum can tell
    with pytest.raises(ShardError, match=r"train-00001.tokens.npy is corrupted: its sha256"):
        PretokenizedShardDataset(tmp_path, verify=True)
    victim.unlink()
    with pytest.raises(ShardError, match="train-00001.tokens.npy is missing"):
        PretokenizedShardDataset(tmp_path)
    with pytest.raises(ShardError, match="no split 'val'"):
        PretokenizedShardDataset(tmp_path, split="val")
    with pytest.raises(ShardError, match="manifest.json not found"):
        PretokenizedShardDataset(tmp_path / "elsewhere")


def test_sampler_is_a_deterministic_per_epoch_permutation() -> None:
    a, b = ShardSampler(50, seed=3), ShardSampler(50, seed=3)
    first, again = list(a), list(b)
    assert first == again and sorted(first) == list(range(50)) and first != list(range(50))
    assert list(a) != first  # epoch 1 differs from epoch 0
    assert list(ShardSampler(50, seed=4)) != first
    assert list(ShardSampler(50, shuffle=False)) == list(range(50))


def test_sampler_resumes_exactly_mid_epoch() -> None:
    reference = ShardSampler(37, seed=1)
    expected = reference.take(100)  # crosses two epoch boundaries
    first = ShardSampler(37, seed=1)
    seen = first.take(45)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as JSON
    resumed = ShardSampler(37, seed=1)
    resumed.load_state_dict(state)
    assert seen + resumed.take(55) == expected
    with pytest.raises(ValueError, match="seed=1 but this run has seed=2"):
        ShardSampler(37, seed=2).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_partition_every_epoch_without_overlap_or_loss(world_size: int) -> None:
    rows = 101
    for epoch in (0, 1):
        parts = [ShardSampler(rows, seed=7, rank=r, world_size=world_size).epoch_indices(epoch) for r in range(world_size)]
        combined = np.concatenate(parts)
        assert sorted(combined.tolist()) == list(range(rows))
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_iterating_two_gigabytes_keeps_rss_flat(tmp_path) -> None:
    """>= 2 GB of shards on disk; reading every row raises RSS by less than 100 MB."""
    seq_len, rows_per_shard, shards = 2048, 16384, 13  # 13 x 16384 x 2048 x 5 bytes = 2.2 GB
    writer_rows = rows_per_shard * shards
    records = []
    for index in range(shards):  # written with open_memmap so the test itself never holds 2 GB
        files = {}
        for name, dtype, shape in (("tokens", np.int32, (rows_per_shard, seq_len)), ("mask", np.uint8, (rows_per_shard, seq_len)),
                                   ("lengths", np.int32, (rows_per_shard,))):
            filename = f"train-{index:05d}.{name}.npy"
            array = np.lib.format.open_memmap(tmp_path / filename, mode="w+", dtype=dtype, shape=shape)
            array[...] = index + 1 if name != "lengths" else seq_len
            array.flush()
            del array
            files[name] = filename
        records.append({"rows": rows_per_shard, "files": files, "sha256": {}})
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": "big", "max_seq_length": seq_len,
                "splits": {"train": {"rows": writer_rows, "shards": records}}}
    atomic_write(tmp_path / MANIFEST, json.dumps(manifest).encode())
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.npy"))
    assert on_disk >= 2 * 1024**3

    dataset = PretokenizedShardDataset(tmp_path)
    before = _rss_bytes()
    peak, checksum = before, 0
    for i, index in enumerate(ShardSampler(len(dataset), seed=0)):
        row = dataset[index]
        checksum += int(row["input_ids"][0])
        if i % 4096 == 0:
            peak = max(peak, _rss_bytes())
    peak = max(peak, _rss_bytes())
    assert checksum == sum((s + 1) * rows_per_shard for s in range(shards))
    assert peak - before < 100 * 1024**2, f"RSS grew by {(peak - before) / 1024**2:.0f} MB"


def test_a_confined_reader_refuses_symlinked_files_and_maps_what_it_opened(tmp_path) -> None:
    """The teacher service's cache jobs read shard sets with ``follow_symlinks=False``: a shard file
    or manifest replaced by a symlink (to a file outside the data root) is refused; a plain reader
    (the trainer's own data) follows links as before."""
    import shutil

    from shared.token_shards import TokenShardReader

    tokens = write_shard_set(tmp_path / "data", rows=10, seq_len=8, rows_per_shard=5)
    np.testing.assert_array_equal(TokenShardReader(tmp_path / "data", follow_symlinks=False).row(7)[0], tokens[7])
    manifest = json.loads((tmp_path / "data" / MANIFEST).read_text())
    victim = tmp_path / "data" / manifest["splits"]["train"]["shards"][1]["files"]["tokens"]
    outside = tmp_path / "outside.npy"
    shutil.move(victim, outside)
    os.symlink(outside, victim)
    with pytest.raises(ShardError, match="is a symlink"):
        TokenShardReader(tmp_path / "data", follow_symlinks=False)
    np.testing.assert_array_equal(TokenShardReader(tmp_path / "data").row(7)[0], tokens[7])
    shutil.move(tmp_path / "data" / MANIFEST, tmp_path / "manifest-outside.json")
    os.symlink(tmp_path / "manifest-outside.json", tmp_path / "data" / MANIFEST)
    with pytest.raises(ShardError, match="is a symlink"):
        TokenShardReader(tmp_path / "data", follow_symlinks=False)
