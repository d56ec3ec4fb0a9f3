"""lm-evaluation-harness (issue 16, item 3): the shipped local task, lm-eval's ``hf`` model on the teacher
and on the exported student, and ``evaluate --lm-eval``'s report (student next to teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student_trainer.evaluation.evaluate import EvalSettings, evaluate
from student_trainer.training.checkpoint import resolve_checkpoint
from student_trainer.evaluation.lm_eval_tasks import TASK, TASK_DATA, LmEvalError, build_dolly_mc, percent_of_teacher, run_lm_eval
from student_trainer.model.student import RetNetStudent
from student_trainer.data.tokenizer import load_tokenizer
from tests.conftest import DOLLY, needs_dolly
from tests.test_evaluate import trained_run  # noqa: F401  (the module's trained tiny run)

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@needs_dolly
def test_the_shipped_task_is_built_from_the_dolly_sample() -> None:
    records = [json.loads(line) for line in DOLLY.read_text().splitlines()]
    items = build_dolly_mc(records)
    shipped = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    assert items == shipped and len(items) == 85
    answers: dict[str, set[str]] = {}  # a question may appear twice in Dolly, with two answers
    for r in records:
        answers.setdefault(r["instruction"].strip(), set()).add(r["response"].strip())
    for item in items:
        assert len(set(item["choices"])) == 4
        assert item["choices"][item["label"]] in answers[item["question"]]
    assert len({item["label"] for item in items}) == 4  # the answer is not always in one place


def test_percent_of_teacher() -> None:
    table = percent_of_teacher({"t": {"acc": 0.3}}, {"t": {"acc": 0.6, "acc_norm": 0.0}})
    assert table["t"]["acc"] == {"student": 0.3, "teacher": 0.6, "percent_of_teacher": pytest.approx(50.0)}
    assert table["t"]["acc_norm"]["percent_of_teacher"] is None


def _own_accuracy(model_dir: Path, teacher_dir: Path, limit: int) -> float:
    """The student's accuracy on the first ``limit`` items, scored by RetNetStudent itself the way lm-eval
    asks (context ``Question: ...\\nAnswer:``, continuation `` choice``, tokens of the whole minus the context's)."""
    student = RetNetStudent.load(model_dir).eval()
    tokenizer = load_tokenizer(str(teacher_dir), "/nonexistent")
    items = [json.loads(line) for line in TASK_DATA.read_text().splitlines()][:limit]
    right = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(student(torch.tensor([whole])).float(), dim=-1)[0]
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context_ids), len(whole))))
        right += int(max(range(4), key=scores.__getitem__) == item["label"])
    return right / len(items)


def test_evaluate_runs_lm_eval_on_the_teacher_and_the_exported_student(trained_run, tiny_model_dir,  # noqa: F811
                                                                        tiny_shards, tmp_path) -> None:
    out = tmp_path / "eval"
    settings = EvalSettings(checkpoint=str(trained_run), data=str(tiny_shards), teacher=str(tiny_model_dir), batches=1,
                            prompts=["def f(x):"], max_new_tokens=4, output_dir=str(out), lm_eval_tasks=[],
                            lm_eval_limit=6)
    report = evaluate(settings)
    scores = report["lm_eval"]["tasks"][TASK]
    assert set(scores) == {"acc", "acc_norm"} and report["lm_eval"]["limit"] == 6
    for row in scores.values():
        assert row["student"] in [i / 6 for i in range(7)] and row["teacher"] in [i / 6 for i in range(7)]
    assert json.loads((out / "report.json").read_text())["lm_eval"] == report["lm_eval"]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.json"]  # the export was temporary
    # lm-eval's accuracy of the exported student is the student's own, scored here without lm-eval
    own = _own_accuracy(resolve_checkpoint(trained_run).model_dir, tiny_model_dir, 6)
    assert scores["acc"]["student"] == pytest.approx(own)


def test_an_unknown_task_is_refused_by_name(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(LmEvalError, match="no_such_task.*retnet_dolly_mc"):
        run_lm_eval(tiny_model_dir, tmp_path, tasks=["no_such_task"], limit=1)
