"""Server overhead benchmark: engine throughput called directly vs through ``POST /v1/topk`` on loopback.

Same model, same tokens, same k and temperature:

1. direct:  ``HFEngine.topk([EngineRequest(...)])`` on each request in turn, after a warm-up.
2. server:  the real server (``python -m teacher_server``) as a subprocess on 127.0.0.1; the same
   requests are sent by ``--clients`` concurrent httpx.AsyncClient's as msgpack bodies, responses
   decoded with ``shared.wire.decode_topk_response`` and checked against the direct engine's rows.
   Timed end to end (request encoding, HTTP, batching, engine, response decoding).
3. direct again (the engine is freed while the server runs: small machines have few cores), so
   drift between the two direct runs is visible; the ratio uses their mean.

Both runs use torch's default thread count unless ``--threads`` is given. Each phase also reports
``other_cpu_s_per_wall_s``: cores' worth of CPU that other processes used meanwhile (from /proc/stat);
above ~0.1 the phase was disturbed (on a shared 2-core box a 2-thread torch pool then slows 2-5x).
Every line of stdout is one JSON object. From the repository root:

    .venv/bin/python benchmarks/bench_server.py           # 16 requests x 2 x 256 tokens, k=64
    .venv/bin/python benchmarks/bench_server.py --quick   # 4 requests x 2 x 64 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.wire import MSGPACK, decode_topk_response, encode_topk_request  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def run_direct(args, workload: list[list[np.ndarray]] | None, label: str):
    """Load the engine, warm up, time every request in turn; returns (workload, rows per request, tok/s)."""
    import torch

    from teacher_server.engines.base import EngineRequest
    from teacher_server.engines.hf import HFEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    engine = HFEngine(args.model, device=args.device, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - started
    if workload is None:  # random ids over the whole vocabulary, seeded: the same for every run
        rng = np.random.default_rng(args.seed)
        workload = [[rng.integers(0, engine.vocab_size, size=args.tokens, dtype=np.int64)
                     for _ in range(args.sequences)] for _ in range(args.requests)]
    make = lambda seqs: [EngineRequest(seqs, args.k, args.temperature)]  # noqa: E731
    engine.topk(make(workload[0]))  # warm-up
    rows, started, cpu, busy = [], time.perf_counter(), time.process_time(), machine_busy_s()
    for seqs in workload:
        rows.append(engine.topk(make(seqs))[0])
    seconds, cpu, busy = time.perf_counter() - started, time.process_time() - cpu, machine_busy_s() - busy
    tokens = sum(len(s) for seqs in workload for s in seqs)
    emit(run=label, model=engine.model_name, device=engine.device, dtype=str(engine.dtype),
         torch_threads=torch.get_num_threads(), load_s=round(load_s, 1), tokens=tokens,
         seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1),
         cpu_s_per_wall_s=round(cpu / seconds, 2), other_cpu_s_per_wall_s=round(max(0.0, busy - cpu) / seconds, 2))
    del engine
    gc.collect()
    return workload, rows, tokens / seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); a low CPU/wall ratio means contention."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


async def run_clients(args, url: str, workload: list[list[np.ndarray]], server_pid: int):
    """Warm up (one request per client), then send every request from ``args.clients`` clients.

    Returns the decoded responses, wall seconds, and CPU seconds of (server, clients, other processes).
    """
    responses: list = [None] * len(workload)
    headers = {"content-type": MSGPACK, "accept": MSGPACK}

    async def post(http: httpx.AsyncClient, seqs: list[np.ndarray]):
        body = encode_topk_request(seqs, k=args.k, temperature=args.temperature, fmt="msgpack")
        reply = await http.post("/v1/topk", content=body, headers=headers)
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
        return decode_topk_response(reply.content, "msgpack")

    async def client(http: httpx.AsyncClient, queue: asyncio.Queue) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            responses[i] = await post(http, workload[i])

    clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in range(args.clients)]
    try:
        await asyncio.gather(*(post(http, workload[i % len(workload)]) for i, http in enumerate(clients)))
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(len(workload)):
            queue.put_nowait(i)
        started, busy = time.perf_counter(), machine_busy_s()
        cpu, mine = cpu_seconds(server_pid), time.process_time()
        await asyncio.gather(*(client(http, queue) for http in clients))
        seconds, busy = time.perf_counter() - started, machine_busy_s() - busy
        cpu, mine = cpu_seconds(server_pid) - cpu, time.process_time() - mine
    finally:
        await asyncio.gather(*(http.aclose() for http in clients))
    return responses, seconds, (cpu, mine, max(0.0, busy - cpu - mine))


def check(responses, direct_rows) -> dict:
    """Server rows vs direct rows: ids equal (first request and overall), log-probs within fp16 tolerance."""
    first_equal = bool(np.array_equal(responses[0].indices, direct_rows[0].indices))
    mismatch = sum(int((r.indices != d.indices).sum()) for r, d in zip(responses, direct_rows))
    total = sum(d.indices.size for d in direct_rows)
    lp_err = max(float(np.abs(r.logprobs.astype(np.float32) - d.logprobs).max()) for r, d in zip(responses, direct_rows))
    lp_close = all(np.allclose(r.logprobs.astype(np.float32), d.logprobs, rtol=1e-3, atol=1e-3)
                   for r, d in zip(responses, direct_rows))
    tail_close = all(np.allclose(r.tail_logprob, d.tail_logprob, rtol=1e-3, atol=1e-3)
                     for r, d in zip(responses, direct_rows))
    return {"first_request_indices_equal": first_equal, "index_mismatch_frac": mismatch / total,
            "logprobs_max_abs_err": round(lp_err, 5), "logprobs_close": bool(lp_close),
            "tail_close": bool(tail_close), "ok": first_equal and bool(lp_close) and bool(tail_close)}


def run_server(args, workload, direct_rows):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TEACHER_MODEL_CACHE_DIR": args.cache_dir, "TEACHER_DEVICE": args.device}
    if args.threads:  # torch reads OMP_NUM_THREADS for its intra-op pool
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "teacher_server", "--model", args.model, "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", prefix="bench_server_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = wait_ready(proc, url, args.ready_timeout)
        responses, seconds, cpu = asyncio.run(run_clients(args, url, workload, proc.pid))
        tokens = sum(len(s) for seqs in workload for s in seqs)
        emit(run="server", url=url, clients=args.clients, ready_s=round(ready_s, 1), tokens=tokens,
             seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1), server_cpu_s_per_wall_s=round(cpu[0] / seconds, 2),
             client_cpu_s_per_wall_s=round(cpu[1] / seconds, 2), other_cpu_s_per_wall_s=round(cpu[2] / seconds, 2),
             mean_queue_ms=round(float(np.mean([r.timing["queue_ms"] for r in responses])), 1),
             mean_compute_ms=round(float(np.mean([r.timing["compute_ms"] for r in responses])), 1))
        result = check(responses, direct_rows)
        emit(check="server_vs_direct", **result)
        return tokens / seconds, result["ok"]
    except BaseException:
        log.flush()
        log.seek(0)
        print(f"--- server log ({log.name}) ---\n{log.read()[-4000:]}", file=sys.stderr)
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        emit(run="server_stop", signal="SIGTERM", exit_code=code, log=log.name)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="anything HFEngine / --model accepts")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (both runs)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/retnet-distill/models"))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=2, help="sequences per request")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both runs (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="4 requests x 2 x 64 tokens")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.tokens = 4, 64
    emit(bench="server", model=args.model, requests=args.requests, sequences=args.sequences,
         tokens=args.tokens, k=args.k, temperature=args.temperature, clients=args.clients, threads=args.threads or "default", seed=args.seed)

    workload, direct_rows, direct_1 = run_direct(args, None, "direct_1")
    server, ok = run_server(args, workload, direct_rows)
    _, _, direct_2 = run_direct(args, workload, "direct_2")
    direct = (direct_1 + direct_2) / 2
    emit(summary="server_vs_direct", direct_1_tok_s=round(direct_1, 1), direct_2_tok_s=round(direct_2, 1),
         direct_mean_tok_s=round(direct, 1), direct_drift=round(abs(direct_1 - direct_2) / direct, 3),
         server_tok_s=round(server, 1), ratio=round(server / direct, 3), correct=ok)
    emit(goal="server throughput >= 0.9 x direct engine", ratio=round(server / direct, 3), met=bool(server / direct >= 0.9))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
