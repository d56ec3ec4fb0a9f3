"""lm-evaluation-harness on a teacher and an exported student: a local task, the run and "% of teacher".

No machine here reaches the Hugging Face hub, where lm-eval's standard tasks keep their data, so the
package ships one local multiple-choice task, ``retnet_dolly_mc``: 85 short factual questions of the
Dolly sample (``open_qa`` / ``general_qa`` records without context, answers of at most 25 words), each
with its own answer and three answers of other questions as distractors (a fixed seed). A model picks
the choice it gives the highest log-likelihood after ``Question: ...\\nAnswer:``; ``acc_norm`` divides
by the choice's length in bytes. Chance is 0.25.

``run_lm_eval`` runs lm-eval's ``hf`` model (``trust_remote_code=True``: the student is an export of
``retnet-distill export``) through its Python API; ``percent_of_teacher`` puts the two side by side.
lm-eval is the optional ``eval`` extra (``pip install -e '.[eval]'``; the ``dev`` extra includes it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TASK = "retnet_dolly_mc"
TASK_DATA = Path(__file__).resolve().parent / "lm_eval_data" / f"{TASK}.jsonl"
CHOICES = 4
SEED = 0
# lm-eval's YAML reads data files relative to the working directory, so the YAML is written at run
# time with the data's absolute path.
_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


class LmEvalError(RuntimeError):
    """lm-eval is missing or a task could not run; the message says what to do."""


def build_dolly_mc(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task's items from Dolly records: ``{"question", "choices" [4], "label"}`` (label: index of
    the question's own answer). Deterministic for the same records."""
    pool = [r for r in records if r.get("category") in ("open_qa", "general_qa") and not r.get("context")
            and 0 < len(r["response"].split()) <= 25]
    rng = random.Random(SEED)
    items = []
    for i, record in enumerate(pool):
        others = [j for j in range(len(pool)) if j != i and pool[j]["response"].strip() != record["response"].strip()]
        choices = [pool[j]["response"].strip() for j in rng.sample(others, CHOICES - 1)]
        label = rng.randrange(CHOICES)
        choices.insert(label, record["response"].strip())
        items.append({"question": record["instruction"].strip(), "choices": choices, "label": label})
    return items


def write_task_dir(folder: Path, data: Path = TASK_DATA) -> Path:
    """An lm-eval ``--include_path`` folder holding the task's YAML (pointing at ``data``)."""
    if not data.is_file():
        raise LmEvalError(f"the task data {data} is missing; reinstall the package (it ships with it)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK}.yaml").write_text(_TASK_YAML.format(task=TASK, data=json.dumps(str(data))))
    return folder


def run_lm_eval(model_dir: str | Path, work_dir: Path, tasks: list[str] | None = None, limit: int | None = None,
                batch_size: int = 1, device: str = "cpu", max_length: int = 2048) -> dict[str, dict[str, float]]:
    """lm-eval's ``hf`` model on ``model_dir`` (a Hugging Face folder: the teacher, or a student export):
    ``{task: {metric: value}}`` for ``tasks`` (default: the local task; standard task names need the hub).

    ``limit``: at most this many items per task. ``batch_size`` 1 keeps every input unpadded (the
    student has no padding mask; lm-eval pads on the right, which a causal model ignores, but one
    length per call is also what is measured fastest on CPU). ``max_length``: lm-eval's context window,
    the same for both models (it would otherwise take a student's ``max_position_embeddings``, its
    training context, although a RetNet has no position limit).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LmEvalError(f"lm-eval is not installed ({exc}); pip install -e '.[eval]'") from None
    tasks = tasks or [TASK]
    manager = TaskManager(include_path=str(write_task_dir(work_dir / "lm_eval_tasks")))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise LmEvalError(f"unknown lm-eval task(s) {unknown}: the local one is {TASK!r}; standard ones "
                          "(arc_easy, hellaswag, piqa, winogrande, lambada_openai) need a machine with hub access")
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "trust_remote_code": True, "dtype": "float32",
                                    "max_length": max_length},
        tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size, device=device,
        log_samples=False, bootstrap_iters=0)
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        found = results["results"].get(task, {})
        scores[task] = {key.split(",")[0]: float(value) for key, value in found.items()
                        if isinstance(value, (int, float)) and "stderr" not in key and key != "sample_len"}
    return scores


def percent_of_teacher(student: dict[str, dict[str, float]], teacher: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``{task: {metric: {"student", "teacher", "percent_of_teacher"}}}`` (percent None where the teacher scores 0)."""
    table: dict[str, Any] = {}
    for task, metrics in teacher.items():
        table[task] = {}
        for metric, value in metrics.items():
            ours = student.get(task, {}).get(metric)
            table[task][metric] = {"student": ours, "teacher": value,
                                   "percent_of_teacher": (100 * ours / value) if ours is not None and value else None}
    return table
