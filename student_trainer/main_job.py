"""The main job on embedded defaults: what the README's first command runs.

Today it starts the teacher service on the embedded SmolLM2 teacher, asks it for top-k
log-probabilities over msgpack exactly as the trainer's network mode will, prints the answer and
stops the service. Later issues extend it to a whole distillation run.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from shared.wire import MSGPACK, decode_topk_response, encode_topk_request
from student_trainer.teacher_process import LocalTeacher
from student_trainer.tokenizer import DEFAULT_MODEL_CACHE_DIR as DEFAULT_CACHE_DIR
from teacher_server.engines.model_source import EMBEDDED_ALIAS, resolve_model


def run_main_job(
    model: str = EMBEDDED_ALIAS,
    prompt: str = "The capital of France is",
    k: int = 5,
    workdir: Path = Path("runs/main"),
    model_cache_dir: str = DEFAULT_CACHE_DIR,
    console: Console | None = None,
) -> dict:
    """Start the teacher, fetch one top-k answer for ``prompt``, stop the teacher; returns a summary."""
    from transformers import AutoTokenizer

    console = console or Console()
    console.rule("[bold]retnet-distill: main job")
    started = time.perf_counter()
    with console.status(f"preparing teacher {model} (the first run converts the embedded GGUF once)"):
        source = resolve_model(model, model_cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    console.print(f"teacher weights: {source.path}")

    log_path = workdir / "teacher.log"
    with console.status("starting the teacher service"):
        teacher = LocalTeacher(model, log_path, env={"TEACHER_MODEL_CACHE_DIR": model_cache_dir}).__enter__()
    try:
        console.print(f"teacher service ready at {teacher.url} (log: {log_path})")
        ids = tokenizer(prompt)["input_ids"]
        body = encode_topk_request([ids], k=k, temperature=1.0, fmt="msgpack")
        reply = httpx.post(teacher.url + "/v1/topk", content=body, headers={"Content-Type": MSGPACK}, timeout=120)
        reply.raise_for_status()
        answer = decode_topk_response(reply.content, "msgpack")
    finally:
        exit_code = teacher.stop()

    last_ids, last_logprobs = answer.indices[-1], answer.logprobs[-1].astype(np.float64)
    table = Table(title=f"teacher's next-token top-{k} after {prompt!r}")
    table.add_column("rank", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("prob", justify="right")
    for rank, (token_id, logprob) in enumerate(zip(last_ids, last_logprobs), start=1):
        table.add_row(str(rank), repr(tokenizer.decode([int(token_id)])), str(int(token_id)), f"{np.exp(logprob):.3f}")
    table.add_row("", "(tail: all other tokens)", "", f"{np.exp(float(answer.tail_logprob[-1])):.3f}")
    console.print(table)
    console.print(
        f"{len(ids)} positions x k={k} in {len(reply.content)} bytes of msgpack; "
        f"teacher compute {answer.timing.get('compute_ms', 0):.0f} ms; tokenizer sha256 {answer.tokenizer_sha256[:16]}..."
    )
    console.print(f"teacher service stopped (exit code {exit_code}); main job took {time.perf_counter() - started:.1f}s")
    return {
        "model": answer.model,
        "prompt_ids": ids,
        "top_tokens": [tokenizer.decode([int(i)]) for i in last_ids],
        "top_probs": np.exp(last_logprobs).tolist(),
        "teacher_exit_code": exit_code,
    }
