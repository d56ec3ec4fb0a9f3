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


# The trainer's subpackages, bottom to top: a package imports only packages of a lower layer (and
# itself); the command-line modules at the top of student_trainer/ may import anything. Layer 0 holds
# three independent foundations (they import no other part of the trainer).
TRAINER_LAYERS = {
    "data": 0, "model": 0, "teachers": 0,  # shards and tokenizers; the RetNet student; teacher targets
    "training": 1,  # the recipe, losses, optimisers, health, checkpoints, distributed, telemetry
    "hf_export": 2,  # reads training's checkpoints, writes a Hugging Face folder
    "evaluation": 3, "serving": 3,  # evaluate (lm-eval runs on an export); the OpenAI-style server
}


def trainer_imports() -> dict[tuple[str, str], set[str]]:
    """``{(importing package, imported package): files}`` for imports between the trainer's subpackages,
    counting imports inside functions too (a lazy import is still a dependency)."""
    found: dict[tuple[str, str], set[str]] = {}
    for path in (ROOT / "student_trainer").rglob("*.py"):
        parts = path.relative_to(ROOT / "student_trainer").parts
        if len(parts) == 1:
            continue  # a top-level (CLI) module
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.startswith("student_trainer.") and name.split(".")[1] != parts[0]:
                    found.setdefault((parts[0], name.split(".")[1]), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_trainer_subpackage_has_a_layer() -> None:
    packages = {p.name for p in (ROOT / "student_trainer").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(TRAINER_LAYERS), "add the new subpackage to TRAINER_LAYERS (and the README's Layout)"


def test_trainer_subpackages_import_only_lower_layers() -> None:
    edges = trainer_imports()
    assert edges, "no imports between subpackages found: the walk is broken"
    upward = {edge: files for edge, files in edges.items()
              if edge[1] not in TRAINER_LAYERS or TRAINER_LAYERS[edge[1]] >= TRAINER_LAYERS[edge[0]]}
    assert not upward, f"imports against the layer order (importer, imported): {upward}"
