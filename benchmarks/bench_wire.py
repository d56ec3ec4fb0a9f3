"""Wire-format benchmark: our msgpack /v1/topk response vs an OpenAI/vLLM-style JSON ``prompt_logprobs``.

For B sequences x L tokens (default 8 x 1024, vocab 49152) and each k (default 64 and 512) it builds
realistic top-k targets (sorted log-softmax of random logits, exact tail from the full vocabulary)
and measures, per format, the encoded size and the median encode / decode time:

* ``msgpack``: ``shared.wire.encode_topk_response`` / ``decode_topk_response`` (ids uint16, fp16 log-probs).
* ``json``:    the same functions with ``fmt="json"`` (our curl-friendly format).
* ``vllm_json``: one dict per position, ``{"<id>": {"logprob", "rank", "decoded_token"}}``, as
  vLLM's OpenAI server returns ``prompt_logprobs``. Encode = building that structure from the arrays
  + ``json.dumps``; decode = ``json.loads`` + conversion back to numpy ids/log-probs (what a trainer
  must do). The format has no tail mass, so the trainer would still have to compute it.

Every line of stdout is one JSON object. Run from the repository root:

    .venv/bin/python benchmarks/bench_wire.py            # full run (~minutes: vLLM JSON at k=512 is big)
    .venv/bin/python benchmarks/bench_wire.py --quick    # 2 x 256 tokens, 2 repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import string
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.wire import TopKResponse, decode_topk_response, encode_topk_response  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def synthetic_vocab(vocab_size: int, rng: np.random.Generator) -> list[str]:
    """Short word-piece-like strings: 1-8 lowercase letters, half with a leading space."""
    letters = np.array(list(string.ascii_lowercase))
    lengths = rng.integers(1, 9, size=vocab_size)
    spaces = rng.random(vocab_size) < 0.5
    return [(" " if sp else "") + "".join(rng.choice(letters, size=n)) for n, sp in zip(lengths, spaces)]


def make_targets(rows: int, vocab: int, k: int, rng: np.random.Generator, chunk: int = 256):
    """Top-k of log_softmax(random logits), sorted descending, plus the exact tail log(1 - sum p_topk)."""
    indices = np.empty((rows, k), np.int32)
    logprobs = np.empty((rows, k), np.float32)
    tail = np.empty(rows, np.float32)
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        # A peaked, heavy-tailed distribution like an LM's: Gumbel noise scaled up a bit.
        logits = rng.gumbel(size=(b - a, vocab)).astype(np.float64) * 2.0
        lse = np.logaddexp.reduce(logits, axis=1)
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        top_vals = np.take_along_axis(logits, top, axis=1)
        order = np.argsort(-top_vals, axis=1)
        top, top_vals = np.take_along_axis(top, order, 1), np.take_along_axis(top_vals, order, 1)
        np.put_along_axis(logits, top, -np.inf, axis=1)
        indices[a:b] = top
        logprobs[a:b] = top_vals - lse[:, None]
        tail[a:b] = np.logaddexp.reduce(logits, axis=1) - lse
    return indices, logprobs, tail


def vllm_encode(indices: np.ndarray, logprobs: np.ndarray, lengths: list[int], vocab: list[str]) -> bytes:
    """OpenAI/vLLM-style body: per sequence, ``prompt_logprobs`` = one {id: {...}} dict per position."""
    ids_rows, lp_rows = indices.tolist(), logprobs.tolist()
    choices, cursor = [], 0
    for s, n in enumerate(lengths):
        positions = [
            {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": vocab[t]} for r, (t, lp) in enumerate(zip(ids, lps))}
            for ids, lps in zip(ids_rows[cursor : cursor + n], lp_rows[cursor : cursor + n])
        ]
        choices.append({"index": s, "prompt_logprobs": positions})
        cursor += n
    return json.dumps({"object": "text_completion", "model": "teacher", "choices": choices}).encode()


def vllm_decode(body: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What a trainer does with that body: parse it and rebuild ``[N, k]`` id and log-prob arrays."""
    positions = [pos for choice in json.loads(body)["choices"] for pos in choice["prompt_logprobs"]]
    n = len(positions)
    ids = np.fromiter((int(t) for pos in positions for t in pos), dtype=np.int32, count=n * k).reshape(n, k)
    lps = np.fromiter((v["logprob"] for pos in positions for v in pos.values()), dtype=np.float32, count=n * k)
    return ids, lps.reshape(n, k)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat): to spot other load."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def timed(fn, reps: int) -> tuple[float, object]:
    """Median wall time in ms over ``reps`` calls, and the last result."""
    times, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=7, help="repetitions (median) for msgpack and our json")
    ap.add_argument("--vllm-reps", type=int, default=3, help="repetitions for the (slow) vLLM-style json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 x 256 tokens, 2 repetitions")
    args = ap.parse_args()
    if args.quick:
        args.sequences, args.tokens, args.reps, args.vllm_reps = 2, 256, 2, 2

    rng = np.random.default_rng(args.seed)
    vocab = synthetic_vocab(args.vocab, rng)
    lengths = [args.tokens] * args.sequences
    rows = sum(lengths)
    emit(bench="wire", sequences=args.sequences, tokens=args.tokens, vocab=args.vocab, ks=args.k,
         reps=args.reps, vllm_reps=args.vllm_reps, python=platform.python_version(), numpy=np.__version__)

    started, busy, mine = time.perf_counter(), machine_busy_s(), time.process_time()
    for k in args.k:
        indices, logprobs, tail = make_targets(rows, args.vocab, k, rng)
        response = TopKResponse(
            model="teacher", tokenizer_sha256="0" * 64, vocab_size=args.vocab, k=k, temperature=1.0,
            lengths=lengths, indices=indices, logprobs=logprobs, tail_logprob=tail,
            timing={"queue_ms": 1.0, "compute_ms": 2.0},
        )

        # Correctness, once: msgpack and our json round-trip exactly at the wire dtypes; vLLM-style too.
        for fmt in ("msgpack", "json"):
            back = decode_topk_response(encode_topk_response(response, fmt), fmt)
            ok = (np.array_equal(back.indices, indices)
                  and np.array_equal(back.logprobs, logprobs.astype(np.float16))
                  and np.array_equal(back.tail_logprob, tail)
                  and np.allclose(back.logprobs.astype(np.float32), logprobs, rtol=1e-3, atol=1e-3))
            emit(check="roundtrip", format=fmt, k=k, ok=bool(ok))
            if not ok:
                return 1
        ids_back, lps_back = vllm_decode(vllm_encode(indices, logprobs, lengths, vocab), k)
        ok = np.array_equal(ids_back, indices) and np.array_equal(lps_back, logprobs)
        emit(check="roundtrip", format="vllm_json", k=k, ok=bool(ok))
        if not ok:
            return 1

        codecs = {
            "msgpack": (lambda: encode_topk_response(response, "msgpack"),
                        lambda body: decode_topk_response(body, "msgpack"), args.reps),
            "json": (lambda: encode_topk_response(response, "json"),
                     lambda body: decode_topk_response(body, "json"), args.reps),
            "vllm_json": (lambda: vllm_encode(indices, logprobs, lengths, vocab),
                          lambda body: vllm_decode(body, k), args.vllm_reps),
        }
        results = {}
        for fmt, (encode, decode, reps) in codecs.items():
            encode_ms, body = timed(encode, reps)
            decode_ms, _ = timed(lambda: decode(body), reps)  # noqa: B023 (called before body changes)
            results[fmt] = (len(body), encode_ms, decode_ms)
        base_bytes, base_enc, base_dec = results["msgpack"]
        for fmt, (nbytes, enc, dec) in results.items():
            emit(format=fmt, k=k, rows=rows, bytes=nbytes, bytes_per_row=round(nbytes / rows, 1),
                 encode_ms=round(enc, 2), decode_ms=round(dec, 2), total_ms=round(enc + dec, 2),
                 bytes_ratio_vs_msgpack=round(nbytes / base_bytes, 2),
                 time_ratio_vs_msgpack=round((enc + dec) / (base_enc + base_dec), 1))
        v_bytes, v_enc, v_dec = results["vllm_json"]
        bytes_ratio, time_ratio = v_bytes / base_bytes, (v_enc + v_dec) / (base_enc + base_dec)
        emit(goal="msgpack >= 10x fewer bytes and >= 50x faster encode+decode than vLLM-style JSON",
             k=k, bytes_ratio=round(bytes_ratio, 1), time_ratio=round(time_ratio, 1),
             bytes_met=bool(bytes_ratio >= 10), time_met=bool(time_ratio >= 50))
    wall = time.perf_counter() - started
    other = max(0.0, machine_busy_s() - busy - (time.process_time() - mine)) / wall
    emit(done=True, wall_s=round(wall, 1), other_cpu_s_per_wall_s=round(other, 2),
         note="other_cpu: cores' worth of CPU used by other processes meanwhile (this benchmark is single-threaded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
