"""Import rules of DESIGN.md section 2, checked on the real modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
    return found


def test_teacher_server_never_imports_the_trainer() -> None:
    assert not {m for m in imported_modules("teacher_server") if m.startswith("student_trainer")}


def test_shared_has_no_framework_or_training_imports() -> None:
    banned = ("torch", "fastapi", "starlette", "student_trainer", "teacher_server", "transformers")
    assert not {m for m in imported_modules("shared") if m.startswith(banned)}


def test_trainer_uses_only_the_servers_engine_layer() -> None:
    used = {m for m in imported_modules("student_trainer") if m.startswith("teacher_server")}
    assert used and all(m.startswith("teacher_server.engines") for m in used), used


def test_engine_layer_imports_no_web_framework() -> None:
    code = "import sys, teacher_server.engines.hf; assert 'fastapi' not in sys.modules and 'starlette' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_export_templates_import_only_torch_transformers_and_the_stdlib() -> None:
    """The code files copied into a Hugging Face export run where neither this project nor TorchScale is."""
    allowed = {"torch", "transformers", *sys.stdlib_module_names}
    for name in ("configuration_retnet_student.py", "modeling_retnet_student.py"):
        tree = ast.parse((ROOT / "student_trainer" / "hf_export" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, (name, roots - allowed)
