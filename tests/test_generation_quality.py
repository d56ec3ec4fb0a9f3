"""Generation-quality metrics (issue 15, item 3): the teacher's NLL of a model's own text, distinct-n,
repetition; and their place in ``evaluate``'s report."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.evaluation.evaluate import EvalSettings, evaluate
from student_trainer.evaluation.generation_quality import distinct_n, generation_metrics, repetition_rate, teacher_nll
from tests.conftest import TINY_VOCAB
from tests.test_evaluate import trained_run  # noqa: F401  (the module's trained tiny run)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_distinct_n_and_repetition_on_hand_counted_sequences() -> None:
    loop = [1, 2, 3, 4] * 3  # 12 tokens, 9 4-grams of which 5 repeat an earlier one
    varied = list(range(10, 22))
    assert distinct_n([loop], 2) == pytest.approx(4 / 11)  # (1,2) (2,3) (3,4) (4,1)
    assert distinct_n([varied], 3) == 1.0
    assert distinct_n([loop, varied], 2) == pytest.approx((4 + 11) / 22)
    assert repetition_rate([loop]) == pytest.approx(5 / 9) and repetition_rate([varied]) == 0.0
    assert distinct_n([[1]], 2) is None and repetition_rate([[1, 2]]) is None


def test_teacher_nll_is_the_teachers_cross_entropy_on_the_generated_tokens(tiny_engine) -> None:
    teacher = tiny_engine.model
    prompt, generated = [5, 6, 7], [8, 9, 10, 11]
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([prompt + generated])).logits[0, :, :TINY_VOCAB]
    logp = torch.log_softmax(logits.float(), -1)
    expected = -sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(generated)) / len(generated)
    assert teacher_nll(teacher, [prompt, [1, 2]], [generated, []], TINY_VOCAB) == pytest.approx(expected, rel=1e-5)
    assert teacher_nll(teacher, [prompt], [[]], TINY_VOCAB) is None
    # the teacher's own greedy continuation is likelier to it than a fixed loop of tokens
    with torch.no_grad():
        greedy = teacher.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones(1, 3, dtype=torch.long))[0, 3:].tolist()
    loop = [4, 4, 4, 4] * 3
    assert teacher_nll(teacher, [prompt], [greedy], TINY_VOCAB) < teacher_nll(teacher, [prompt], [loop], TINY_VOCAB)
    metrics = generation_metrics(teacher, TINY_VOCAB, [prompt], [loop])
    assert metrics["repetition_4"] == pytest.approx(8 / 9) and metrics["tokens"] == 12


def test_evaluate_reports_the_generations_scored_by_the_teacher(trained_run, tiny_model_dir, tiny_shards,  # noqa: F811
                                                                tmp_path) -> None:
    settings = EvalSettings(checkpoint=str(trained_run), data=str(tiny_shards), teacher=str(tiny_model_dir), batches=1,
                            prompts=["def f(x):", "import os"], max_new_tokens=8, output_dir=str(tmp_path / "eval"))
    report = evaluate(settings)
    for who in ("student", "teacher"):
        scored = report["generation"][who]
        assert set(scored) == {"teacher_nll", "distinct_2", "distinct_3", "repetition_4", "tokens"}
        if scored["tokens"]:
            assert 0 < scored["teacher_nll"] < 10 * math.log(TINY_VOCAB)
    assert report["generation"]["student"]["tokens"] == sum(s["student_tokens"] for s in report["samples"])
