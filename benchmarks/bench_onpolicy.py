"""On-policy vs off-policy distillation from the same start with the same teacher (issue 15).

Prints JSON lines, then a table; writes every figure to ``--output``. Run:

    .venv/bin/python benchmarks/bench_onpolicy.py [--parts scoring train rows] [--fractions 0 0.25 0.5]

Part ``scoring``: what ``score_ids`` costs a ``POST /v1/topk``. A teacher service (``--teacher``, the
embedded SmolLM2-135M-Instruct by default) in its own process; the same request (``--batch`` rows of
the data, top-64, msgpack) sent ``--reps`` times without and with ``score_ids`` of m = 64 and 65 random
ids per position (65: the on-policy default, the student's top 64 + the sampled token), interleaved;
medians of the client-side wall time, and the ratios.

Part ``train``: one shared start, then one run per ``--fractions`` value, all in direct mode on the CPU
(fp32, the teacher in the trainer's process):

- data: the Dolly sample (``--data``, chat records) preprocessed with the teacher's tokenizer, one
  conversation per row, ``--max-seq-length`` tokens, 10% held out;
- the start: the retrofitted student (``student_init=teacher``), ``--stage1-steps`` of attention
  transfer, then ``--warm-steps`` of off-policy KD (``stop_at_step``), saved;
- each arm resumes that checkpoint (the same weights, optimiser state, data order and LR schedule)
  and trains ``--steps`` more KD steps with ``onpolicy_fraction`` = the arm's value
  (``onpolicy_max_new_tokens`` ``--new-tokens``, ``onpolicy_student_topk`` ``--student-topk``,
  reverse KL, sampling at ``--onpolicy-temperature`` / ``--onpolicy-top-p``, default 1 / 1). An
  on-policy step's batch rows give prompts only; the teacher scores the student's text instead of the
  rows, so each arm's teacher tokens (``teacher_tokens``, summed from ``teacher/tokens``) are reported:
  arms are compared at equal steps, and an arm that used more teacher tokens than off-policy would be
  flagged.

Reported per arm: held-out perplexity, KL(teacher || student) over the whole vocabulary and top-1
agreement (``heldout_metrics``, the first ``--eval-batches`` x 4 rows of the held-out split); the
generation metrics (``generation_quality``: teacher NLL per generated token, distinct-2/3,
repetition-4) of the student's own answers to the held-out rows' prompts (the turns before the first
answer), ``--gen-seeds`` samples each at ``--judge-temperature`` / ``--judge-top-p`` (default 1 / 1), at
most ``--new-tokens`` tokens, decoded in one batch through the recurrent state, with the teacher NLL
taken apart at the generated positions (full vocabulary: reverse KL(student || teacher), the student's
and the teacher's entropy; at temperature 1 the NLL is their sum in expectation) and the share of answers that ended their turn;
training tokens/s; seconds per off-policy and per on-policy step (first step of each kind left out) and
their ratio; the teacher's share of step time and the
sampling's share of on-policy step time.

The start is judged the same way (``start`` in the JSON). ``--judge-only`` judges a ``--workdir`` that
already holds the start and the arms again, without training (e.g. after the metrics changed);
``--keep-trained`` trains only what is missing (a new arm beside a finished start, an interrupted run).

Part ``rows``: the same two step times at ``--rows`` rows per step (4, 8, 16), from a fresh retrofit
(timing only, no quality figures): decoding one token costs about the same for 4 rows as for 16 (it
streams every weight once), so the sampling's share falls as rows per step grow.

Check the script on the tiny random Llama of the tests (seconds):

    .venv/bin/python -c "import sys, pathlib; sys.path.insert(0, 'tests'); from conftest import build_tiny_llama; \\
        build_tiny_llama(pathlib.Path('/tmp/bench-tiny-llama'))"
    .venv/bin/python benchmarks/bench_onpolicy.py --teacher /tmp/bench-tiny-llama --workdir /tmp/bench-onpolicy \\
        --stage1-steps 2 --warm-steps 2 --steps 4 --eval-batches 1 --gen-prompts 4 --reps 2 --rows 2 4 --rows-steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 shared cores: no OpenMP spin-waits (before torch)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.wire import encode_topk_request  # noqa: E402
from student_trainer.training.config import TrainConfig, load_config  # noqa: E402
from student_trainer.training.batches import Batch  # noqa: E402
from student_trainer.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from student_trainer.data.sampler import ShardSampler  # noqa: E402
from student_trainer.data.shards import PretokenizedShardDataset, read_manifest  # noqa: E402
from student_trainer.evaluation.evaluate import heldout_metrics  # noqa: E402
from student_trainer.evaluation.generation_quality import generation_metrics  # noqa: E402
from student_trainer.model.student import RetNetStudent  # noqa: E402
from student_trainer.training.onpolicy import OnPolicySettings, prompts_of, sample_rollout  # noqa: E402
from student_trainer.teachers.process import LocalTeacher  # noqa: E402
from student_trainer.teachers import DirectTeacher  # noqa: E402
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR  # noqa: E402
from student_trainer.training.recipe import train  # noqa: E402
from teacher_server.engines.model_source import EMBEDDED_ALIAS  # noqa: E402

BATCH, TOPK = 4, 64
DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly-15k-sample.jsonl"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# ------------------------------------------------------------------------------------------ scoring


def scoring_cost(args: argparse.Namespace, dataset: PretokenizedShardDataset, vocab: int) -> dict[str, Any]:
    """Median client wall time of one /v1/topk request without and with score_ids (m = 64, 65)."""
    rows = [dataset[i] for i in range(args.batch)]
    sequences = [row["input_ids"][:row["length"]].numpy().astype(np.int32) for row in rows]
    positions = sum(len(s) for s in sequences)
    rng = np.random.default_rng(0)
    bodies = {"none": encode_topk_request(sequences, k=TOPK, temperature=1.0, fmt="msgpack")}
    for m in (64, 65):
        ids = rng.integers(0, vocab, (positions, m), dtype=np.int64)
        bodies[f"m{m}"] = encode_topk_request(sequences, k=TOPK, temperature=1.0, fmt="msgpack", score_ids=ids,
                                              return_logsumexp=True)
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    env = {"TEACHER_MODEL_CACHE_DIR": args.model_cache_dir, "TEACHER_MAX_SCORE_IDS": "256",
           "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    times: dict[str, list[float]] = {name: [] for name in bodies}
    with LocalTeacher(args.teacher, Path(args.workdir) / "teacher.log", env=env) as teacher, \
            httpx.Client(timeout=600) as client:
        for name, body in bodies.items():  # warm-up, and a check that every request is answered
            reply = client.post(teacher.url + "/v1/topk", content=body, headers=headers)
            reply.raise_for_status()
        for _ in range(args.reps):
            for name, body in bodies.items():
                started = time.perf_counter()
                reply = client.post(teacher.url + "/v1/topk", content=body, headers=headers)
                times[name].append(time.perf_counter() - started)
                reply.raise_for_status()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"rows": args.batch, "positions": positions, "k": TOPK, "reps": args.reps,
            **{f"seconds_{name}": round(value, 4) for name, value in medians.items()},
            "ratio_m64": round(medians["m64"] / medians["none"], 3), "ratio_m65": round(medians["m65"] / medians["none"], 3)}


# ------------------------------------------------------------------------------------------- train


def prepare_dolly(args: argparse.Namespace) -> Path:
    folder = Path(args.workdir) / f"dolly-{args.max_seq_length}"
    if not (folder / "manifest.json").exists():
        preprocess(PreprocessConfig(inputs=[args.data], output=str(folder), tokenizer=args.teacher,
                                    max_seq_length=args.max_seq_length, pack=False, val_fraction=0.1,
                                    model_cache_dir=args.model_cache_dir, progress=False))
    return folder


def arm_config(args: argparse.Namespace, data: Path, output_dir: Path, **overrides: Any) -> TrainConfig:
    total = args.stage1_steps + args.warm_steps + args.steps
    settings: dict[str, Any] = {
        "output_dir": str(output_dir), "seed": 0, "device": "cpu", "precision": "fp32", "cpu_threads": args.threads,
        "teacher_mode": "direct", "teacher_device": "cpu", "teacher_dtype": "float32", "teacher_model": args.teacher,
        "model_cache_dir": args.model_cache_dir, "train_data": str(data), "max_seq_length": args.max_seq_length,
        "batch_size": BATCH, "teacher_topk": TOPK, "temperature": 1.0, "distill_alpha": 0.2, "optimizer": "adamw",
        "lr": args.lr, "weight_decay": 0.0, "warmup_steps": 3, "max_steps": total,
        "student_init": "teacher", "attention_transfer_steps": args.stage1_steps, "attention_transfer_lr": 1e-2,
        "attention_transfer_warmup": min(3, args.stage1_steps - 1), "log_every": 1, "eval_every": 10 ** 6,
        "eval_batches": 1, "save_every": 10 ** 6, "keep_last": 2, "wandb_mode": "disabled", "progress": False,
        "saddle_detection": False, "onpolicy_max_new_tokens": args.new_tokens,
        "onpolicy_student_topk": args.student_topk, "onpolicy_temperature": args.onpolicy_temperature,
        "onpolicy_top_p": args.onpolicy_top_p, "onpolicy_divergence": args.onpolicy_divergence,
        "onpolicy_jsd_beta": args.onpolicy_jsd_beta, "onpolicy_teacher_temperature": args.onpolicy_teacher_temperature,
        "onpolicy_sequence_weight": args.onpolicy_sequence_weight, "onpolicy_sequence_reward": args.onpolicy_sequence_reward,
        "onpolicy_sequence_discount": args.onpolicy_sequence_discount,
        "onpolicy_sequence_return": args.onpolicy_sequence_return,
        **overrides,
    }
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()])


def metrics_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def generations(student: RetNetStudent, dataset: PretokenizedShardDataset, args: argparse.Namespace,
                stop_ids: list[int], vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, the student's answers): ``--gen-seeds`` samples per held-out prompt, batched, at
    ``--judge-temperature`` / ``--judge-top-p``."""
    order = ShardSampler(len(dataset), shuffle=False)
    rows = [dataset[i] for i in order.take(min(args.gen_prompts, len(dataset)))]
    settings = OnPolicySettings(1.0, args.new_tokens, args.judge_temperature, 1, "reverse_kl", 0.5, stop_ids,
                                args.max_seq_length, top_p=args.judge_top_p)
    prompts_out, answers = [], []
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    for seed in range(args.gen_seeds):
        generator = torch.Generator().manual_seed(1000 + seed)
        for start in range(0, len(rows), 8):
            batch = Batch.from_rows(rows[start:start + 8])
            rollout = sample_rollout(student, batch, settings, generator, vocab, cpu, off)
            for row, prompt in enumerate(prompts_of(batch, args.max_seq_length - args.new_tokens)):
                written = rollout.batch.row_mask[row].nonzero()[:, 0]
                answer = rollout.score_ids[row, written, -1].tolist()
                if answer and answer[-1] in stop_ids:
                    answer = answer[:-1]  # the end-of-turn token is not text
                prompts_out.append(prompt.tolist())
                answers.append(answer)
    return prompts_out, answers


def timing_of(lines: list[dict], first_step: int) -> dict[str, Any]:
    steps = [line for line in lines if "train/step_seconds" in line and line["step"] > first_step]
    off = [line["train/step_seconds"] for line in steps if not line.get("train/onpolicy")]
    on = [line["train/step_seconds"] for line in steps if line.get("train/onpolicy")]
    sample = [line["onpolicy/sample_seconds"] for line in steps if line.get("train/onpolicy")]
    mean = lambda values: float(np.mean(values[1:] if len(values) > 1 else values)) if values else None  # noqa: E731
    seconds = sum(line["train/step_seconds"] for line in steps)
    tokens = sum(line["teacher/tokens"] for line in steps)
    return {
        "steps": len(steps), "onpolicy_steps": len(on), "train_s": round(seconds, 2), "teacher_tokens": int(tokens),
        "train_tokens_per_s": round(sum(line["train/tokens_per_s"] * line["train/step_seconds"] for line in steps)
                                    / max(seconds, 1e-9), 1),
        "s_per_offpolicy_step": mean(off), "s_per_onpolicy_step": mean(on),
        "onpolicy_steps_per_s_ratio": (mean(off) / mean(on)) if off and on else None,
        "teacher_share": round(float(np.mean([line["teacher/share"] for line in steps])), 3),
        "sampling_share_of_onpolicy_step": round(sum(sample) / sum(on), 3) if on else None,
        "written_tokens": int(sum(line.get("onpolicy/written_tokens", 0) for line in steps)),
    }


def run_training(args: argparse.Namespace, report: dict[str, Any]) -> None:
    workdir = Path(args.workdir)
    data = prepare_dolly(args)
    manifest = read_manifest(data)
    teacher = DirectTeacher.load(args.teacher, TOPK, 1.0, device="cpu", dtype="float32", cache_dir=args.model_cache_dir)
    teacher_lm = teacher.engine.model
    held_out = PretokenizedShardDataset(data, "val")
    stop_ids = [int(manifest["eos_id"])]
    start_step = args.stage1_steps + args.warm_steps
    base_dir = workdir / "start"
    start_checkpoint = base_dir / "checkpoints" / f"step-{start_step:08d}"
    kept = lambda folder: args.keep_trained and folder.is_dir()  # noqa: E731
    if args.judge_only or kept(start_checkpoint):  # the start (and the arms) are in --workdir: judge them again
        if not start_checkpoint.is_dir():
            raise SystemExit(f"--judge-only: {start_checkpoint} is missing; run without --judge-only first "
                             "(the same --stage1-steps, --warm-steps, --steps)")
        report["start"] = {"checkpoint": str(start_checkpoint), "stage1_steps": args.stage1_steps,
                           "warm_steps": args.warm_steps, "judged_only": args.judge_only, "trained_before": True}
    else:
        shutil.rmtree(base_dir, ignore_errors=True)
        started = time.perf_counter()
        base = train(arm_config(args, data, base_dir, stop_at_step=start_step, resume="never"), teacher=teacher)
        report["start"] = {"checkpoint": base["checkpoint"], "seconds": round(time.perf_counter() - started, 1),
                           "stage1_steps": args.stage1_steps, "warm_steps": args.warm_steps}
    emit(bench="onpolicy_start", **report["start"])
    arms = report["arms"] = []
    reference = None
    for fraction in [None, *args.fractions]:  # None: the start itself, judged the same way
        if fraction is None:
            output_dir, model_dir = base_dir, start_checkpoint / "model"
        else:
            output_dir = workdir / f"fraction-{fraction:g}"
            model_dir = output_dir / "checkpoints" / f"step-{start_step + args.steps:08d}" / "model"
            if not args.judge_only and not kept(model_dir):
                shutil.rmtree(output_dir, ignore_errors=True)
                train(arm_config(args, data, output_dir, resume=report["start"]["checkpoint"],
                                 onpolicy_fraction=fraction), teacher=teacher)
        timing = timing_of(metrics_lines(output_dir), start_step) if fraction is not None else {}
        heldout, generated = judged(model_dir, args, teacher_lm, held_out, stop_ids, teacher.vocab_size)
        if fraction is None:
            report["start"].update(heldout={key: round(value, 4) for key, value in heldout.items()},
                                   generation={key: (round(value, 4) if value is not None else None)
                                               for key, value in generated.items()})
            emit(bench="onpolicy_start_judged", **report["start"])
            continue
        arm = {"onpolicy_fraction": fraction, **timing,
               "heldout": {key: round(value, 4) for key, value in heldout.items()},
               "generation": {key: (round(value, 4) if value is not None else None) for key, value in generated.items()}}
        if reference is None:
            reference = arm
        else:
            arm["vs_offpolicy"] = {
                "teacher_nll_change": round(arm["generation"]["teacher_nll"] / reference["generation"]["teacher_nll"] - 1, 4),
                "kl_change": round(arm["heldout"]["kl_teacher_student"] / reference["heldout"]["kl_teacher_student"] - 1, 4),
                "gen_reverse_kl_change": round(arm["generation"]["reverse_kl"] / reference["generation"]["reverse_kl"] - 1, 4),
                "teacher_tokens_ratio": round(arm["teacher_tokens"] / max(reference["teacher_tokens"], 1), 3),
            }
        arms.append(arm)
        emit(bench="onpolicy_arm", **arm)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")  # partial results survive


def judged(model_dir: Path, args: argparse.Namespace, teacher_lm: Any, held_out: PretokenizedShardDataset,
           stop_ids: list[int], vocab: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Held-out and generation metrics of the student in ``model_dir``; kept next to it (``judged.json``)
    and reused while its files and the judging settings are the same, so that a start or an arm linked
    into several workdirs is judged once."""
    settings = {"judge_temperature": args.judge_temperature, "judge_top_p": args.judge_top_p,
                "gen_prompts": args.gen_prompts, "gen_seeds": args.gen_seeds, "new_tokens": args.new_tokens,
                "eval_batches": args.eval_batches, "data": args.data, "max_seq_length": args.max_seq_length,
                "files": sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in model_dir.iterdir())}
    path = model_dir.parent / "judged.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved["heldout"], saved["generation"]
    student = RetNetStudent.load(model_dir).eval()
    heldout = heldout_metrics(student, teacher_lm, held_out, vocab, args.eval_batches, BATCH, torch.device("cpu"))
    prompts, answers = generations(student, held_out, args, stop_ids, vocab)
    generated = generation_metrics(teacher_lm, vocab, prompts, answers, writer=student)
    generated["stopped_share"] = sum(len(a) < args.new_tokens for a in answers) / max(len(answers), 1)
    path.write_text(json.dumps({"settings": settings, "heldout": heldout, "generation": generated}, indent=2) + "\n")
    return heldout, generated


def rows_timing(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Seconds per off- and on-policy step at each ``--rows`` per step (timing only: a fresh retrofit,
    no stage 1, ``--rows-steps`` steps at fraction 0.5, alternating; first step of each kind left out)."""
    data = prepare_dolly(args)
    teacher = DirectTeacher.load(args.teacher, TOPK, 1.0, device="cpu", dtype="float32", cache_dir=args.model_cache_dir)
    results = report["rows"] = []
    for rows in args.rows:
        output_dir = Path(args.workdir) / f"rows-{rows}"
        shutil.rmtree(output_dir, ignore_errors=True)
        config = arm_config(args, data, output_dir, batch_size=rows, attention_transfer_steps=0,
                            attention_transfer_warmup=0, max_steps=args.rows_steps, onpolicy_fraction=0.5,
                            resume="never", save_every=10 ** 6)
        train(config, teacher=teacher)
        timing = timing_of(metrics_lines(output_dir), 0)
        results.append({"rows_per_step": rows, **{key: timing[key] for key in (
            "s_per_offpolicy_step", "s_per_onpolicy_step", "onpolicy_steps_per_s_ratio",
            "sampling_share_of_onpolicy_step", "written_tokens", "teacher_share")}})
        emit(bench="onpolicy_rows", **results[-1])
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


def table(arms: list[dict[str, Any]]) -> str:
    head = (f"{'fraction':>8} {'ppl':>8} {'KL':>7} {'agree':>6} {'gen NLL':>8} {'gen RKL':>7} {'H_s':>5} {'H_t':>5} "
            f"{'stop%':>5} {'dist-2':>7} {'rep-4':>6} "
            f"{'teacher tok':>11} {'tok/s':>6} {'s/off':>6} {'s/on':>6} {'teacher%':>8}")
    lines = [head]
    fmt = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
    for arm in arms:
        h, g = arm["heldout"], arm["generation"]
        lines.append(f"{arm['onpolicy_fraction']:>8g} {h['student_perplexity']:>8.2f} {h['kl_teacher_student']:>7.3f} "
                     f"{h['top1_agreement']:>6.3f} {fmt(g['teacher_nll'], '>8.3f')} {fmt(g.get('reverse_kl'), '>7.3f')} "
                     f"{fmt(g.get('writer_entropy'), '>5.2f')} {fmt(g.get('teacher_entropy'), '>5.2f')} "
                     f"{100 * g.get('stopped_share', 0):>4.0f}% {fmt(g['distinct_2'], '>7.3f')} "
                     f"{fmt(g['repetition_4'], '>6.3f')} {arm['teacher_tokens']:>11d} {arm['train_tokens_per_s']:>6.0f} "
                     f"{fmt(arm['s_per_offpolicy_step'], '>6.2f')} {fmt(arm['s_per_onpolicy_step'], '>6.2f')} "
                     f"{100 * arm['teacher_share']:>7.0f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["scoring", "train", "rows"], choices=["scoring", "train", "rows"])
    parser.add_argument("--teacher", default=EMBEDDED_ALIAS)
    parser.add_argument("--data", default=str(DOLLY))
    parser.add_argument("--workdir", default="runs/bench-onpolicy")
    parser.add_argument("--model-cache-dir", default=DEFAULT_MODEL_CACHE_DIR)
    parser.add_argument("--output", default=None, help="JSON results (default: WORKDIR/results.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--stage1-steps", type=int, default=60)
    parser.add_argument("--warm-steps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=24, help="KD steps per arm after the shared start")
    parser.add_argument("--judge-only", action="store_true",
                        help="train part: judge the start and arms already in --workdir again (no training)")
    parser.add_argument("--keep-trained", action="store_true",
                        help="train part: train only the start / arms whose final checkpoint is not in --workdir yet")
    parser.add_argument("--onpolicy-temperature", type=float, default=1.0, help="the arms' onpolicy_temperature")
    parser.add_argument("--onpolicy-top-p", type=float, default=1.0, help="the arms' onpolicy_top_p")
    parser.add_argument("--onpolicy-divergence", default="reverse_kl",
                        help="the arms' onpolicy_divergence (the trainer's config validates it)")
    parser.add_argument("--onpolicy-jsd-beta", type=float, default=0.5, help="the arms' onpolicy_jsd_beta")
    parser.add_argument("--onpolicy-teacher-temperature", type=float, default=None,
                        help="the arms' onpolicy_teacher_temperature (default: the run's temperature, 1)")
    parser.add_argument("--onpolicy-sequence-weight", type=float, default=0.0, help="the arms' onpolicy_sequence_weight")
    parser.add_argument("--onpolicy-sequence-reward", default="reverse_kl", choices=["reverse_kl", "teacher_logprob"],
                        help="the arms' onpolicy_sequence_reward")
    parser.add_argument("--onpolicy-sequence-discount", type=float, default=0.9,
                        help="the arms' onpolicy_sequence_discount")
    parser.add_argument("--onpolicy-sequence-return", default="expected", choices=["expected", "sampled"],
                        help="the arms' onpolicy_sequence_return")
    parser.add_argument("--judge-temperature", type=float, default=1.0, help="sampling of the judged answers")
    parser.add_argument("--judge-top-p", type=float, default=1.0, help="sampling of the judged answers")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--student-topk", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--gen-prompts", type=int, default=32)
    parser.add_argument("--gen-seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH, help="scoring part: rows per request")
    parser.add_argument("--reps", type=int, default=8, help="scoring part: requests of each kind")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16], help="rows part: rows per step")
    parser.add_argument("--rows-steps", type=int, default=6, help="rows part: steps per size (half on-policy)")
    args = parser.parse_args()
    if args.fractions[0] != 0.0:
        parser.error("--fractions must start with 0 (the off-policy reference)")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    args.output = args.output or str(Path(args.workdir) / "results.json")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
                              "teacher": args.teacher, "args": vars(args)}
    if "scoring" in args.parts:
        data = prepare_dolly(args)
        report["scoring"] = scoring_cost(args, PretokenizedShardDataset(data, "train"), read_manifest(data)["vocab_size"])
        emit(bench="onpolicy_scoring", **report["scoring"])
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if "train" in args.parts:
        run_training(args, report)
        print()
        print(table(report["arms"]))
    if "rows" in args.parts:
        rows_timing(args, report)
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
