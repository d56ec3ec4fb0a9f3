"""Data-parallel training under ``torchrun``: process group, rank roles, model wrapping, collectives.

``torchrun --nproc_per_node=N -m student_trainer.cli train --config ...`` starts N copies of the
trainer with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in the environment; :meth:`Distributed.setup`
reads them (the only place that does). Without them the trainer is one process and every method
here is a cheap no-op, so ``train.py`` has a single code path.

Design (DESIGN.md section 12):

- **Data.** Every rank trains on its own partition of each epoch (``ShardSampler(rank, world_size)``,
  interleaved) and asks its own teacher for its own rows. One optimiser step consumes
  ``batch_size x world_size x grad_accum_steps`` rows.
- **DDP** (``distributed=ddp``, the default): gradients are averaged across ranks during the last
  micro-step's backward (``no_sync`` on the others), so clipping measures the global gradient norm
  and every rank applies the same update. Muon is fine here: it sees whole, already averaged matrices.
- **FSDP2** (``distributed=fsdp2``, ``torch.distributed.fsdp.fully_shard``) for students too large
  to replicate: each RetNet layer, then the whole model, is sharded over the ranks. Gradients are
  DTensor shards, and ``torch.optim.Muon`` orthogonalises each rank's shard instead of the whole
  matrix (checked on torch 2.14: different updates from a single process, without an error), so the
  config refuses ``fsdp2`` with ``optimizer=muon``. Checkpoints hold full tensors either way, in the
  single-process format.
- **Same decisions everywhere.** Skipping a non-finite step, saddle interventions and stopping on a
  lost teacher are decided from all-reduced numbers, so the ranks never take different branches
  (which would leave some of them waiting in a collective forever).
- **Rank 0 writes** checkpoints, metrics, W&B and the progress bar; the others compute the same
  numbers and wait at a barrier while a checkpoint is written. Checkpoints keep every rank's sampler
  position, so a job resumes with the same number of ranks (a different number is refused by name).
- **Evaluation** runs the same fixed batches on every rank (FSDP2 needs every rank in each forward),
  so all ranks get the same numbers; it costs no wall time, as the other ranks would wait anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from student_trainer.training.checkpoint import checkpoints_dir, save_checkpoint

log = logging.getLogger(__name__)
STRATEGIES = ("ddp", "fsdp2")


def local_device(name: str, local_rank: int) -> str:
    """``auto`` / ``cuda`` -> ``cuda:LOCAL_RANK`` when CUDA is there, so each rank gets its own GPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "cpu" if name == "auto" else name


@dataclasses.dataclass
class Distributed:
    """This process's place in the job, and the collectives the training loop needs.

    Attributes:
        device: the device this rank trains on (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        rank, local_rank, world_size: from torchrun's environment; ``0, 0, 1`` for one process.
        strategy: ``none`` (one process), ``ddp`` or ``fsdp2``.
        owns_group: this object initialised the process group (and destroys it in :meth:`close`).
    """

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "none"
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str, strategy: str = "ddp", timeout_s: float = 1800.0) -> "Distributed":
        """Join the torchrun job described by the environment, or describe a single process.

        The backend is NCCL on CUDA and Gloo on CPU. ``timeout_s`` bounds how long a rank waits in a
        collective for the others (a rank whose network teacher is retrying keeps the rest waiting).
        """
        from teacher_server.engines.hf import pick_device

        if "WORLD_SIZE" not in os.environ:
            return cls(device=torch.device(pick_device(device)))
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed must be one of {STRATEGIES}, found {strategy!r}")
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        here = torch.device(pick_device(local_device(device, local_rank)))
        if here.type == "cuda":
            torch.cuda.set_device(here)  # NCCL collectives and bare "cuda" tensors go to this rank's GPU
        owns_group = not dist.is_initialized()
        if owns_group:
            if here.type == "cuda":
                dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=here)
            else:
                dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        log.info("rank %d of %d (local rank %d) on %s, %s", rank, world_size, local_rank, here, strategy)
        return cls(device=here, rank=rank, local_rank=local_rank, world_size=world_size, strategy=strategy,
                   owns_group=owns_group)

    @property
    def enabled(self) -> bool:
        """Launched by torchrun (even with one process): collectives and wrapping are on."""
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.rank == 0

    def local_device(self, name: str) -> str:
        """A device setting for this rank (e.g. ``teacher_device``): ``auto`` / ``cuda`` become
        ``cuda:LOCAL_RANK`` under torchrun on GPUs, so N teachers do not all land on GPU 0."""
        return local_device(name, self.local_rank) if self.enabled else name

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # ----- coordination ----------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (building shards, converting or downloading a teacher), the
        others after it, so they read finished files instead of racing to write the same ones."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum each value over the ranks (one collective, float64 so token counts stay exact)."""
        if not self.enabled or not values:
            return dict(values)
        packed = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(packed)
        return dict(zip(values, packed.tolist()))

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average each value over the ranks; every rank gets the very same numbers."""
        return {key: value / self.world_size for key, value in self.all_reduce_sum(values).items()}

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        return self.all_reduce_sum({"flag": float(flag)})["flag"] > 0 if self.enabled else flag

    def all_gather_rows(self, rows: list[int]) -> list[int]:
        """Every rank's row indices, rank 0's first (each rank must pass as many rows)."""
        if not self.enabled:
            return list(rows)
        local = torch.tensor(rows, dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).tolist()

    def all_gather_object(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (small, picklable things such as sampler states)."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    # ----- the model -------------------------------------------------------------------------------

    def wrap(self, module: nn.Module, layers: nn.ModuleList) -> nn.Module:
        """``module`` for training on this rank: as is (one process), DDP, or FSDP2-sharded.

        ``module`` must compute everything that touches parameters inside ``forward`` (DDP and FSDP2
        hook ``forward``). ``layers`` are sharded one by one under FSDP2, so only one layer's full
        weights exist at a time. Build the optimisers *after* this: FSDP2 replaces the parameters.
        """
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # DDP starts every rank from rank 0's weights. It also re-sends the two tiny rel-pos buffers
            # (~100 floats) before each forward; the flag that skips it was renamed in torch 2.14: keep the default.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(module, device_ids=device_ids)
        if self.strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # an explicit mesh of this rank's device type: FSDP2's default mesh is on the accelerator
            # when there is one, which breaks training on the CPUs of a GPU machine
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)  # the rest: embedding (= tied head), final norm, untied head
        return module

    def gradient_sync(self, model: nn.Module, sync: bool) -> Any:
        """A context for one micro-step: gradients are reduced across ranks only when ``sync``
        (the last micro-step of an optimiser step), not on every accumulation micro-step."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel) and not sync:
            return model.no_sync()
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync)
        return nullcontext()

    # ----- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, output_dir: str | Path, step: int, model: nn.Module,
                        optimizers: list[torch.optim.Optimizer], trainer_state: dict[str, Any],
                        keep_last: int) -> Path:
        """Rank 0 writes checkpoint ``step`` (full tensors, the single-process format); every rank
        calls this and returns once the checkpoint is complete."""
        if self.strategy == "fsdp2":  # gathering the shards is a collective: every rank takes part
            model = _full_model(model, keep=self.is_main)
            optimizers = [_FullState(_full_optimizer_state(optimizer)) for optimizer in optimizers]
        path = checkpoints_dir(output_dir) / f"step-{step:08d}"
        if self.is_main:
            path = save_checkpoint(output_dir, step, model, optimizers, trainer_state, keep_last)
        self.barrier()  # nobody continues (or exits, or resumes) before the checkpoint is complete
        return path

    def shard_loaded_optimizer_state(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """After ``load_checkpoint`` under FSDP2: cut the full optimizer tensors into this rank's
        shards, shaped like the (DTensor) parameters they belong to."""
        if self.strategy != "fsdp2":
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for optimizer in optimizers:
            for param, state in optimizer.state.items():
                if not isinstance(param, DTensor):
                    continue
                for key, value in state.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                        # every rank holds the full tensor, so each takes its own shard without communication
                        state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                       src_data_rank=None)


class _FullState:
    """Stands in for an optimizer whose state was gathered: ``save_checkpoint`` only calls ``state_dict()``."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _full_tensor(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def _full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor shard gathered into its full tensor (collective)."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: _full_tensor(value) for key, value in entries.items()}
                      for index, entries in state["state"].items()}
    return state


def _full_model(model: nn.Module, keep: bool) -> nn.Module | None:
    """A CPU copy of an FSDP2-sharded student with full weights (a collective; only rank 0 keeps it)."""
    full = {name: _full_tensor(value) for name, value in model.state_dict().items()}
    if not keep:
        return None
    with torch.device("meta"):  # no second random initialisation: the weights are assigned below
        copy = type(model)(model.config)
    copy.load_state_dict(full, assign=True)
    if copy.config.tie_embeddings:  # assign=True gave the head its own tensor: tie it again
        copy.output_projection.weight = copy.embed_tokens.weight
    return copy
