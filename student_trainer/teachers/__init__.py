"""Teacher-target sources for the trainer: one interface for the direct, cached and network modes."""

from student_trainer.teachers.base import TeacherSource
from student_trainer.teachers.cached import CachedTeacher
from student_trainer.teachers.direct import DirectTeacher

__all__ = ["CachedTeacher", "DirectTeacher", "TeacherSource"]
