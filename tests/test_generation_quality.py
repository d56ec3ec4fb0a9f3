"""Generation-quality metrics (issue 15, item 3): the teacher's NLL of a model's own text, distinct-n,
repetition; and their place in ``evaluate``'s report."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.evaluation.evaluate import EvalSettings, evaluate
from student_trainer.evaluation.generation_quality import (distinct_n, generation_metrics, repetition_rate, teacher_nll,
                                                           teacher_nll_parts)
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


def test_teacher_nll_parts_are_the_full_vocabulary_kl_and_entropies(tiny_engine) -> None:
    teacher = tiny_engine.model
    torch.manual_seed(0)
    writer_head = torch.randn(TINY_VOCAB + 3, TINY_VOCAB + 3)  # a different model: a random map of the teacher's logits

    def writer(ids: torch.Tensor) -> torch.Tensor:  # [1, L] -> [1, L, V + 3] (a padded head, as a student's)
        return teacher(input_ids=ids).logits[..., :TINY_VOCAB] @ writer_head[:TINY_VOCAB]

    prompts, generations = [[5, 6, 7], [3, 4]], [[8, 9, 10, 11], [12]]
    parts = teacher_nll_parts(teacher, writer, prompts + [[1]], generations + [[]], TINY_VOCAB)
    kl = h_w = h_t = 0.0
    with torch.no_grad():
        for prompt, generated in zip(prompts, generations):
            ids = torch.tensor([prompt + generated])
            at = slice(len(prompt) - 1, ids.size(1) - 1)
            lt = torch.log_softmax(teacher(input_ids=ids).logits[0, at, :TINY_VOCAB].float(), -1)
            lw = torch.log_softmax(writer(ids)[0, at, :TINY_VOCAB].float(), -1)
            kl += float((lw.exp() * (lw - lt)).sum())
            h_w -= float((lw.exp() * lw).sum())
            h_t -= float((lt.exp() * lt).sum())
    assert parts["reverse_kl"] == pytest.approx(kl / 5, rel=1e-5) and parts["reverse_kl"] > 0.01
    assert parts["writer_entropy"] == pytest.approx(h_w / 5, rel=1e-5)
    assert parts["teacher_entropy"] == pytest.approx(h_t / 5, rel=1e-5)
    assert parts["teacher_nll"] == pytest.approx(teacher_nll(teacher, prompts, generations, TINY_VOCAB), rel=1e-6)
    # the teacher judged as its own writer: no divergence, one entropy
    itself = teacher_nll_parts(teacher, lambda ids: teacher(input_ids=ids).logits, prompts, generations, TINY_VOCAB)
    assert itself["reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    assert itself["writer_entropy"] == pytest.approx(itself["teacher_entropy"], rel=1e-6)
    assert teacher_nll_parts(teacher, writer, [[1]], [[]], TINY_VOCAB)["reverse_kl"] is None


def test_sampled_teacher_nll_is_reverse_kl_plus_the_writers_entropy(tiny_engine) -> None:
    """At temperature 1 the expected teacher NLL of a writer's samples is KL(writer || teacher) + H(writer)."""
    teacher = tiny_engine.model
    torch.manual_seed(1)
    bias = torch.randn(TINY_VOCAB)
    writer = lambda ids: teacher(input_ids=ids).logits[..., :TINY_VOCAB] + bias  # noqa: E731
    prompt = [5, 6, 7]
    with torch.no_grad():
        probs = torch.softmax(writer(torch.tensor([prompt]))[0, -1].float(), -1)
    draws = torch.multinomial(probs, 4000, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()
    sampled = teacher_nll(teacher, [prompt] * len(draws), [[t] for t in draws], TINY_VOCAB)
    parts = teacher_nll_parts(teacher, writer, [prompt], [[draws[0]]], TINY_VOCAB)
    assert sampled == pytest.approx(parts["reverse_kl"] + parts["writer_entropy"], rel=0.03)


def test_evaluate_reports_the_generations_scored_by_the_teacher(trained_run, tiny_model_dir, tiny_shards,  # noqa: F811
                                                                tmp_path) -> None:
    settings = EvalSettings(checkpoint=str(trained_run), data=str(tiny_shards), teacher=str(tiny_model_dir), batches=1,
                            prompts=["def f(x):", "import os"], max_new_tokens=8, output_dir=str(tmp_path / "eval"))
    report = evaluate(settings)
    base = {"teacher_nll", "distinct_2", "distinct_3", "repetition_4", "tokens"}
    assert set(report["generation"]["teacher"]) == base
    assert set(report["generation"]["student"]) == base | {"reverse_kl", "writer_entropy", "teacher_entropy"}
    if report["generation"]["student"]["tokens"]:
        assert report["generation"]["student"]["reverse_kl"] >= 0
    for who in ("student", "teacher"):
        scored = report["generation"][who]
        if scored["tokens"]:
            assert 0 < scored["teacher_nll"] < 10 * math.log(TINY_VOCAB)
    assert report["generation"]["student"]["tokens"] == sum(s["student_tokens"] for s in report["samples"])
