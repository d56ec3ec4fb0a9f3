"""Steps/s of the same tiny training run in direct, cached and network mode, side by side.

Prints JSON lines. Run: .venv/bin/python benchmarks/bench_modes.py [--steps 60] [--model smollm2-135m-instruct]

The teacher is, by default, the tiny random Llama the tests build (it keeps up with the student
on 2 CPU cores, which is the case the goal is about: "network at least 0.95x cached when the
teacher keeps up"); `--model smollm2-135m-instruct` uses the embedded teacher instead, which on a
2-core CPU cannot keep up and shows what the teacher costs. Network mode runs the teacher service
in its own process on loopback with prefetch. Reported: median seconds per step (after 5 warm-up
steps), steps/s, the teacher's share of the step time, and network/cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student_trainer.training.config import load_config  # noqa: E402
from student_trainer.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from student_trainer.teachers.process import LocalTeacher  # noqa: E402
from student_trainer.training.recipe import train  # noqa: E402
from teacher_server.engines.cache_fill import cache_spec, fill_cache  # noqa: E402
from teacher_server.engines.hf import HFEngine  # noqa: E402


def run(mode: str, workdir: Path, data: Path, model: str, steps: int, extra: dict) -> dict:
    settings = {"output_dir": str(workdir / f"run-{mode}"), "model_variant": "tiny", "device": "cpu", "train_data": str(data),
                "max_seq_length": 64, "batch_size": 8, "max_steps": steps, "warmup_steps": 2, "log_every": 1,
                "eval_every": steps, "eval_batches": 1, "save_every": steps, "wandb_mode": "disabled", "progress": False,
                "teacher_topk": 32, "teacher_model": model, "teacher_mode": mode, "saddle_detection": False,
                "cpu_threads": 1, **extra}  # one core for the student, one for the teacher service
    train(load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))
    lines = [json.loads(line) for line in (workdir / f"run-{mode}" / "metrics.jsonl").read_text().splitlines()]
    timed = [line for line in lines if "train/step_seconds" in line][5:]
    seconds = statistics.median(line["train/step_seconds"] for line in timed)
    return {"bench": "modes", "mode": mode, "steps_timed": len(timed), "seconds_per_step": round(seconds, 4),
            "steps_per_s": round(1 / seconds, 2),
            "teacher_share": round(statistics.median(line["teacher/share"] for line in timed), 3)}


def write_cache(model: str, data: Path, output: Path) -> None:
    """A k=32 cache of both splits; the engine is freed on return, before the timed runs."""
    engine = HFEngine(model, device="cpu")
    for split in ("train", "val"):
        fill_cache(lambda request: engine.topk([request])[0], cache_spec(engine, data, split, 32, 1.0, 256), data,
                   output / split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default=None, help="teacher (default: a tiny random Llama built here)")
    args = parser.parse_args()
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model is None:
            from tests.conftest import build_tiny_llama

            model = str(build_tiny_llama(workdir / "tiny-teacher"))
        else:
            model = args.model
        data = workdir / "docs"
        preprocess(PreprocessConfig(inputs=["python-docs"], output=str(data), tokenizer=model, max_seq_length=64,
                                    val_fraction=0.05, progress=False))
        write_cache(model, data, workdir / "cache")
        results = {"direct": run("direct", workdir, data, model, args.steps, {}),
                   "cached": run("cached", workdir, data, model, args.steps, {"teacher_cache": str(workdir / "cache")})}
        with LocalTeacher(model, workdir / "teacher.log", env={"TEACHER_TORCH_THREADS": "1"}) as teacher:
            results["network"] = run("network", workdir, data, model, args.steps,
                                     {"teacher_url": teacher.url, "prefetch_depth": 4})
        for result in results.values():
            print(json.dumps(result))
        ratio = results["network"]["steps_per_s"] / results["cached"]["steps_per_s"]
        print(json.dumps({"bench": "modes_summary", "teacher": Path(model).name, "network_vs_cached": round(ratio, 3),
                          "goal": ">= 0.95 when the teacher keeps up", "met": ratio >= 0.95}))


if __name__ == "__main__":
    main()
