"""The main job on embedded defaults: what the README's first command (``make run``) runs.

The whole pipeline, top to bottom, with nothing downloaded:

1. prepare the embedded SmolLM2-135M-Instruct teacher (its GGUF is converted once);
2. start the teacher service on a free loopback port (or use ``--teacher-url``, e.g. in compose);
3. build the embedded ``python-docs`` corpus with the teacher's tokenizer;
4. retrofit a RetNet student from the teacher's weights (``--student retrofit``, the default: stage 1
   attention transfer with the teacher in process, then stage 2 KD in network mode over msgpack), or
   distil the tiny random-init student (``--student tiny``), with progress bars;
5. stop the service (always, also on errors), then evaluate the student against the teacher in
   process and print a short report; ``report.json`` and ``curves.png`` land in the work folder.

Sized to finish in well under 15 minutes on 2 CPU cores (``benchmarks/RESULTS.md`` has the timing).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from student_trainer.training.config import TrainConfig
from student_trainer.teachers.process import LocalTeacher
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR as DEFAULT_CACHE_DIR
from teacher_server.engines.model_source import EMBEDDED_ALIAS, resolve_model

# The tiny random-init student (--student tiny) at 4 x 128 tokens per step. The CPU teacher computes
# ~400 tokens/s on 2 cores, so one step costs ~1.3 s of teacher time; prefetching overlaps it with the step.
MAIN_JOB_TINY = {
    "model_variant": "tiny", "max_seq_length": 128, "batch_size": 4, "teacher_topk": 64, "temperature": 1.0,
    "distill_alpha": 0.5, "optimizer": "muon", "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 20,
    "log_every": 10, "eval_every": 100, "eval_batches": 4, "save_every": 100, "keep_last": 2,
    "saddle_window": 40, "saddle_warmup_steps": 60, "saddle_patience": 10, "prefetch_depth": 2,
    "cpu_threads": 1,  # the teacher service takes the other core
}

# The retrofitted student (the default): the teacher's shape and weights (SmolLM2: 30 layers, d 576,
# 158M parameters). Stage 1 trains the retention on the teacher's attention outputs (the teacher runs
# in this process; the service idles), stage 2 distils every parameter over the network. AdamW, not
# Muon: torch's Muon runs Newton-Schulz in bf16, which CPUs without bf16 instructions (AVX2-only, as
# here) compute ~300x slower than the rest of a step. fp32: bf16 autocast is ~7x slower on such CPUs.
MAIN_JOB_RETROFIT = {
    "student_init": "teacher", "attention_transfer_steps": 90, "attention_transfer_lr": 1e-2,
    "attention_transfer_warmup": 3, "attention_transfer_loss": "relative",
    "max_seq_length": 128, "batch_size": 4, "teacher_topk": 64, "temperature": 1.0, "distill_alpha": 0.2,
    "optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 3, "grad_clip": 1.0,
    "log_every": 5, "eval_every": 1000, "eval_batches": 2, "save_every": 1000, "keep_last": 2,  # 2: the stage boundary too
    "saddle_detection": False, "prefetch_depth": 2, "precision": "fp32",
    "cpu_threads": 2,  # the student's step dominates; the service (1 thread) fits beside it
}
MAIN_JOB_STEPS = {"retrofit": 100, "tiny": 300}  # retrofit: 90 of attention transfer (~3.7 s each), 10 of KD (~10 s)
TEACHER_THREADS = {"retrofit": "1", "tiny": "2"}


def main_job_config(workdir: Path, teacher_url: str, model: str, max_steps: int | None, data_dir: str,
                    model_cache_dir: str, device: str = "auto", student: str = "retrofit") -> TrainConfig:
    """The training config of the main job (every other key keeps its default). ``max_steps`` (None:
    the student's default) shortens smoke runs: stage 1 keeps its share of the steps."""
    recipe = MAIN_JOB_RETROFIT if student == "retrofit" else MAIN_JOB_TINY
    default_steps = MAIN_JOB_STEPS[student]
    max_steps = max_steps or default_steps
    values: dict[str, Any] = {
        **recipe, "output_dir": str(workdir / "train"), "max_steps": max_steps, "device": device,
        "teacher_mode": "network", "teacher_url": teacher_url, "teacher_model": model, "train_data": "python-docs",
        "data_dir": data_dir, "model_cache_dir": model_cache_dir, "wandb_mode": "auto",
    }
    stage1 = recipe.get("attention_transfer_steps", 0) * max_steps // default_steps
    if stage1:
        values["attention_transfer_steps"] = stage1
        values["attention_transfer_warmup"] = min(recipe["attention_transfer_warmup"], stage1 // 3)
    values["warmup_steps"] = min(recipe["warmup_steps"], (max_steps - stage1) // 5)  # short smoke runs
    config = TrainConfig(**values)  # typed values: no round trip through key=value YAML text
    config.check()
    return config


def run_main_job(
    model: str = EMBEDDED_ALIAS,
    workdir: Path = Path("runs/main"),
    teacher_url: str | None = None,
    max_steps: int | None = None,
    data_dir: str = "data",
    model_cache_dir: str = DEFAULT_CACHE_DIR,
    eval_batches: int = 8,
    device: str = "auto",
    student: str = "retrofit",
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the pipeline; returns ``{"train": train summary, "report": evaluation report, ...}``."""
    from student_trainer.evaluation.evaluate import EvalSettings, evaluate
    from student_trainer.training.recipe import prepare_data, train

    console = console or Console()
    console.rule("[bold]retnet-distill: main job")
    started = time.perf_counter()
    with console.status(f"preparing teacher {model} (the first run converts the embedded GGUF once)"):
        source = resolve_model(model, model_cache_dir)
    console.print(f"teacher weights: {source.path}")

    from teacher_server.engines.hf import pick_device

    device = pick_device(device)  # auto: CUDA when there is a GPU (compose.gpu.yml), else the CPU
    config = main_job_config(workdir, teacher_url or "http://127.0.0.1:0", model, max_steps, data_dir, model_cache_dir,
                             device, student)
    with console.status("building the python-docs corpus with the teacher's tokenizer"):
        data = prepare_data(config)
    console.print(f"training data: {data}")

    teacher: LocalTeacher | None = None
    exit_code = None
    try:
        if teacher_url is None:
            with console.status("starting the teacher service"):
                teacher = LocalTeacher(model, workdir / "teacher.log",
                                       env={"TEACHER_MODEL_CACHE_DIR": model_cache_dir, "OMP_WAIT_POLICY": "PASSIVE",
                                            "TEACHER_TORCH_THREADS": TEACHER_THREADS[student]}).__enter__()
            config.teacher_url = teacher.url
            console.print(f"teacher service ready at {teacher.url} (log: {workdir / 'teacher.log'})")
        if student == "retrofit":
            console.print(f"retrofitting a RetNet student from {model}'s weights: {config.attention_transfer_steps} steps "
                          f"of attention transfer (teacher in process), then {config.max_steps - config.attention_transfer_steps} "
                          f"steps of KD in network mode ({config.batch_size} x {config.max_seq_length} tokens per step, "
                          f"top-{config.teacher_topk})")
        else:
            console.print(f"distilling a {config.model_variant} RetNet student for {config.max_steps} steps in network "
                          f"mode ({config.batch_size} x {config.max_seq_length} tokens per step, top-{config.teacher_topk})")
        summary = train(config)
    finally:
        if teacher is not None:
            exit_code = teacher.stop()
            console.print(f"teacher service stopped (exit code {exit_code})")
    trained = time.perf_counter()

    with console.status("evaluating the student against the teacher") as status:
        report = evaluate(EvalSettings(checkpoint=config.output_dir, data=str(data), teacher=model,
                                       batches=eval_batches, output_dir=str(workdir / "eval"), device=device,
                                       model_cache_dir=model_cache_dir, max_new_tokens=40),
                          progress=status.update)
    print_report(console, report)
    console.print(f"main job took {time.perf_counter() - started:.0f}s (training {trained - started:.0f}s); "
                  f"report: {report['report_json']}; curves: {report.get('curves_png')}")
    return {"train": summary, "report": report, "teacher_exit_code": exit_code, "seconds": time.perf_counter() - started}


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The short human report: held-out numbers of teacher vs student, and one sample answer."""
    m = report["metrics"]
    table = Table(title=f"held-out ({report['split']} split, {int(m['target_tokens'])} target tokens)")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_row("perplexity", f"{m['teacher_perplexity']:.1f}", f"{m['student_perplexity']:.1f}")
    table.add_row("top-1 accuracy", f"{m['teacher_top1_accuracy']:.3f}", f"{m['student_top1_accuracy']:.3f}")
    table.add_row("parameters", "", f"{report['student_parameters']:,}")
    console.print(table)
    console.print(f"KL(teacher || student) {m['kl_teacher_student']:.3f} nats/token; top-1 agreement "
                  f"{m['top1_agreement']:.3f}; recurrent vs parallel max |diff| {m['recurrent_vs_parallel_max_abs_diff']:.1e}; "
                  f"decode {m['decode_tokens_per_s']:.0f} tokens/s")
    for sample in report["samples"]:
        console.print(f"[bold]prompt:[/bold] {sample['prompt']}")
        console.print(f"[bold]student:[/bold] {sample['student']!r}")
        console.print(f"[bold]teacher:[/bold] {sample['teacher']!r}")
