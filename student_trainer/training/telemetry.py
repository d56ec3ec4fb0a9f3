"""Telemetry: a JSONL metrics file always, Weights & Biases (offline without a key), a progress bar.

Every metrics line is ``{"step": n, "time": unix, ...}``; events (saddle interventions, skipped
steps, teacher switches) are lines with an ``"event"`` key, so one file holds the whole story of a
run and `retnet-distill evaluate` can plot it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def memory_metrics(device: torch.device) -> dict[str, float]:
    """CUDA max allocated on a GPU run, the process's RSS on a CPU run (MB)."""
    if device.type == "cuda":
        return {"memory/cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    with open("/proc/self/statm") as fh:
        return {"memory/rss_mb": int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` is ``online`` with a ``WANDB_API_KEY`` and ``offline`` without one."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Telemetry:
    """Where a run's numbers go.

    Args:
        output_dir: the run folder; ``metrics.jsonl`` and W&B's files go there.
        config: the resolved config, recorded in W&B.
        wandb_mode: ``auto``, ``online``, ``offline`` or ``disabled``.
        project: W&B project.
        progress: show a progress bar on the console.
        total_steps, start_step: for the progress bar.
        enabled: False on the ranks other than 0 of a torchrun job: nothing is written or shown, and
            events (e.g. this rank's teacher switching) only go to the log.
    """

    def __init__(self, output_dir: str | Path, config: dict[str, Any], wandb_mode: str, project: str,
                 progress: bool, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self._file = None
        self.wandb_mode = resolve_wandb_mode(wandb_mode) if enabled else "disabled"
        self._wandb = None
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.output_dir / METRICS_FILE, "a", encoding="utf-8")
        if self.wandb_mode != "disabled":
            self._wandb = self._start_wandb(config, project)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), disable=not (progress and enabled),
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")

    def _start_wandb(self, config: dict[str, Any], project: str):
        import wandb

        id_file = self.output_dir / "wandb_run_id"  # the same W&B run continues after a resume
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id)
        return wandb.init(project=project, dir=str(self.output_dir), mode=self.wandb_mode, config=config,
                          id=run_id, resume="allow", settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def event(self, step: int, kind: str, data: dict[str, Any]) -> None:
        """A discrete event (saddle intervention, skipped step, teacher switch): logged and printed."""
        self.log(step, {"event": kind, **{k: v for k, v in data.items() if k != "step"}})
        message = f"step {step}: {kind} " + " ".join(f"{k}={v}" for k, v in data.items())
        if not self.enabled:
            log.info(message)  # rank 0 writes the shared ones; this keeps e.g. this rank's teacher switches
        elif self._progress.disable:
            log.warning(message)
        else:
            self._progress.console.print(f"[yellow]{message}")

    def print(self, text: str) -> None:
        """A line for the person watching (rank 0's console; the log elsewhere or without a progress bar)."""
        if self.enabled and not self._progress.disable:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            log.info(text)

    def progress(self, step: int, loss: float, tokens_per_s: float, teacher_share: float) -> None:
        status = f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s  teacher {100 * teacher_share:.0f}%"
        self._progress.update(self._task, completed=step, status=status)

    def close(self) -> None:
        self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
