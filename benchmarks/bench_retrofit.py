"""Retrofit vs random init at the same wall-clock training budget (CPU, direct teacher).

Prints JSON lines, then a table; writes every figure to a JSON file (``--output``). Run:

    .venv/bin/python benchmarks/bench_retrofit.py [--budget-s 480] [--variants a,b] [--teacher NAME]

Four students are distilled from the same teacher (``--teacher``, default the embedded
SmolLM2-135M-Instruct) on the same data in the same order (python-docs built once under
``--data-dir`` with the teacher's tokenizer, 4 x 128 tokens per step, seed 0, direct teacher on the
CPU, fp32, top-64 targets, distill_alpha 0.5 (0.2 for the retrofitted students, as in the main job), no
weight decay, no saddle detection):

- tiny-random:          random-init ``tiny`` preset, lr ``--lr-random`` (3e-3, as the main job);
- teacher-shape-random: random-init student of the teacher's shape (``retrofit.student_config_for``,
                        no weight copy), lr ``--lr-random``;
- retrofit-no-stage1:   ``student_init=teacher``, ``attention_transfer_steps=0``: KD of every
                        parameter from the copied weights, lr ``--lr-retrofit``;
- retrofit-stage1:      ``student_init=teacher``, attention transfer (stage 1, lr ``--lr-stage1``)
                        for ``--stage1-fraction`` of the budget, then KD (lr ``--lr-retrofit``).

Every variant is trained by ``student_trainer.training.recipe.train`` (teacher-shape-random with
``student_init=teacher_shape``). The students of the teacher's shape use AdamW: torch's Muon runs its
Newton-Schulz iteration in bf16, which AVX2-only CPUs compute ~300x slower than fp32 (the tiny
student keeps Muon, as in the main job).

The same wall budget: the trainer has no time limit, so each variant's step count comes from a
timing probe of that very variant: a short run (``--probe-steps`` KD steps, default 3, plus as many
stage-1 steps for retrofit-stage1) whose per-step times ``train/step_seconds`` (metrics.jsonl, every
step) give seconds per step: the mean over each stage's steps, its first (warm-up) step left out.
Then

    KD steps      = round(budget / s_per_kd_step)                                  (at least 2)
    stage-1 steps = round(stage1_fraction * budget / s_per_stage1_step)            (retrofit-stage1, >= 1)
    KD steps      = round((1 - stage1_fraction) * budget / s_per_kd_step)          (retrofit-stage1, >= 2)

and the variant is trained for real from scratch. The budget covers the optimiser steps only (the
teacher's forward, the student's forward / backward and the update, as ``train/step_seconds``
measures them); setup (teacher load, the retrofit's gate fit, the trainer's own step-0 and final
evaluations, checkpoints) is left out of it. ``train_s`` reports the steps' measured sum, which lands
near but not exactly on the budget; ``other_cpu_s_per_wall_s`` is the CPU that other processes used
during the run (from /proc/stat), as in bench_server.py / bench_wire.py: step times are only
comparable when it is about the same for every variant.

Reported per variant: steps (stage 1 + KD), train_s, tokens seen (``train/tokens_seen``: every
training token, stage 1 included), training tokens/s (tokens seen / train_s), and held-out
perplexity, KL(teacher || student) over the whole vocabulary and top-1 agreement from
``student_trainer.evaluation.evaluate.heldout_metrics`` on the first ``--eval-batches`` x 4 rows of the val split,
with the final checkpoint; plus the teacher's perplexity on the same tokens.

Check the script on the tiny random Llama of the tests (seconds, not minutes):

    .venv/bin/python -c "import sys, pathlib; sys.path.insert(0, 'tests'); from conftest import build_tiny_llama; \\
        build_tiny_llama(pathlib.Path('/tmp/bench-tiny-llama'))"
    .venv/bin/python benchmarks/bench_retrofit.py --teacher /tmp/bench-tiny-llama --budget-s 20 --threads 1 \\
        --workdir /tmp/bench-retrofit --data-dir /tmp/bench-retrofit/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from student_trainer.training.config import TrainConfig, load_config
from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
from student_trainer.evaluation.evaluate import heldout_metrics
from student_trainer.model.student import RetNetStudent
from student_trainer.model.retrofit import load_teacher_lm
from student_trainer.teachers import DirectTeacher
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR
from student_trainer.training.recipe import prepare_data, train

VARIANTS = ("tiny-random", "teacher-shape-random", "retrofit-no-stage1", "retrofit-stage1")
SEQ_LEN, BATCH, TOPK = 128, 4, 64


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine (all cores) since boot, from /proc/stat (None elsewhere)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def metrics_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def step_seconds(lines: list[dict]) -> dict[int, list[float]]:
    """Per stage (1: attention transfer, 2: KD), the measured seconds of each optimiser step, in order."""
    out: dict[int, list[float]] = {1: [], 2: []}
    for line in lines:
        if "train/step_seconds" in line:
            out[int(line.get("train/stage", 2))].append(float(line["train/step_seconds"]))
    return out


def per_step(times: list[float]) -> float:
    """Seconds per step of a probe: the mean without the first (warm-up) step when there are more."""
    return float(np.mean(times[1:] if len(times) > 1 else times))


# ----------------------------------------------------------------------------------------- configs


def settings_for(args: argparse.Namespace, variant: str, output_dir: Path, stage1_steps: int, kd_steps: int,
                 probe: bool) -> dict[str, Any]:
    """The trainer settings of one run of ``variant`` (``stage1_steps`` + ``kd_steps`` optimiser steps)."""
    steps = stage1_steps + kd_steps
    settings: dict[str, Any] = {
        "output_dir": str(output_dir), "resume": "never", "seed": 0, "device": "cpu", "precision": "fp32",
        "cpu_threads": args.threads, "teacher_mode": "direct", "teacher_device": "cpu", "teacher_dtype": "float32",
        "teacher_model": args.teacher, "model_cache_dir": args.model_cache_dir, "train_data": "python-docs",
        "data_dir": args.data_dir, "max_seq_length": SEQ_LEN, "batch_size": BATCH, "teacher_topk": TOPK,
        "temperature": 1.0, "distill_alpha": 0.5, "optimizer": "adamw", "weight_decay": 0.0,
        "max_steps": steps, "warmup_steps": 0 if probe else min(kd_steps - 1, max(1, kd_steps // 10)),
        "log_every": 1, "eval_every": steps, "eval_batches": 1 if probe else 2, "save_every": steps, "keep_last": 1,
        "wandb_mode": "disabled", "progress": False, "saddle_detection": False,
    }
    if variant == "tiny-random":
        settings.update(model_variant="tiny", lr=args.lr_random, optimizer="muon")
    elif variant == "teacher-shape-random":
        settings.update(student_init="teacher_shape", lr=args.lr_random)
    elif variant == "retrofit-no-stage1":
        settings.update(student_init="teacher", lr=args.lr_retrofit, distill_alpha=0.2)
    elif variant == "retrofit-stage1":
        settings.update(student_init="teacher", lr=args.lr_retrofit, distill_alpha=0.2, attention_transfer_steps=stage1_steps,
                        attention_transfer_lr=args.lr_stage1,
                        attention_transfer_warmup=0 if probe else min(stage1_steps - 1, max(1, stage1_steps // 10)))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return settings


def make_config(settings: dict[str, Any]) -> TrainConfig:
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()])


def run_variant(args: argparse.Namespace, variant: str, teacher: DirectTeacher, data_dir: Path, name: str,
                stage1_steps: int, kd_steps: int, probe: bool) -> dict[str, Any]:
    """Train one run from scratch; returns its summary, metrics lines and timing."""
    output_dir = Path(args.workdir) / name
    shutil.rmtree(output_dir, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    settings = settings_for(args, variant, output_dir, stage1_steps, kd_steps, probe)
    config = make_config(settings)
    busy, cpu, started = machine_busy_s(), time.process_time(), time.perf_counter()
    summary = train(config, teacher=teacher)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    other = None if busy is None else max(0.0, machine_busy_s() - busy - cpu) / wall
    return {"summary": summary, "lines": metrics_lines(output_dir), "wall_s": wall, "other_cpu_s_per_wall_s": other,
            "config": config}


def plan(args: argparse.Namespace, variant: str, probe: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
    """Steps (stage 1, KD) that fill the budget at the probe's seconds per step."""
    times = step_seconds(probe["lines"])
    s2 = per_step(times[2])
    if variant != "retrofit-stage1":
        return 0, max(2, round(args.budget_s / s2)), {"s_per_kd_step": s2}
    s1 = per_step(times[1])
    stage1 = max(1, round(args.stage1_fraction * args.budget_s / s1))
    kd = max(2, round((1 - args.stage1_fraction) * args.budget_s / s2))
    return stage1, kd, {"s_per_stage1_step": s1, "s_per_kd_step": s2}


def result_of(variant: str, run: dict[str, Any], stage1: int, kd: int, timing: dict[str, float],
              heldout: dict[str, float]) -> dict[str, Any]:
    lines = run["lines"]
    times = step_seconds(lines)
    steps = [line for line in lines if "train/tokens_seen" in line]
    tokens = int(steps[-1]["train/tokens_seen"]) if steps else 0
    train_s = sum(times[1]) + sum(times[2])
    start = next(line for line in lines if line.get("event") == "start")
    evals = [line for line in lines if "eval/ppl" in line]
    out = {
        "variant": variant, "lr": run["config"].lr, "stage1_steps": stage1, "kd_steps": kd,
        "probe_s_per_step": {k: round(v, 4) for k, v in timing.items()},
        "student_parameters": start["student_parameters"], "train_s": round(train_s, 2),
        "stage1_s": round(sum(times[1]), 2), "kd_s": round(sum(times[2]), 2), "tokens_seen": tokens,
        "tokens_per_s": round(tokens / train_s, 1) if train_s else None,
        "run_wall_s": round(run["wall_s"], 1), "other_cpu_s_per_wall_s": (None if run["other_cpu_s_per_wall_s"] is None
                                                                          else round(run["other_cpu_s_per_wall_s"], 2)),
        "checkpoint": run["summary"]["checkpoint"],
        "trainer_eval_ppl_step0": round(evals[0]["eval/ppl"], 2) if evals else None,
        "trainer_eval_ppl_end": round(evals[-1]["eval/ppl"], 2) if evals else None,
        "heldout": heldout,
    }
    if stage1:
        stage1_tokens = int([line for line in steps if line.get("train/stage") == 1][-1]["train/tokens_seen"])
        out["stage1_tokens_per_s"] = round(stage1_tokens / sum(times[1]), 1)
        out["kd_tokens_per_s"] = round((tokens - stage1_tokens) / sum(times[2]), 1)
    return out


# ----------------------------------------------------------------------------------------- output


def table(results: list[dict[str, Any]], teacher_ppl: float | None) -> str:
    head = (f"{'variant':<22} {'params':>11} {'steps s1+KD':>11} {'train_s':>8} {'tokens':>8} {'tok/s':>7} "
            f"{'ppl':>9} {'KL(T||S)':>9} {'top1':>6} {'other_cpu':>9}")
    rows = [head, "-" * len(head)]
    if teacher_ppl is not None:
        rows.append(f"{'teacher':<22} {'':>11} {'':>11} {'':>8} {'':>8} {'':>7} {teacher_ppl:>9.2f} {'':>9} {'':>6}")
    for r in results:
        h = r["heldout"]
        other = "" if r["other_cpu_s_per_wall_s"] is None else f"{r['other_cpu_s_per_wall_s']:.2f}"
        rows.append(f"{r['variant']:<22} {r['student_parameters']:>11,} {str(r['stage1_steps']) + '+' + str(r['kd_steps']):>11} "
                    f"{r['train_s']:>8.1f} {r['tokens_seen']:>8} {r['tokens_per_s']:>7.0f} "
                    f"{h['student_perplexity']:>9.2f} {h['kl_teacher_student']:>9.4f} {h['top1_agreement']:>6.3f} {other:>9}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher model (any retnet-teacher --model)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="training seconds per variant (optimiser steps)")
    parser.add_argument("--stage1-fraction", type=float, default=0.55,
                        help="share of retrofit-stage1's budget spent on attention transfer")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--workdir", default="runs/bench_retrofit", help="run folders (probes are deleted after use)")
    parser.add_argument("--data-dir", default="data", help="where the python-docs shards are built once")
    parser.add_argument("--model-cache-dir", default=DEFAULT_MODEL_CACHE_DIR)
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 4 rows (val split)")
    parser.add_argument("--lr-random", type=float, default=3e-3, help="lr of the random-init students")
    parser.add_argument("--lr-retrofit", type=float, default=1e-4, help="KD (stage 2) lr of the retrofitted students")
    parser.add_argument("--lr-stage1", type=float, default=1e-2, help="attention transfer (stage 1) lr")
    parser.add_argument("--probe-steps", type=int, default=3,
                        help="timing probe: steps per stage (the first is not timed when there are more)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--output", default=None, help="results JSON (default WORKDIR/results.json)")
    parser.add_argument("--drop-checkpoints", action="store_true",
                        help="delete each variant's checkpoints after its evaluation; metrics.jsonl stays")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not 0.0 < args.stage1_fraction < 1.0:
        parser.error("--stage1-fraction must be in (0, 1)")
    if args.probe_steps < 1 or args.budget_s <= 0:
        parser.error("--probe-steps must be >= 1 and --budget-s > 0")
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    output = Path(args.output) if args.output else workdir / "results.json"

    header = {"bench": "retrofit", "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": args.threads,
              "python": platform.python_version(), "torch": torch.__version__, "teacher": args.teacher,
              "budget_s": args.budget_s, "stage1_fraction": args.stage1_fraction, "variants": variants,
              "seq_len": SEQ_LEN, "batch_size": BATCH, "teacher_topk": TOPK, "eval_batches": args.eval_batches,
              "lr_random": args.lr_random, "lr_retrofit": args.lr_retrofit, "lr_stage1": args.lr_stage1}
    emit(**header)
    data_dir = prepare_data(make_config(settings_for(args, "tiny-random", workdir / "unused", 0, 2, probe=True)))
    manifest = read_manifest(data_dir)
    split = "val" if "val" in manifest["splits"] else "train"
    if split != "val":
        emit(warning=f"{data_dir} has no val split; evaluating on train rows")
    dataset = PretokenizedShardDataset(data_dir, split)
    teacher = DirectTeacher.load(args.teacher, TOPK, 1.0, device="cpu", dtype="float32", cache_dir=args.model_cache_dir)
    teacher_lm = None  # the evaluation's own fp32 copy, loaded at the first evaluation

    results: list[dict[str, Any]] = []
    teacher_ppl = None
    report = {**header, "data": str(data_dir), "split": split, "teacher_perplexity": None, "results": results}
    for variant in variants:
        probe = run_variant(args, variant, teacher, data_dir, f"probe-{variant}",
                            args.probe_steps if variant == "retrofit-stage1" else 0, args.probe_steps, probe=True)
        stage1, kd, timing = plan(args, variant, probe)
        shutil.rmtree(workdir / f"probe-{variant}", ignore_errors=True)
        emit(bench="retrofit_plan", variant=variant, stage1_steps=stage1, kd_steps=kd,
             **{k: round(v, 4) for k, v in timing.items()})
        run = run_variant(args, variant, teacher, data_dir, variant, stage1, kd, probe=False)

        if teacher_lm is None:
            teacher_lm, tokenizer, sha = load_teacher_lm(args.teacher, args.model_cache_dir, "cpu")
            if sha != manifest["tokenizer_sha256"]:
                raise SystemExit(f"{data_dir} was not tokenized with {args.teacher}'s tokenizer")
        student = RetNetStudent.load(Path(run["summary"]["checkpoint"]) / "model").eval()
        heldout = heldout_metrics(student, teacher_lm, dataset, teacher.vocab_size, args.eval_batches, BATCH,
                                  torch.device("cpu"))
        del student
        teacher_ppl = heldout["teacher_perplexity"]
        report["teacher_perplexity"] = round(teacher_ppl, 4)
        result = result_of(variant, run, stage1, kd, timing, {k: round(v, 4) for k, v in heldout.items()})
        results.append(result)
        emit(bench="retrofit_result", **result)
        output.write_text(json.dumps(report, indent=2) + "\n")  # after every variant: partial results survive
        if args.drop_checkpoints:
            shutil.rmtree(workdir / variant / "checkpoints", ignore_errors=True)

    print()
    print(f"held-out on {data_dir.name}/{split} ({int(results[0]['heldout']['target_tokens']) if results else 0} "
          f"target tokens); budget {args.budget_s:g}s of training steps per variant")
    print(table(results, teacher_ppl))
    print(f"results: {output}")


if __name__ == "__main__":
    main()
