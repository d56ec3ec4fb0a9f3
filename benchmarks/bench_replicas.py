"""Network-mode throughput with 1 vs 2 teacher replicas: do several ``teacher_url``s share the load?

One script, the same batches for both rows: two real teacher services (``python -m teacher_server``
on loopback, ``--threads`` torch threads each) are started, then a :class:`NetworkTeacher` fetches
the targets of ``--batches`` training batches with ``--depth`` requests in flight (as the training
loop's prefetch does), first pointed at one replica, then at both. Reported per row: batches/s,
target tokens/s, the requests each replica served, and the ratio of the two rows. With replicas
that share load the ratio approaches the number of replicas (when the cores allow: each service
here gets ``--threads`` of the machine's); with failover-only replicas it stays at 1.

    .venv/bin/python benchmarks/bench_replicas.py                # embedded SmolLM2, 12 batches of 4 x 128
    .venv/bin/python benchmarks/bench_replicas.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_trainer.teachers.process import LocalTeacher  # noqa: E402
from student_trainer.teachers.network import NetworkTeacher  # noqa: E402


def fetch_all(teacher: NetworkTeacher, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              depth: int) -> float:
    """Seconds to get every batch's targets with ``depth`` requests in flight."""
    started = time.perf_counter()
    for ids, lengths, indices in batches[:depth]:
        teacher.prefetch(ids, lengths, indices)
    for i, (ids, lengths, indices) in enumerate(batches):
        if i + depth < len(batches):
            teacher.prefetch(*batches[i + depth])
        teacher.targets_for(ids, lengths, indices)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4, help="requests in flight")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per teacher service")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    env = {"TEACHER_TORCH_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalTeacher(args.model, Path(tmp) / "a.log", env=env) as a, \
            LocalTeacher(args.model, Path(tmp) / "b.log", env=env) as b:
        import httpx

        info = httpx.get(f"{a.url}/v1/models").json()["data"][0]
        rng = np.random.default_rng(0)
        batches = []
        for n in range(args.batches + 1):  # the first one warms both services up
            ids = torch.from_numpy(rng.integers(0, info["vocab_size"], size=(args.rows, args.tokens)))
            batches.append((ids, torch.full((args.rows,), args.tokens), torch.arange(n * args.rows, (n + 1) * args.rows)))
        rows = []
        for urls in ([a.url], [a.url, b.url]):
            teacher = NetworkTeacher(urls, args.k, 1.0, info["tokenizer_sha256"], info["vocab_size"],
                                     teacher_model=info["id"])
            try:
                for url in urls:  # warm-up of each replica, not timed
                    single = NetworkTeacher([url], args.k, 1.0, info["tokenizer_sha256"], info["vocab_size"])
                    single.targets_for(*batches[0])
                    single.close()
                seconds = fetch_all(teacher, batches[1:], args.depth)
                rows.append({"replicas": len(urls), "batches": args.batches, "seconds": round(seconds, 2),
                             "batches_per_s": round(args.batches / seconds, 3),
                             "tokens_per_s": round(args.batches * args.rows * args.tokens / seconds, 1),
                             "requests_per_replica": teacher.requests_per_url})
            finally:
                teacher.close()
    rows[1]["speedup_vs_1"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    print(f"{'replicas':>8} {'s':>7} {'batches/s':>10} {'tokens/s':>9}  requests per replica")
    for row in rows:
        print(f"{row['replicas']:>8} {row['seconds']:>7} {row['batches_per_s']:>10} {row['tokens_per_s']:>9}  "
              f"{row['requests_per_replica']}")
    print(f"2 replicas vs 1: {rows[1]['speedup_vs_1']}x ({os.cpu_count()} cores, {args.threads} thread(s) per service)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
