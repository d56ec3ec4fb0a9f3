"""Training on CPU with the embedded teacher: does distillation help, does Muon help, how fast is it.

Prints JSON lines. Run: .venv/bin/python benchmarks/bench_train.py [--steps 100] [--quick]

All runs share one data order (seed 0), one tiny student initialisation (seed 0) and the same
teacher targets: the embedded SmolLM2-135M-Instruct teacher scores every training batch once
(direct mode), and a memo replays its targets to every run, so the runs differ only in the
setting under test:

- kd_muon:    distill_alpha=0.5, Muon + AdamW    (the default recipe)
- ce_muon:    distill_alpha=1.0, Muon + AdamW    (hard labels only, no teacher signal)
- kd_adamw:   distill_alpha=0.5, AdamW only

Reported per run: held-out KL(teacher || student), CE/perplexity and top-1 agreement at step 0 and
at the end, and for Muon vs AdamW the first step whose smoothed training loss reaches AdamW's final
smoothed loss. A last run measures tokens/s of the student step alone and with the teacher's
forward included (teacher share of the step time).
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
import torch

from student_trainer.training.config import load_config
from student_trainer.teachers.targets import TeacherTargets
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train


class MemoTeacher:
    """Replays a real teacher's targets for batches it has seen (keyed by dataset row ids)."""

    def __init__(self, teacher: DirectTeacher) -> None:
        self.teacher = teacher
        self.name, self.vocab_size, self.tokenizer_sha256 = teacher.name, teacher.vocab_size, teacher.tokenizer_sha256
        self.k, self.temperature = teacher.k, teacher.temperature
        self.memo: dict[tuple[int, ...], TeacherTargets] = {}
        self.teacher_seconds = 0.0

    def targets_for(self, input_ids, lengths, indices) -> TeacherTargets:
        key = tuple(indices.tolist())
        if key not in self.memo:
            started = time.perf_counter()
            self.memo[key] = self.teacher.targets_for(input_ids, lengths, indices)
            self.teacher_seconds += time.perf_counter() - started
        return self.memo[key]

    def close(self) -> None:
        pass


def metrics_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def smoothed_losses(lines: list[dict], beta: float = 0.9) -> dict[int, float]:
    ema, out = None, {}
    for line in lines:
        if "train/total" in line:
            ema = line["train/total"] if ema is None else beta * ema + (1 - beta) * line["train/total"]
            out[line["step"]] = ema
    return out


def run(name: str, workdir: Path, teacher, steps: int, overrides: dict) -> dict:
    settings = {"output_dir": str(workdir / name), "model_variant": "tiny", "device": "cpu", "train_data": "python-docs",
                "data_dir": str(workdir / "data"), "max_seq_length": 128, "batch_size": 4, "max_steps": steps,
                "warmup_steps": max(1, steps // 10), "log_every": 1, "eval_every": steps, "eval_batches": 8,
                "save_every": steps, "wandb_mode": "disabled", "progress": False, "lr": 3e-3, "weight_decay": 0.0,
                "saddle_detection": False, "teacher_topk": 64, **overrides}
    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    started = time.perf_counter()
    train(config, teacher=teacher)
    seconds = time.perf_counter() - started
    lines = metrics_lines(workdir / name)
    first_eval = next(line for line in lines if "eval/kl" in line)
    last_eval = [line for line in lines if "eval/kl" in line][-1]
    return {"bench": "train", "run": name, "steps": steps, "seconds": round(seconds, 1), **overrides,
            "eval_kl_step0": round(first_eval["eval/kl"], 4), "eval_kl_end": round(last_eval["eval/kl"], 4),
            "eval_ppl_step0": round(first_eval["eval/ppl"], 1), "eval_ppl_end": round(last_eval["eval/ppl"], 1),
            "eval_top1_step0": round(first_eval["eval/top1_agreement"], 4),
            "eval_top1_end": round(last_eval["eval/top1_agreement"], 4),
            "train_loss_smoothed_end": round(list(smoothed_losses(lines).values())[-1], 4), "_lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="10 steps, to check the script")
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "python": platform.python_version(), "teacher": "smollm2-135m-instruct", "student": "tiny"}))
    teacher = DirectTeacher.load("smollm2-135m-instruct", k=64, temperature=1.0, device="cpu")
    memo = MemoTeacher(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = {}
        for name, overrides in (("kd_muon", {"distill_alpha": 0.5, "optimizer": "muon"}),
                                ("ce_muon", {"distill_alpha": 1.0, "optimizer": "muon"}),
                                ("kd_adamw", {"distill_alpha": 0.5, "optimizer": "adamw"})):
            results[name] = run(name, workdir, memo, steps, overrides)
            print(json.dumps({k: v for k, v in results[name].items() if k != "_lines"}))
        adamw_final = results["kd_adamw"]["train_loss_smoothed_end"]
        muon_curve = smoothed_losses(results["kd_muon"]["_lines"])
        reached = next((step for step, loss in muon_curve.items() if loss <= adamw_final), None)
        print(json.dumps({"bench": "muon_vs_adamw", "adamw_steps": steps, "adamw_final_smoothed_loss": adamw_final,
                          "muon_steps_to_reach_it": reached}))

        # Throughput: the student step alone (targets replayed) vs with the teacher's forward.
        for label, source in (("student_only", memo), ("with_teacher_forward", teacher)):
            result = run(f"speed_{label}", workdir, source, max(5, steps // 5), {"distill_alpha": 0.5})
            timed = [line for line in result["_lines"] if "train/tokens_per_s" in line][1:]  # skip the first step
            print(json.dumps({"bench": "train_speed", "mode": label, "steps": len(timed),
                              "tokens_per_s": round(float(np.median([l["train/tokens_per_s"] for l in timed])), 1),
                              "teacher_share": round(float(np.median([l["teacher/share"] for l in timed])), 3)}))


if __name__ == "__main__":
    main()
