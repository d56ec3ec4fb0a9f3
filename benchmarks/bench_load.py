"""Load benchmark of the teacher service (issue 13): concurrency, malformed traffic, memory.

For each number of concurrent clients N (default 1, 8, 32) and each share of malformed requests
(default 0 and 20%), N httpx.AsyncClient workers send requests back to back for ``--duration``
seconds. A good request is ``--sequences`` x ``--tokens`` random ids at k=``--k`` (msgpack); a bad one
is drawn from a fixed list of malformed bodies (broken msgpack, a non-string dtype, 100 dimensions,
deep nesting, a 400-digit temperature, mixed key types, k too large, a tiny temperature, an
oversized body). Reported per row:

- throughput: answered requests per second (good and bad), and good ones per second;
- p50 / p99 latency of good requests (ms);
- 4xx and 5xx counts, and good requests that failed (anything but a 200, or a transport error);
- server RSS before and after the row (from /proc/<pid>/status, when the server is local).

Goals (issue 13): no 5xx, no good request failed, p99 bounded under overload, RSS back within 10%
of the start. Without ``--url`` a server is started on a tiny random Llama (2 layers, 320 tokens);
with ``--url`` the given server is used (no RSS then). From the repository root:

    .venv/bin/python benchmarks/bench_load.py                       # 5 s per row, 6 rows
    .venv/bin/python benchmarks/bench_load.py --duration 2 --json load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.wire import MSGPACK, encode_topk_request  # noqa: E402


def bad_bodies(max_body_bytes: int) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of requests that must each get a 4xx."""
    pack = lambda obj: msgpack.packb(obj, use_bin_type=True)  # noqa: E731
    deep = b"\x82" + pack("input_ids") + pack([[1]]) + pack("k") + b"\x91" * 1000 + b"\x01"
    return [
        ("broken msgpack", b"\xc1\x00\xff", MSGPACK),
        ("dtype a list", pack({"input_ids": {"dtype": ["int32"], "shape": [1], "data": b"\0" * 4}, "lengths": [1]}), MSGPACK),
        ("100 dimensions", pack({"input_ids": {"dtype": "uint8", "shape": [1] * 100, "data": b"\1"}}), MSGPACK),
        ("deep nesting", deep, MSGPACK),
        ("400-digit temperature", b'{"input_ids": [[1]], "temperature": 1' + b"0" * 400 + b"}", "application/json"),
        ("mixed key types", pack({"input_ids": [[1]], b"x": 1, "y": 2}), MSGPACK),
        ("k too large", encode_topk_request([[1, 2]], k=10**6), MSGPACK),
        ("tiny temperature", encode_topk_request([[1, 2]], k=4, temperature=1e-38), MSGPACK),
        ("oversized body", b"\0" * (max_body_bytes + 1), MSGPACK),
    ]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


async def run_row(url: str, clients: int, bad_share: float, args, bad: list, vocab: int) -> dict:
    """N workers for ``args.duration`` seconds; returns the row's figures."""
    rng = random.Random(clients * 1000 + int(bad_share * 100))
    latencies: list[float] = []
    counts = {"answered": 0, "good_ok": 0, "good_failed": 0, "4xx": 0, "5xx": 0, "bad_not_4xx": 0}
    stop_at = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient, seed: int) -> None:
        ids = np.random.default_rng(seed)
        while time.monotonic() < stop_at:
            is_bad = rng.random() < bad_share
            if is_bad:
                _, body, content_type = rng.choice(bad)
            else:
                sequences = [ids.integers(0, vocab, args.tokens) for _ in range(args.sequences)]
                body, content_type = encode_topk_request(sequences, k=args.k), MSGPACK
            started = time.perf_counter()
            try:
                response = await client.post("/v1/topk", content=body, headers={"Content-Type": content_type})
            except httpx.HTTPError:
                counts["good_failed" if not is_bad else "bad_not_4xx"] += 1
                continue
            counts["answered"] += 1
            status = response.status_code
            counts["4xx"] += 400 <= status < 500
            counts["5xx"] += status >= 500
            if is_bad:
                counts["bad_not_4xx"] += not 400 <= status < 500
            elif status == 200:
                counts["good_ok"] += 1
                latencies.append(time.perf_counter() - started)
            else:
                counts["good_failed"] += 1

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client, i) for i in range(clients)))
    wall = time.monotonic() - started
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"clients": clients, "bad_share": bad_share, "seconds": round(wall, 2),
            "req_per_s": round(counts["answered"] / wall, 1), "good_per_s": round(counts["good_ok"] / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            **counts}


def table(rows: list[dict], rss: list[tuple[float | None, float | None]]) -> str:
    head = ["clients", "bad", "req/s", "good/s", "p50 ms", "p99 ms", "4xx", "5xx", "good failed", "RSS MB before -> after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, (before, after) in zip(rows, rss):
        memory = f"{before:.0f} -> {after:.0f}" if before is not None else "n/a"
        lines.append(f"| {row['clients']} | {row['bad_share']:.0%} | {row['req_per_s']} | {row['good_per_s']} | "
                     f"{row['p50_ms']} | {row['p99_ms']} | {row['4xx']} | {row['5xx']} | {row['good_failed']} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an already running teacher service (default: start one on a tiny model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--bad-share", type=float, default=0.2, help="share of malformed requests in the mixed rows")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per row")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    server, pid = None, None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url is None:
            from student_trainer.teachers.process import LocalTeacher
            from tests.conftest import build_tiny_llama

            model = build_tiny_llama(Path(tmp) / "tiny")
            server = LocalTeacher(str(model), Path(tmp) / "teacher.log", env={"TEACHER_TORCH_THREADS": "1"}, ready_timeout=180)
            server.__enter__()
            url, pid = server.url, server.proc.pid
        else:
            url = args.url.rstrip("/")
        try:
            info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
            bad = bad_bodies(info["max_body_bytes"])
            rows, rss = [], []
            start_rss = rss_mb(pid)
            for clients in args.clients:
                for share in (0.0, args.bad_share):
                    before = rss_mb(pid)
                    rows.append(asyncio.run(run_row(url, clients, share, args, bad, info["vocab_size"])))
                    rss.append((before, rss_mb(pid)))
                    print(json.dumps(rows[-1]), flush=True)
            end_rss = rss_mb(pid)
        finally:
            if server is not None:
                server.stop()
    print(table(rows, rss))
    if start_rss is not None:
        print(f"server RSS: {start_rss:.0f} MB at the start, {end_rss:.0f} MB at the end "
              f"({(end_rss - start_rss) / start_rss:+.1%})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "rss_mb": rss, "start_rss_mb": start_rss, "end_rss_mb": end_rss}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
