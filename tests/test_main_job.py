"""The README's main job, end to end on the real embedded teacher (starts and stops a real server)."""

from __future__ import annotations

import pytest

from student_trainer.cli import main

pytestmark = pytest.mark.slow


def test_main_job_shows_the_teachers_top_k_and_stops_the_service(tmp_path, capsys) -> None:
    assert main(["main", "--workdir", str(tmp_path), "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out
    assert "teacher service stopped (exit code 0)" in out
    assert "Application shutdown complete" in (tmp_path / "teacher.log").read_text()
