"""The README's main job, end to end on the real embedded teacher (starts and stops a real server).

A short run (a few steps) of exactly the pipeline `make run` runs: teacher service, python-docs
corpus, network-mode distillation, evaluation, report. The full-length run's timing is in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json

import pytest

from student_trainer.cli import main

pytestmark = pytest.mark.slow


def test_main_job_runs_the_whole_pipeline_and_stops_the_service(tmp_path, capsys) -> None:
    workdir = tmp_path / "main"
    code = main(["main", "--workdir", str(workdir), "--data-dir", str(tmp_path / "data"), "--max-steps", "4",
                 "--eval-batches", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "teacher service stopped (exit code 0)" in out
    assert "perplexity" in out and "KL(teacher || student)" in out and "student:" in out
    assert "Application shutdown complete" in (workdir / "teacher.log").read_text()

    records = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/total" in r]
    assert [r["step"] for r in steps] == [4]  # log_every=10: the last step is always logged
    assert steps[0]["teacher/requests"] >= 4  # the targets came over HTTP from the service
    assert (workdir / "train" / "checkpoints" / "step-00000004" / "model" / "model.safetensors").is_file()

    report = json.loads((workdir / "eval" / "report.json").read_text())
    m = report["metrics"]
    assert report["step"] == 4 and report["teacher"] == "smollm2-135m-instruct"
    assert m["teacher_perplexity"] < m["student_perplexity"]  # 4 steps do not beat SmolLM2
    assert m["recurrent_vs_parallel_max_abs_diff"] < 1e-3
    assert report["samples"] and report["samples"][0]["teacher"]
    assert (workdir / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"
