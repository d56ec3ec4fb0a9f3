"""The decoding fast paths side by side in one process: milliseconds per recurrent step of the student
at 1-16 rows, before and after each path, and the sampler against ``torch.multinomial``.

Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_decode_paths.py [--checkpoint MODEL_DIR]

Student: ``--checkpoint`` (a model folder, e.g. a run's checkpoints/step-N/model), else the retrofit's
shape of the embedded SmolLM2-135M teacher (158M parameters) with the teacher's weights copied in
(timing only: the numbers do not depend on the weights). Three ways to step, alternated ``--reps``
times per row count (medians; the first step of each timed run is left out):

- ``before``: ``F.linear`` for every projection (``decode_linear.FEW_ROWS = 0``) and a fresh state
  per step (``step(overwrite=False)``), what the sampler did until this benchmark's change;
- ``few_rows``: the ``W @ x^T`` orientation for at most 4 fp32 rows (``decode_linear.py``, without its
  split over the threads);
- ``few_rows+overwrite``: and the state updated in place (``step(overwrite=True)``);
- ``+split``: and each product split over the threads, for at most ``decode_linear.FEW_ROWS`` (16) rows:
  what the on-policy sampler, ``generate`` and the serving engine use now.

Also: one draw per row from ``[4, V]`` probabilities, ``torch.multinomial`` against the inverse-CDF
draw of ``sample_next_token``; and the nucleus (temperature 0.7, top-p 0.9, the ``generate`` defaults)
on the student's own next-token logits along 32 decoded tokens of 4 rows: a full sort of the vocabulary
against ``sample_next_token``'s top-k candidates (the same draws, checked), with how many rows' nuclei
fit in each candidate size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from student_trainer.model import decode_linear
from student_trainer.model.retrofit import copy_teacher_weights, load_teacher_lm, student_config_for
from student_trainer.model import student as student_module
from student_trainer.model.student import RetNetStudent, _inverse_cdf_sample, sample_next_token
from teacher_server.engines.model_source import EMBEDDED_ALIAS

# name: (few_rows, split, overwrite)
PATHS = {"before": (0, False, False), "few_rows": (4, False, False), "few_rows+overwrite": (4, False, True),
         "+split": (decode_linear.FEW_ROWS, True, True)}


@torch.no_grad()
def ms_per_step(student: RetNetStudent, rows: int, steps: int, few_rows: int, split: bool, overwrite: bool) -> float:
    decode_linear.FEW_ROWS, decode_linear.SPLIT = few_rows, split
    ids = torch.randint(0, student.config.vocab_size, (rows, 48), generator=torch.Generator().manual_seed(rows))
    logits, state = student.prefill(ids)
    token = logits.argmax(-1)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        logits, state = student.step(token, state, overwrite=overwrite)
        times.append(time.perf_counter() - started)
        token = logits.argmax(-1)
    return 1000 * statistics.median(times[1:])


def sampler_us(vocab: int, reps: int) -> dict[str, float]:
    probs = torch.softmax(torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    generator = torch.Generator().manual_seed(1)
    out = {}
    for name, draw in (("multinomial", lambda: torch.multinomial(probs, 1, generator=generator)),
                       ("inverse_cdf", lambda: _inverse_cdf_sample(probs, generator))):
        draw()
        started = time.perf_counter()
        for _ in range(reps):
            draw()
        out[f"{name}_us"] = round(1e6 * (time.perf_counter() - started) / reps, 1)
    return out


@torch.no_grad()
def nucleus_us(student: RetNetStudent, tokens: int = 32, reps: int = 5) -> dict[str, Any]:
    """Microseconds per nucleus draw of 4 rows, full sort vs top-k candidates, on the student's logits."""
    ids = torch.randint(0, student.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(4))
    logits, state = student.prefill(ids)
    steps, generator = [], torch.Generator().manual_seed(5)
    for _ in range(tokens):
        steps.append(logits.float())
        token = sample_next_token(logits, 0.7, 0.9, generator)
        logits, state = student.step(token, state, overwrite=True)
    probs = [torch.softmax(z / 0.7, dim=-1) for z in steps]
    sizes = [int((p.sort(dim=-1, descending=True).values.cumsum(-1) < 0.9).sum(-1).max()) + 1 for p in probs]
    out: dict[str, Any] = {"nucleus_sizes": {f"<= {k}": sum(n <= k for n in sizes)
                                             for k in student_module.NUCLEUS_CANDIDATES}, "draws": len(sizes)}
    candidates, draws = student_module.NUCLEUS_CANDIDATES, {}
    for name, setting in (("full_sort", ()), ("candidates", candidates)):
        student_module.NUCLEUS_CANDIDATES = setting
        started = time.perf_counter()
        for rep in range(reps):
            generator = torch.Generator().manual_seed(rep)
            draws[name] = [sample_next_token(z, 0.7, 0.9, generator) for z in steps]
        out[f"{name}_us"] = round(1e6 * (time.perf_counter() - started) / (reps * len(steps)), 1)
    student_module.NUCLEUS_CANDIDATES = candidates
    out["same_draws"] = all(torch.equal(a, b) for a, b in zip(draws["full_sort"], draws["candidates"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a student model folder (default: the retrofit shape)")
    parser.add_argument("--model-cache-dir", default="~/.cache/retnet-distill/models")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=12, help="steps timed per run")
    parser.add_argument("--reps", type=int, default=3, help="runs of each path per row count (alternated)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        student = RetNetStudent.load(args.checkpoint)
    else:
        teacher_lm, _, _ = load_teacher_lm(EMBEDDED_ALIAS, args.model_cache_dir)
        student = RetNetStudent(student_config_for(teacher_lm))
        copy_teacher_weights(student, teacher_lm)
        del teacher_lm
    student.eval()
    print(json.dumps({"bench": "decode_paths_machine", "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "parameters": student.num_parameters(), "few_rows": decode_linear.FEW_ROWS,
                      "split": decode_linear.SPLIT}), flush=True)
    for rows in args.rows:
        runs: dict[str, list[float]] = {name: [] for name in PATHS}
        for _ in range(args.reps):
            for name, (few_rows, split, overwrite) in PATHS.items():
                runs[name].append(ms_per_step(student, rows, args.steps, few_rows, split, overwrite))
        medians = {name: round(statistics.median(values), 1) for name, values in runs.items()}
        print(json.dumps({"bench": "decode_paths", "rows": rows, "ms_per_step": medians,
                          "speedup": round(medians["before"] / medians["+split"], 2),
                          "split_speedup": round(medians["few_rows+overwrite"] / medians["+split"], 2)}), flush=True)
    decode_linear.FEW_ROWS, decode_linear.SPLIT = PATHS["+split"][:2]
    print(json.dumps({"bench": "decode_sampler", "rows": 4, "vocab": student.config.vocab_size,
                      **sampler_us(student.config.vocab_size, 200)}), flush=True)
    print(json.dumps({"bench": "decode_nucleus", "rows": 4, "temperature": 0.7, "top_p": 0.9, **nucleus_us(student)}),
          flush=True)


if __name__ == "__main__":
    main()
