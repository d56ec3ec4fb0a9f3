"""Serving side by side: the student server (``retnet-distill serve``, continuous batching over O(1)
recurrent states) against the teacher generating with its KV cache (Hugging Face ``generate``), on the
same prompts, at several context lengths and numbers of concurrent streams. Issue 16, item 5.

Run: .venv/bin/python benchmarks/bench_serve.py [--student RUN_OR_EXPORT] [--contexts 128 1024 4096]
     [--streams 1 8 32] [--new-tokens 32] [--output benchmarks/results-serve.json]

- Prompts: real text (the Dolly sample's records, concatenated and tokenized with the teacher's
  tokenizer), exactly ``context`` token ids each, a different stretch of the text per stream. Both sides
  get the same ids; both decode greedily ``--new-tokens`` tokens past any end-of-text token.
- Student: a fresh ``retnet-distill serve`` process per cell (context x streams); the streams are sent together as
  ``POST /v1/completions`` with token-id prompts, ``stream: true`` and ``ignore_eos``, and timed at every
  server-sent chunk. Without ``--student``, the embedded teacher's weights are copied into a student of
  its shape (no training: speed does not depend on the weights' values).
- Teacher: the embedded SmolLM2-135M-Instruct (fp32) in a fresh worker process per context, one
  ``model.generate`` call over the streams' prompts as one batch (static batching: all prompts have one
  length), timed at every generated token through a stopping criterion.
- Figures per cell: time to first token (mean and max over streams); decode tokens/s = the sum over the
  streams of each one's decode rate (tokens after its first / (its last token - its first token), i.e.
  1 / time per output token); output tokens/s = all tokens / the cell's wall time (prefill included);
  inter-token latency p50 / p99 / max over every stream's gaps; the peak RSS of the serving process
  (sampled every 20 ms) and its RSS before the cell.

Goals (issue 16): at 32 streams and 4,096 context the student decodes >= 5x the teacher's tokens/s;
the student server's peak RSS within 10% from 128 to 4,096 context; p99 inter-token latency at 32
streams <= 2x that at 1 stream. Prints JSON lines and a table; writes ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly-15k-sample.jsonl"
TEACHER = "smollm2-135m-instruct"


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def rss_bytes(pid: int) -> int:
    """The resident set of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread: ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_bytes(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def text_ids(tokenizer: Any, needed: int) -> list[int]:
    """At least ``needed`` token ids of real text (the Dolly records, repeated if the sample is short)."""
    records = [json.loads(line) for line in DOLLY.read_text().splitlines() if line.strip()]
    text = "\n\n".join(f"{r['instruction']}\n{r.get('context') or ''}\n{r['response']}" for r in records)
    ids = tokenizer(text)["input_ids"]
    while len(ids) < needed:
        ids = ids + ids
    return ids


def stream_prompts(ids: list[int], streams: int, context: int) -> list[list[int]]:
    """``streams`` prompts of ``context`` ids, each from another stretch of the text."""
    return [ids[i * context:(i + 1) * context] for i in range(streams)]


def cell_figures(first: list[float], last: list[float], gaps: list[float], tokens: list[int], start: float
                 ) -> dict[str, float]:
    """The figures of one cell from each stream's first/last token times, all inter-token gaps and counts."""
    gaps = sorted(gaps)
    # each stream's decode rate (1 / time per output token after its first), summed over the streams
    decode_rate = sum((n - 1) / (b - a) for a, b, n in zip(first, last, tokens) if b > a)
    pick = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else float("nan")  # noqa: E731
    return {"ttft_mean_s": round(statistics.mean(f - start for f in first), 3),
            "ttft_max_s": round(max(first) - start, 3),
            "decode_tokens_per_s": round(decode_rate, 2),
            "output_tokens_per_s": round(sum(tokens) / (max(last) - start), 2),
            "itl_p50_ms": round(1000 * pick(0.5), 1), "itl_p99_ms": round(1000 * pick(0.99), 1),
            "itl_max_ms": round(1000 * gaps[-1], 1) if gaps else None,
            "wall_s": round(max(last) - start, 2), "tokens": sum(tokens)}


# ----- the student server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(student: str, tokenizer: str | None, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "student_trainer", "serve", student, "--port", str(port), "--model-id", "student"]
    if tokenizer:
        command += ["--tokenizer", tokenizer]
    env = {**os.environ, "STUDENT_SERVE_MAX_TOKENS_LIMIT": "4096", "STUDENT_SERVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the student server exited ({process.returncode}); see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the student server was not ready within 300 s; see {log_path}")
        time.sleep(0.5)


async def one_stream(client: Any, url: str, prompt: list[int], new_tokens: int) -> tuple[list[float], int]:
    """Send one streaming completion; the arrival time of every chunk with text and the token count."""
    body = {"model": "student", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return times, tokens


async def student_cell(url: str, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=httpx.Limits(max_connections=256)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, p, new_tokens) for p in prompts))
    gaps = [b - a for times, _ in results for a, b in zip(times, times[1:])]
    return cell_figures([t[0] for t, _ in results], [t[-1] for t, _ in results], gaps, [n for _, n in results], start)


def run_student(args: argparse.Namespace, student: str, tokenizer: str | None, ids: list[int]) -> list[dict[str, Any]]:
    """One fresh server per cell: a cell's peak RSS is its own, not what an earlier cell's allocations left."""
    rows = []
    for context in args.contexts:
        for streams in args.streams:
            port = free_port()
            server = start_server(student, tokenizer, port, Path(args.workdir) / f"serve-{context}-{streams}.log")
            try:
                before = rss_bytes(server.pid)
                with PeakRss(server.pid) as rss:
                    figures = asyncio.run(student_cell(f"http://127.0.0.1:{port}", stream_prompts(ids, streams, context),
                                                       args.new_tokens))
                rows.append({"system": "student", "context": context, "streams": streams, **figures,
                             "rss_before_mb": round(before / 2**20), "rss_peak_mb": round(rss.peak / 2**20)})
                emit(bench="serve", **rows[-1])
            finally:
                server.terminate()
                server.wait(30)
    return rows


# ----- the teacher (HF generate with its KV cache), in a worker process --------------------------------


def teacher_worker(args: argparse.Namespace) -> None:
    """Read jobs (JSON lines: prompts, new_tokens) on stdin; answer each with its token times."""
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from teacher_server.engines.model_source import resolve_model

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TEACHER, args.model_cache_dir).path,
                                                 dtype=torch.float32).eval()

    class Clock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.size(0), dtype=torch.bool)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        ids = torch.tensor(job["prompts"])
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["new_tokens"],
                           min_new_tokens=job["new_tokens"], do_sample=False, pad_token_id=0,
                           stopping_criteria=StoppingCriteriaList([clock]))
        print(json.dumps({"start": start, "times": clock.times}), flush=True)


def run_teacher(args: argparse.Namespace, ids: list[int]) -> list[dict[str, Any]]:
    rows = []
    for context in args.contexts:
        worker = subprocess.Popen([sys.executable, __file__, "--teacher-worker", "--threads", str(args.threads),
                                   "--model-cache-dir", args.model_cache_dir], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert worker.stdout is not None and worker.stdin is not None
            json.loads(worker.stdout.readline())  # ready
            for streams in args.streams:
                before = rss_bytes(worker.pid)
                with PeakRss(worker.pid) as rss:
                    worker.stdin.write(json.dumps({"prompts": stream_prompts(ids, streams, context),
                                                   "new_tokens": args.new_tokens}) + "\n")
                    worker.stdin.flush()
                    answer = json.loads(worker.stdout.readline())
                times = answer["times"]
                gaps = [b - a for a, b in zip(times, times[1:])] * streams  # every row gets each step's token
                figures = cell_figures([times[0]] * streams, [times[-1]] * streams, gaps, [len(times)] * streams,
                                       answer["start"])
                rows.append({"system": "teacher", "context": context, "streams": streams, **figures,
                             "rss_before_mb": round(before / 2**20), "rss_peak_mb": round(rss.peak / 2**20)})
                emit(bench="serve", **rows[-1])
        finally:
            worker.kill()
            worker.wait()
    return rows


# ----- the report ---------------------------------------------------------------------------------------


def prepare_student(args: argparse.Namespace) -> tuple[str, str | None]:
    """The student to serve: ``--student``, or the embedded teacher's weights copied into a student of its shape."""
    if args.student:
        return args.student, args.tokenizer
    import torch

    from student_trainer.model.student import RetNetStudent
    from student_trainer.model.retrofit import copy_teacher_weights, load_teacher_lm, student_config_for

    folder = Path(args.workdir) / "student"
    if not (folder / "config.json").is_file():
        teacher_lm, _, _ = load_teacher_lm(TEACHER, args.model_cache_dir)
        student = RetNetStudent(student_config_for(teacher_lm, max_seq_len=4096))
        with torch.no_grad():
            copy_teacher_weights(student, teacher_lm)
        student.save(folder)
    return str(folder), TEACHER


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    cell = {(r["system"], r["context"], r["streams"]): r for r in rows}
    big, long, short = max(args.streams), max(args.contexts), min(args.contexts)
    out: dict[str, Any] = {}
    s, t = cell.get(("student", long, big)), cell.get(("teacher", long, big))
    if s and t and s["decode_tokens_per_s"] and t["decode_tokens_per_s"]:
        ratio = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        out["decode_ratio_at_max"] = {"streams": big, "context": long, "student_over_teacher": round(ratio, 2),
                                      "goal": ">= 5", "met": ratio >= 5}
    peaks = {c: cell[("student", c, big)]["rss_peak_mb"] for c in args.contexts if ("student", c, big) in cell}
    if len(peaks) > 1:
        growth = peaks[long] / peaks[short]
        out["student_rss_growth"] = {"streams": big, "peak_mb": peaks, "ratio": round(growth, 3), "goal": "<= 1.10",
                                     "met": growth <= 1.10}
    teacher_peaks = {c: cell[("teacher", c, big)]["rss_peak_mb"] for c in args.contexts if ("teacher", c, big) in cell}
    if teacher_peaks:
        out["teacher_rss_peak_mb"] = teacher_peaks
    for context in args.contexts:
        one, many = cell.get(("student", context, min(args.streams))), cell.get(("student", context, big))
        if one and many:
            ratio = many["itl_p99_ms"] / one["itl_p99_ms"]
            out.setdefault("student_itl_p99_ratio", {})[context] = {"ratio": round(ratio, 2), "goal": "<= 2",
                                                                     "met": ratio <= 2}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'system':>8} {'context':>7} {'streams':>7} {'TTFT mean':>9} {'TTFT max':>8} {'decode tok/s':>12} "
             f"{'ITL p50':>8} {'ITL p99':>8} {'RSS MB':>7}"]
    for r in rows:
        lines.append(f"{r['system']:>8} {r['context']:>7} {r['streams']:>7} {r['ttft_mean_s']:>9.2f} {r['ttft_max_s']:>8.2f} "
                     f"{r['decode_tokens_per_s'] or 0:>12.1f} {r['itl_p50_ms']:>8.0f} {r['itl_p99_ms']:>8.0f} "
                     f"{r['rss_peak_mb']:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default=None, help="a run, checkpoint, student or export folder to serve")
    parser.add_argument("--tokenizer", default=None, help="the student's tokenizer when --student needs one")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=["student", "teacher"], choices=["student", "teacher"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the teacher worker")
    parser.add_argument("--workdir", default="runs/bench-serve")
    parser.add_argument("--model-cache-dir", default="~/.cache/retnet-distill/models")
    parser.add_argument("--output", default="benchmarks/results-serve.json")
    parser.add_argument("--teacher-rows", default=None, help="reuse the teacher rows of an earlier --output (same "
                        "machine) instead of running the teacher again (its 4,096 x 32 cell takes 13 minutes on 2 cores)")
    parser.add_argument("--teacher-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.teacher_worker:
        return teacher_worker(args)
    args.contexts, args.streams = sorted(args.contexts), sorted(args.streams)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from teacher_server.engines.model_source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TEACHER, args.model_cache_dir).path)
    ids = text_ids(tokenizer, max(args.contexts) * max(args.streams))
    student, student_tokenizer = prepare_student(args) if "student" in args.systems else (None, None)
    rows: list[dict[str, Any]] = []
    if "student" in args.systems:
        rows += run_student(args, student, student_tokenizer, ids)
    if args.teacher_rows:
        rows += [r for r in json.loads(Path(args.teacher_rows).read_text())["rows"] if r["system"] == "teacher"]
    elif "teacher" in args.systems:
        rows += run_teacher(args, ids)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
              "new_tokens": args.new_tokens, "rows": rows, "summary": summary(rows, args)}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    emit(bench="serve_summary", **report["summary"])
    shutil.rmtree(Path(args.workdir) / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
