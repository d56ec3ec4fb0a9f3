"""Decode latency and state memory vs context: the RetNet student's recurrent state against the
teacher's Hugging Face ``generate`` with its KV cache, side by side in one process.

Prints JSON lines. Run: .venv/bin/python benchmarks/bench_decode.py [--contexts 128 512 2048 4096]

For each context N (real python-docs text, repeated to reach N tokens):

- student: one parallel prefill of the N-token prompt, then ``--tokens`` greedy recurrent steps;
  per-token latency = median step time; state memory = bytes of every tensor in the state.
- teacher (SmolLM2-135M-Instruct, embedded): ``model.generate`` with its KV cache, greedy, timed for
  1 and for 1 + ``--tokens`` new tokens; per-token latency = the difference / ``--tokens`` (the
  prefill cancels); KV memory = bytes of the cache after a forward over the prompt.

Goal (issue 7): the student's latency at 4096 within 1.2x of its latency at 128, its state memory
constant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from student_trainer.model.student import RetNetStudent, StudentConfig
from student_trainer.data.tokenizer import load_tokenizer
from teacher_server.engines.model_source import EMBEDDED_ALIAS, resolve_model


def context_ids(tokenizer, length: int) -> torch.Tensor:
    """``[length]`` token ids of real text (pydoc topics, repeated as needed)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[key] for key in sorted(topics)[:40]))["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor(ids[:length])


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable through dicts, lists, tuples and object attributes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "layers"):  # transformers' DynamicCache (a list of per-layer caches)
        return sum(tensor_bytes(getattr(layer, name, None)) for layer in obj.layers for name in ("keys", "values"))
    return 0


@torch.no_grad()
def student_decode(student: RetNetStudent, ids: torch.Tensor, tokens: int) -> dict[str, float]:
    logits, state = student.prefill(ids[None])
    token = logits.argmax(-1)
    times = []
    for _ in range(tokens):
        started = time.perf_counter()
        logits, state = student.step(token, state, overwrite=True)
        token = logits.argmax(-1)
        times.append(time.perf_counter() - started)
    return {"ms_per_token": 1000 * statistics.median(times), "state_bytes": tensor_bytes(state.layers)}


@torch.no_grad()
def teacher_decode(model, ids: torch.Tensor, tokens: int) -> dict[str, float]:
    prompt = ids[None]
    mask = torch.ones_like(prompt)

    def timed(new: int) -> float:
        started = time.perf_counter()
        model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - started

    timed(1)  # warm-up at this context
    one, many = timed(1), timed(1 + tokens)
    cache = model(prompt, use_cache=True).past_key_values
    return {"ms_per_token": 1000 * (many - one) / tokens, "kv_cache_bytes": tensor_bytes(cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per context")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(EMBEDDED_ALIAS)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(resolve_model(EMBEDDED_ALIAS, "~/.cache/retnet-distill/models").path,
                                                   dtype=torch.float32).eval()
    students = {
        "tiny": RetNetStudent(StudentConfig.from_preset("tiny", vocab_size=len(tokenizer))).eval(),
        # a mid-size student (d=512, 8 layers): per-step work large enough that timing noise is small
        "d512x8": RetNetStudent(StudentConfig(vocab_size=len(tokenizer), d_model=512, n_layers=8, n_heads=8,
                                              ffn_dim=1024, value_dim=1024)).eval(),
    }
    print(json.dumps({"bench": "decode_machine", "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "students": {k: s.num_parameters() for k, s in students.items()},
                      "teacher_parameters": sum(p.numel() for p in teacher.parameters())}), flush=True)
    results: dict[str, dict[int, dict]] = {name: {} for name in [*students, "teacher"]}
    for context in args.contexts:
        ids = context_ids(tokenizer, context)
        for name, student in students.items():
            results[name][context] = student_decode(student, ids, args.tokens)
            print(json.dumps({"bench": "decode", "model": f"student-{name}", "context": context,
                              **results[name][context]}), flush=True)
        results["teacher"][context] = teacher_decode(teacher, ids, args.tokens)
        print(json.dumps({"bench": "decode", "model": "teacher-smollm2-135m", "context": context,
                          **results["teacher"][context]}), flush=True)
    low, high = min(args.contexts), max(args.contexts)
    for name in results:
        row = results[name]
        memory_key = "kv_cache_bytes" if name == "teacher" else "state_bytes"
        summary = {"bench": "decode_summary", "model": name, f"latency_{high}_vs_{low}":
                   round(row[high]["ms_per_token"] / row[low]["ms_per_token"], 3),
                   f"memory_{high}_vs_{low}": round(row[high][memory_key] / row[low][memory_key], 3)}
        if name != "teacher":
            summary.update(goal="latency ratio <= 1.2 and memory ratio == 1",
                           met=summary[f"latency_{high}_vs_{low}"] <= 1.2 and summary[f"memory_{high}_vs_{low}"] == 1.0)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
