"""Training on CUDA: bf16 autocast with fp32 weights and fp32 decay tables (skipped without a GPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from student_trainer.model.student import RetNetStudent
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train
from tests.test_train import step_losses, tiny_config

pytestmark = pytest.mark.gpu


def test_bf16_training_on_cuda_learns_and_keeps_fp32_state(roots, tiny_engine, tmp_path) -> None:
    config = tiny_config(tmp_path / "run", roots[0] / "docs", device="cuda", precision="bf16", max_steps=30,
                         eval_every=30, save_every=30)
    summary = train(config, teacher=DirectTeacher(tiny_engine, k=16, temperature=1.0))
    losses = step_losses(tmp_path / "run")
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[30] < losses[1]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("memory/cuda_max_allocated_mb" in r for r in records)
    model = RetNetStudent.load(summary["checkpoint"] + "/model", device="cuda")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.decoder.retnet_rel_pos.decay.dtype == torch.float32


def test_recurrent_decoding_on_cuda_matches_parallel_under_bf16() -> None:
    from tests.conftest import TINY_VOCAB, tiny_student

    student = tiny_student(vocab_size=TINY_VOCAB).cuda().eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        parallel = student(ids).float()
        logits, state = student.prefill(ids[:, :16])
        steps = [logits.float()]
        for t in range(16, 47):
            logits, state = student.step(ids[:, t], state)
            steps.append(logits.float())
    torch.testing.assert_close(torch.stack(steps, 1), parallel[:, 15:47], atol=0.1, rtol=0.05)


def test_retrofit_both_stages_on_cuda_under_bf16_with_muon(roots, tiny_engine, tmp_path) -> None:
    """The retrofit on a GPU: teacher and student on CUDA, bf16 autocast, Muon (fast in bf16 there)."""
    from tests.test_retrofit import retrofit_config

    teacher = DirectTeacher(tiny_engine, k=16, temperature=1.0)
    # the teacher engine stays on the CPU: its captured attention moves to the student's device
    config = retrofit_config(tmp_path / "run", roots[0] / "docs", device="cuda", precision="bf16", optimizer="muon")
    summary = train(config, teacher=teacher)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage1 = {r["step"]: r["train/total"] for r in records if r.get("train/stage") == 1}
    assert all(math.isfinite(v) for v in stage1.values()) and stage1[6] < stage1[1]
    model = RetNetStudent.load(summary["checkpoint"] + "/model", device="cuda")
    assert all(p.dtype == torch.float32 for p in model.parameters())
