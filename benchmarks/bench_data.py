"""Data pipeline throughput: preprocessing tokens/s with the embedded tokenizer, dataset batches/s.

Prints JSON lines. Run: .venv/bin/python benchmarks/bench_data.py [--quick]

- preprocess: the Dolly sample (../shared/data) and the embedded python-docs corpus through
  `preprocess` (read, detect, chat-render with assistant masks, tokenize, pack, write shards).
- dataset: random-order batches (deterministic sampler) from the shards of a larger synthetic shard
  set, collated to [B, L] tensors, as the trainer reads them; plus the RSS growth while doing so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from student_trainer.data.preprocess import PreprocessConfig, preprocess
from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, PretokenizedShardDataset, ShardWriter, atomic_write, collate_rows

DOLLY = Path(os.environ.get("RETNET_DOLLY_SAMPLE", Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly-15k-sample.jsonl"))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_preprocess(name: str, inputs: list[str], workdir: Path, seq_len: int) -> None:
    config = PreprocessConfig(inputs=inputs, output=str(workdir / name), max_seq_length=seq_len, progress=False, overwrite=True)
    preprocess(config)  # warm: tokenizer conversion, corpus materialisation, page cache
    started = time.perf_counter()
    manifest = preprocess(config)
    seconds = time.perf_counter() - started
    train = manifest["splits"]["train"]
    docs = manifest["counts"]["records"]
    print(json.dumps({"bench": "preprocess", "input": name, "tokenizer": config.tokenizer, "documents": docs,
                      "tokens": train["tokens"], "seconds": round(seconds, 3), "documents_per_s": round(docs / seconds, 1),
                      "tokens_per_s": round(train["tokens"] / seconds)}))


def bench_dataset(workdir: Path, rows: int, seq_len: int, batch_size: int, batches: int) -> None:
    folder = workdir / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, "train", seq_len, pad_id=0, rows_per_shard=2048)
    rng = np.random.default_rng(0)
    for _ in range(rows):
        writer.add(rng.integers(0, 49152, seq_len, dtype=np.int32), np.ones(seq_len, np.uint8))
    writer.flush()
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": "bench", "max_seq_length": seq_len,
                "splits": {"train": {"rows": rows, "shards": writer.shards}}}
    atomic_write(folder / MANIFEST, json.dumps(manifest).encode())
    dataset = PretokenizedShardDataset(folder)
    sampler = ShardSampler(len(dataset), seed=0)
    before = rss_mb()
    started = time.perf_counter()
    for _ in range(batches):
        batch = collate_rows([dataset[i] for i in sampler.take(batch_size)])
    seconds = time.perf_counter() - started
    print(json.dumps({"bench": "dataset", "rows": rows, "seq_len": seq_len, "batch_size": batch_size, "batches": batches,
                      "shard_bytes": sum(p.stat().st_size for p in folder.glob("*.npy")),
                      "batches_per_s": round(batches / seconds, 1), "tokens_per_s": round(batches * batch_size * seq_len / seconds),
                      "rss_growth_mb": round(rss_mb() - before, 1), "batch_shape": list(batch["input_ids"].shape)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller synthetic shard set")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bench_preprocess("dolly-15k-sample", [str(DOLLY)], workdir, args.seq_len)
        bench_preprocess("python-docs", ["python-docs"], workdir, args.seq_len)
        rows = 2048 if args.quick else 32768
        bench_dataset(workdir, rows, args.seq_len, args.batch_size, batches=200 if args.quick else 2000)


if __name__ == "__main__":
    main()
