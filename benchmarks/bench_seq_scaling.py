"""Cost against sequence length: the student's training step on the parallel and chunkwise retention
paths, the teacher's forward for contrast, and the student's prompt prefill, in one script.

Each measurement runs in its own subprocess (``--one``), so its peak RSS is its own: the figure is
the process's peak resident memory minus what it held after building the model (CPU), or
``torch.cuda.max_memory_allocated`` (GPU). Prints one JSON line per measurement, then the fitted
growth exponents (slope of log time and log memory against log L, least squares).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_seq_scaling.py`` (all parts) or
``--parts train prefill`` and ``--lengths ...`` to choose. Parts:

- ``train``: forward + backward of one row of L tokens through a d=256, 4-layer, 8-head student
  (vocab 49,152; the backbone and a mean-square loss on its hidden states: the LM head and loss are
  computed in row chunks in training, linear in L whatever the path), best of ``--repeats``, for
  the parallel path, the chunkwise path (``--chunk``) and the default (``StudentConfig.uses_chunkwise``).
  The parallel path is skipped where its ``[H, L, L]`` tensors would not fit (``--parallel-max-gb``).
- ``crossover``: the same step at short lengths with chunks of 256 and 512, where the default
  ``chunkwise_min_length`` comes from.
- ``teacher``: the embedded SmolLM2-135M-Instruct's forward (no grad, fp32) at L up to its 8,192
  positions.
- ``prefill``: ``RetNetStudent.prefill`` of a 1K ... 32K-token prompt (chunks of 512) for the tiny
  preset and a d=512 student; the parallel prefill (one ``[H, L, L]`` pass) beside it where it fits.

Goals (issue 14): the default path's step time from 512 to 16,384 tokens grows with exponent <= 1.05
on the log-log fit, its memory linearly; a 32K-token prompt prefills with < 2 GB extra RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import torch

TRAIN_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
CROSSOVER_LENGTHS = [256, 512, 768, 1024, 1536, 2048]
PREFILL_LENGTHS = [1024, 4096, 16384, 32768]
TEACHER_LENGTHS = [512, 1024, 2048, 4096, 8192]
STUDENTS = {
    "d256": dict(vocab_size=49_152, d_model=256, n_layers=4, n_heads=8, ffn_dim=688, value_dim=512),
    "d512": dict(vocab_size=49_152, d_model=512, n_layers=8, n_heads=8, ffn_dim=1376, value_dim=1024),
}
PRESET_STUDENTS = ("350M", "500M")  # --train-student: the presets (Llama-3 vocabulary), e.g. on a GPU


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_student(name: str, device: torch.device, chunk: int, default_path: bool = False):
    """A random-init student; ``default_path``: the config's own path choice, else it is picked per call."""
    from student_trainer.model.student import RetNetStudent, StudentConfig

    path = {} if default_path else {"chunkwise_min_length": None}
    if name in PRESET_STUDENTS:
        config = StudentConfig.from_preset(name, recurrent_chunk_size=chunk, **path)
    elif name == "tiny":
        config = StudentConfig.from_preset("tiny", vocab_size=49_152, recurrent_chunk_size=chunk, **path)
    else:
        config = StudentConfig(**STUDENTS[name], recurrent_chunk_size=chunk, **path)
    torch.manual_seed(0)
    return RetNetStudent(config).to(device)


def measure(fn, device: torch.device, repeats: int) -> tuple[float, int]:
    """Best wall time of ``fn()`` over ``repeats`` runs (after one warm-up) and the extra memory."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()
    fn()  # warm-up (allocator, first-call paths)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    extra = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else (peak_rss_bytes() - base)
    return min(times), max(int(extra), 0)


def one(part: str, mode: str, length: int, chunk: int, student: str, repeats: int, device: torch.device) -> dict:
    """One measurement (in this process)."""
    ids = torch.randint(0, 49_152, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    if part == "teacher":
        from transformers import AutoModelForCausalLM

        from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR
        from teacher_server.engines.model_source import EMBEDDED_ALIAS, resolve_model

        teacher = AutoModelForCausalLM.from_pretrained(str(resolve_model(EMBEDDED_ALIAS, DEFAULT_MODEL_CACHE_DIR).path),
                                                       dtype=torch.float32)
        teacher = teacher.to(device).eval()

        def run() -> None:
            with torch.no_grad():
                teacher.model(input_ids=ids, use_cache=False)
    elif part == "prefill":
        model = build_student(student, device, chunk).eval()

        def run() -> None:
            with torch.no_grad():
                if mode == "chunked":
                    model.prefill(ids)
                else:  # one parallel pass over the whole prompt: what prefill did before
                    model.logits_from_hidden(model.hidden_states(ids, chunkwise=False)[:, -1])
    else:
        model = build_student(student, device, chunk, default_path=mode == "default").train()
        chunkwise = {"parallel": False, "chunkwise": True, "default": None}[mode]

        # bf16 autocast on CUDA (how the trainer runs there); fp32 on CPU (bf16 is slower on AVX2)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

        def run() -> None:
            model.zero_grad(set_to_none=True)
            with autocast:
                hidden = model.hidden_states(ids, chunkwise=chunkwise)
            hidden.float().pow(2).mean().backward()
    seconds, extra = measure(run, device, repeats)
    return {"part": part, "mode": mode, "student": student if part != "teacher" else "smollm2-135m",
            "length": length, "chunk": chunk if part != "teacher" else None, "seconds": round(seconds, 4),
            "tokens_per_s": round(length / seconds, 1), "extra_memory_mb": round(extra / 2**20, 1)}


def fits_parallel(student: str, length: int, limit_gb: float, training: bool) -> bool:
    """Whether the parallel path's ``[H, L, L]`` fp32 tensors (mask, scores and, in training, what
    autograd keeps per layer) stay under ``limit_gb``."""
    from student_trainer.model.config import PRESETS

    spec = STUDENTS.get(student) or PRESETS.get(student) or dict(n_heads=4, n_layers=2)
    copies = 1 + (3 * spec["n_layers"] if training else 3)
    return 4 * spec["n_heads"] * length * length * copies / 2**30 <= limit_gb


def fitted_exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(rows[key]) against log(length)."""
    points = [(math.log(r["length"]), math.log(r[key])) for r in rows if r[key] > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return round(slope, 3)


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, int, str]]:
    jobs = []
    if "crossover" in args.parts:
        for chunk in (256, 512):
            for length in CROSSOVER_LENGTHS:
                jobs += [("crossover", mode, length, chunk, "d256") for mode in ("parallel", "chunkwise")]
    if "train" in args.parts:
        for length in args.lengths or TRAIN_LENGTHS:
            for mode in ("parallel", "chunkwise", "default"):
                if mode != "parallel" or fits_parallel(args.train_student, length, args.parallel_max_gb, training=True):
                    jobs.append(("train", mode, length, args.chunk, args.train_student))
    if "teacher" in args.parts:
        jobs += [("teacher", "forward", length, 0, "") for length in TEACHER_LENGTHS]
    if "prefill" in args.parts:
        for student in ("tiny", "d512"):
            for length in args.prefill_lengths or PREFILL_LENGTHS:
                jobs.append(("prefill", "chunked", length, 512, student))
                if fits_parallel(student, length, args.parallel_max_gb, training=False):
                    jobs.append(("prefill", "parallel", length, 512, student))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["crossover", "train", "teacher", "prefill"],
                        choices=["crossover", "train", "teacher", "prefill"])
    parser.add_argument("--lengths", type=int, nargs="+", help="training lengths (default 512 ... 16384)")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", help="prompt lengths (default 1K ... 32K)")
    parser.add_argument("--chunk", type=int, default=512, help="chunk size of the chunkwise training rows")
    parser.add_argument("--train-student", default="d256", choices=[*STUDENTS, *PRESET_STUDENTS],
                        help="the student of the train part (GPU: 500M under bf16 autocast, as the original claims)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parallel-max-gb", type=float, default=6.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=5, metavar=("PART", "MODE", "LENGTH", "CHUNK", "STUDENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        part, mode, length, chunk, student = args.one
        print(json.dumps(one(part, mode, int(length), int(chunk), student, args.repeats, device)), flush=True)
        return

    print(json.dumps({"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "device": str(device),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    results = []
    for part, mode, length, chunk, student in plan(args):
        command = [sys.executable, __file__, "--one", part, mode, str(length), str(chunk), student or "-",
                   "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(json.dumps({"part": part, "mode": mode, "length": length, "error": done.stderr.strip()[-400:]}), flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["part"], row["mode"], row["student"], row["chunk"]), []).append(row)
    for (part, mode, student, chunk), rows in groups.items():
        if len(rows) > 2:
            print(json.dumps({"fit": part, "mode": mode, "student": student, "chunk": chunk,
                              "lengths": [r["length"] for r in rows],
                              "time_exponent": fitted_exponent(rows, "seconds"),
                              "memory_exponent": fitted_exponent(rows, "extra_memory_mb")}), flush=True)


if __name__ == "__main__":
    main()
