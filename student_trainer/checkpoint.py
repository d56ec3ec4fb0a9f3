"""Checkpoints that resume exactly: weights, optimizers, schedule, RNG, data position, detector state.

Layout: ``{output_dir}/checkpoints/step-00000100/`` with ``model/`` (config.json +
model.safetensors, loadable by ``RetNetStudent.load``), ``optimizer.pt``, ``rng.pt`` and
``trainer_state.json`` (step, sampler, LR controller, detector, non-finite guard, resolved config).
A checkpoint is written into a temporary folder and renamed into place, so a folder named
``step-*`` is always complete; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
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
    return folder


def load_checkpoint(folder: Path, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore optimizer and RNG states; returns the trainer state (the caller restores the rest)."""
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    if len(saved["optimizers"]) != len(optimizers):
        raise ValueError(
            f"{folder} holds {len(saved['optimizers'])} optimizer states but this run has {len(optimizers)}; "
            "resume with the same optimizer setting"
        )
    for optimizer, state in zip(optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    restore_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    return json.loads((folder / STATE_FILE).read_text())
