"""Checkpoints that resume exactly: weights, optimizers, schedule, RNG, data position, detector state.

Layout: ``{output_dir}/checkpoints/step-00000100/`` with ``model/`` (config.json +
model.safetensors, loadable by ``RetNetStudent.load``), ``optimizer.pt``, ``rng.pt`` and
``trainer_state.json`` (step, sampler, LR controller, detector, non-finite guard, resolved config).
A checkpoint is written into a temporary folder, every file and folder fsynced, and renamed into
place (the parent fsynced too), so a folder named ``step-*`` is complete even after a power cut;
``trainer_state.json`` is written last and lists every file's size, and a checkpoint whose files do
not match it is never resumed from. Only the newest ``keep_last`` are kept. Everything loads with
``torch.load(weights_only=True)``: no pickle runs code from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.files import fsync_path

STATE_FILE = "trainer_state.json"
REQUIRED_FILES = ("model/config.json", "model/model.safetensors", "optimizer.pt", "rng.pt")
log = logging.getLogger(__name__)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and lists (what ``torch.load(weights_only=True)`` reads)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt_state), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    saved = state["numpy"]
    if isinstance(saved, dict):
        np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    else:  # checkpoints written before the tensor form: numpy's own tuple
        np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and every folder's entries to disk."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [*sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), folder]:
        fsync_path(path)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune older ones; returns its folder."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=root))
    try:
        model.save(staging / "model")
        torch.save({"optimizers": [opt.state_dict() for opt in optimizers]}, staging / "optimizer.pt")
        torch.save(rng_state(), staging / "rng.pt")
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state, "files": files}, indent=2))
        _fsync_tree(staging)  # the data is on disk before the name says the checkpoint is complete
        if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (a missing or truncated file), or None."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} unreadable ({type(exc).__name__})"
    expected = state.get("files") or {name: None for name in REQUIRED_FILES}  # older checkpoints: presence only
    for name, size in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are skipped with a warning."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.glob("step-*"):
        if not folder.is_dir() or not folder.name.split("-")[1].isdigit():
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            found.append(folder)
        else:
            log.warning("skipping incomplete checkpoint %s: %s", folder, problem)
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` (the newest in output_dir, if any), ``never``, or a folder."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: no {STATE_FILE} there; expected a step-* checkpoint folder")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise FileNotFoundError(f"resume={resume} is an incomplete checkpoint ({problem}); resume from another one")
    return folder


def load_checkpoint(folder: Path, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore optimizer and RNG states; returns the trainer state (the caller restores the rest)."""
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    if len(saved["optimizers"]) != len(optimizers):
        raise ValueError(
            f"{folder} holds {len(saved['optimizers'])} optimizer states but this run has {len(optimizers)}; "
            "resume with the same optimizer setting"
        )
    for optimizer, state in zip(optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    restore_rng_state(_load_rng(folder / "rng.pt"))
    return json.loads((folder / STATE_FILE).read_text())


def _load_rng(path: Path) -> dict[str, Any]:
    """``rng.pt`` without pickle; checkpoints from before the tensor form hold numpy's state tuple,
    whose two numpy types are allowed explicitly (nothing else is)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
        with torch.serialization.safe_globals([core.multiarray._reconstruct, np.ndarray, np.dtype,
                                               type(np.dtype(np.uint32))]):
            return torch.load(path, weights_only=True)


class CheckpointNotFound(ValueError):
    """A path that is neither a run folder, a checkpoint folder nor a saved student; the message says which."""


@dataclass
class ResolvedCheckpoint:
    model_dir: Path  # folder written by RetNetStudent.save
    run_dir: Path | None  # the training run (metrics.jsonl lives there), when known
    train_config: dict[str, Any]  # the run's resolved config ({} for a bare model folder)
    step: int | None


def resolve_checkpoint(path: str | Path) -> ResolvedCheckpoint:
    """Accept a run folder, a ``checkpoints/step-N`` folder or a bare model folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointNotFound(f"{path}/checkpoints holds no complete checkpoint; train first or pass a checkpoint folder")
        path = found[-1]
    if (path / "model" / "config.json").is_file():
        state = json.loads((path / STATE_FILE).read_text()) if (path / STATE_FILE).is_file() else {}
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return ResolvedCheckpoint(path / "model", run_dir, state.get("config", {}), state.get("step"))
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return ResolvedCheckpoint(path, None, {}, None)
    raise CheckpointNotFound(f"{path} is not a run folder, a checkpoint folder (with model/) or a saved student "
                          "(config.json + model.safetensors); pass e.g. runs/cpu or runs/cpu/checkpoints/step-00000200")
