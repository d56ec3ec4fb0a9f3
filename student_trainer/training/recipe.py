"""The training recipe, top to bottom: set up, loop, save.

``retnet-distill train --config configs/train_cpu.yaml [key=value ...]`` runs :func:`train`.
One optimiser step = ``grad_accum_steps`` micro-batches; each micro-batch gets teacher targets
from the configured source, runs the student's parallel forward to hidden states and the chunked
distillation loss (LM head included), and accumulates gradients. With ``attention_transfer_steps``
the first steps are stage 1 of the retrofit (:mod:`student_trainer.training.attention_transfer`); with
``onpolicy_fraction`` some KD steps train on the student's own continuations of the rows' prompts,
scored by the teacher (:mod:`student_trainer.training.onpolicy`). The step's pieces live in
:mod:`student_trainer.training.distill_step`. Under ``torchrun`` every rank does this on its own rows (see
:mod:`student_trainer.training.distributed`); rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from student_trainer.training.attention_transfer import AttentionTransfer, set_stage_trainable
from student_trainer.training.checkpoint import load_checkpoint, resolve_resume
from student_trainer.training.config import TrainConfig, config_to_dict
from student_trainer.training.batches import Batch, UpcomingBatches
from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
from student_trainer.training.distill_step import DistillStep, Evaluator, combine_micro_metrics, step_row_totals
from student_trainer.training.distributed import Distributed
from student_trainer.training.health import HealthConfig, NonFiniteGuard, SaddleDetector
from student_trainer.training.losses import LossConfig
from student_trainer.model.student import RetNetStudent, StudentConfig
from student_trainer.training.onpolicy import OnPolicy, OnPolicySettings
from student_trainer.training.optim import LRController, OptimConfig, build_optimizers, clip_grad_norm, configure_cuda_allocator
from student_trainer.teachers import CachedTeacher, DirectTeacher, TeacherSource
from student_trainer.teachers.fallback import FallbackTeacher
from student_trainer.teachers.network import (NetworkTeacher, TeacherError, TeacherMismatch, TeacherUnavailable,
                                              refuse_or_warn)
from student_trainer.training.telemetry import Telemetry, memory_metrics
from teacher_server.engines.model_source import model_name

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_teacher(config: TrainConfig, data_manifest: dict[str, Any], on_switch=None) -> TeacherSource:
    """The teacher-target source of ``teacher_mode``: the HF engine in this process (direct), a
    cache on disk (cached) or teacher services over HTTP (network, optionally backed by a chain of
    ``teacher_fallback`` sources), each checked against the data and the run's teacher."""
    if config.teacher_mode == "network" and config.teacher_fallback:
        primary = build_teacher(dataclasses.replace(config, teacher_fallback=[]), data_manifest)
        primary.deadline_s = 0.0  # with a fallback, give up after the retries and switch
        fallbacks = [build_teacher(dataclasses.replace(config, teacher_mode=mode, teacher_fallback=[]), data_manifest)
                     for mode in config.teacher_fallback]
        return FallbackTeacher([primary, *fallbacks], probe_interval_s=config.teacher_probe_s, on_switch=on_switch,
                               allow_mismatch=config.allow_teacher_mismatch)
    if config.teacher_mode == "cached":
        if not config.teacher_cache:
            raise ValueError("teacher_mode=cached needs teacher_cache=FOLDER (written by `retnet-distill cache`)")
        source: TeacherSource = CachedTeacher(
            config.teacher_cache, data_manifest, config.teacher_topk, config.temperature,
            teacher_model=model_name(config.teacher_model), verify=config.teacher_cache_verify)
    elif config.teacher_mode == "network":
        if not config.teacher_url:
            raise ValueError("teacher_mode=network needs teacher_url=http://HOST:PORT (several: comma-separated)")
        return NetworkTeacher([url.strip() for url in config.teacher_url.split(",")], config.teacher_topk,
                              config.temperature, data_manifest["tokenizer_sha256"], data_manifest["vocab_size"],
                              api_key=os.environ.get("TEACHER_API_KEY"), retries=config.teacher_retries,
                              deadline_s=config.teacher_deadline_s, teacher_model=model_name(config.teacher_model),
                              weights_fingerprint=config.teacher_fingerprint,
                              allow_mismatch=config.allow_teacher_mismatch, max_sequence_length=config.max_seq_length,
                              max_request_tokens=config.batch_size * config.max_seq_length,
                              target_encoding=config.teacher_encoding, mass_cutoff=config.teacher_mass_cutoff)
    else:
        source = DirectTeacher.load(config.teacher_model, config.teacher_topk, config.temperature,
                                    device=config.teacher_device, dtype=config.teacher_dtype,
                                    cache_dir=config.model_cache_dir)
        limit = source.engine.max_sequence_length
        if limit is not None and config.max_seq_length > limit:  # the student has no limit; the teacher does
            source.close()
            raise ValueError(f"max_seq_length={config.max_seq_length} but the teacher {source.name} takes at most "
                             f"{limit} positions; preprocess rows of <= {limit} tokens and set max_seq_length to match")
    expected, found = config.teacher_fingerprint, source.weights_fingerprint
    if expected and found != expected:
        try:
            refuse_or_warn(f"teacher {source.name} has weights fingerprint {found[:16]}..., but teacher_fingerprint="
                           f"{expected[:16]}...: these are other weights; point the run at the teacher it was meant "
                           "for", config.allow_teacher_mismatch)
        except TeacherMismatch:
            source.close()
            raise
    return source


def check_resumed_teacher(config: TrainConfig, saved: dict[str, Any], teacher: TeacherSource) -> None:
    """A run resumed with other teacher weights than it was trained with stops (unless allowed)."""
    before, now = saved.get("weights_fingerprint") or "", getattr(teacher, "weights_fingerprint", "") or ""
    if before and now and before != now:
        refuse_or_warn(f"the checkpoint was trained with teacher weights {before[:16]}... ({saved.get('name')}), this "
                       f"run's teacher {teacher.name} has {now[:16]}...: resuming would switch teachers mid-run; point "
                       "the run at the same teacher", config.allow_teacher_mismatch)


def prepare_data(config: TrainConfig) -> Path:
    """The shard folder to train on; ``python-docs`` is built once with the teacher's tokenizer."""
    if config.train_data != "python-docs" or Path("python-docs").exists():
        return Path(config.train_data)
    from student_trainer.data.python_docs import python_docs_shards

    return python_docs_shards(config.data_dir, config.teacher_model, config.max_seq_length, config.model_cache_dir,
                              config.progress)


def check_data(config: TrainConfig, folder: Path, manifest: dict[str, Any], teacher: TeacherSource) -> None:
    """The data must be tokenized by the teacher's tokenizer, in rows of ``max_seq_length``."""
    if manifest["tokenizer_sha256"] != teacher.tokenizer_sha256:
        raise ValueError(
            f"{folder} was tokenized with tokenizer {manifest['tokenizer']} (sha256 {manifest['tokenizer_sha256'][:12]}...) "
            f"but the teacher {teacher.name} uses sha256 {teacher.tokenizer_sha256[:12]}...; preprocess the data "
            "with the teacher's tokenizer"
        )
    if manifest["max_seq_length"] != config.max_seq_length:
        raise ValueError(f"{folder} has rows of {manifest['max_seq_length']} tokens but max_seq_length="
                         f"{config.max_seq_length}; set max_seq_length={manifest['max_seq_length']}")


def student_behaviour(config: TrainConfig) -> dict[str, Any]:
    """The :class:`StudentConfig` fields the training config sets whatever the student's shape."""
    chunking = {} if config.recurrent_chunk_size is None else {"recurrent_chunk_size": config.recurrent_chunk_size}
    return {"max_seq_len": max(config.max_seq_length, 16), "chunkwise_recurrent": config.chunkwise_recurrent,
            "chunkwise_min_length": config.chunkwise_min_length, "gradient_checkpointing": config.gradient_checkpointing,
            **chunking}


def build_student(config: TrainConfig, vocab_size: int, device: torch.device) -> RetNetStudent:
    """A random-init student of the ``model_variant`` preset."""
    student_config = StudentConfig.from_preset(
        config.student_preset, vocab_size=config.student_vocab_size or vocab_size, **student_behaviour(config))
    return RetNetStudent(student_config).to(device)


def retrofit_teacher(config: TrainConfig, teacher: TeacherSource, tokenizer_sha256: str) -> tuple[nn.Module, bool]:
    """The teacher as a HF causal LM in this process, for the retrofit and stage 1: the direct teacher's
    own model, else loaded from ``teacher_model``; and whether it was loaded here (to free it after)."""
    engine = getattr(teacher, "engine", None)
    if engine is not None and hasattr(engine, "model"):
        return engine.model, False
    from student_trainer.model.retrofit import load_teacher_lm
    from teacher_server.engines.hf import pick_device

    teacher_lm, _, sha = load_teacher_lm(config.teacher_model, config.model_cache_dir, pick_device(config.teacher_device))
    if sha != tokenizer_sha256:
        raise ValueError(f"the retrofit teacher {config.teacher_model} has tokenizer sha256 {sha[:12]}... but the data "
                         f"{tokenizer_sha256[:12]}...; teacher_model must be the model the {config.teacher_mode} "
                         "teacher serves")
    return teacher_lm, True


def build_retrofitted_student(config: TrainConfig, teacher_lm: nn.Module, dataset: PretokenizedShardDataset,
                              device: torch.device) -> tuple[RetNetStudent, dict[str, Any]]:
    """A student of the teacher's shape with its weights (``student_init=teacher``), the output gates
    fitted on the first ``retrofit_calibration_rows`` training rows; returns it and the step-0 report."""
    from student_trainer.model.retrofit import retrofit

    order = ShardSampler(len(dataset), shuffle=False)
    calibration = Batch.from_rows([dataset[i] for i in order.take(min(config.retrofit_calibration_rows, len(dataset)))])
    student, report = retrofit(teacher_lm, calibration.input_ids, calibration.lengths, layers=config.retrofit_layers,
                               group_norm_eps=config.retrofit_group_norm_eps, device=device, **student_behaviour(config))
    return student, report


def build_onpolicy(config: TrainConfig, teacher: TeacherSource, manifest: dict[str, Any], device: torch.device,
                   autocast: Any, dist: Distributed) -> OnPolicy | None:
    """The on-policy sampler of ``onpolicy_fraction`` > 0 (None when it is 0)."""
    if not config.onpolicy_fraction:
        return None
    if dist.enabled and config.distributed == "fsdp2":
        raise ValueError("on-policy steps sample from the whole student on each rank; with distributed=fsdp2 each rank "
                         "holds a shard. Use distributed=ddp, or onpolicy_fraction=0")
    stop_ids = config.onpolicy_stop_ids
    if stop_ids is None:
        if "eos_id" not in manifest:
            raise ValueError("the data's manifest records no eos_id to end the student's text; set onpolicy_stop_ids")
        stop_ids = [int(manifest["eos_id"])]
    settings = OnPolicySettings(config.onpolicy_fraction, config.onpolicy_max_new_tokens, config.onpolicy_temperature,
                                config.onpolicy_student_topk, config.onpolicy_divergence, config.onpolicy_jsd_beta,
                                list(stop_ids), config.max_seq_length, config.onpolicy_top_p,
                                config.onpolicy_teacher_temperature, config.onpolicy_sequence_weight,
                                config.onpolicy_sequence_reward, config.onpolicy_sequence_discount,
                                config.onpolicy_sequence_return,
                                reward_temperature=config.onpolicy_teacher_temperature or config.temperature)
    # one sampler stream per rank, derived from the run's seed
    return OnPolicy(settings, teacher, teacher.vocab_size, device, autocast, seed=config.seed * 1_000_003 + dist.rank + 1)


def optim_config(config: TrainConfig) -> OptimConfig:
    return OptimConfig(optimizer=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                       warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                       min_lr_ratio=config.min_lr_ratio, grad_clip=config.grad_clip)


def health_config(config: TrainConfig) -> HealthConfig:
    return HealthConfig(enabled=config.saddle_detection, window=config.saddle_window,
                        min_rel_improvement=config.saddle_min_improvement, warmup_steps=config.saddle_warmup_steps,
                        patience=config.saddle_patience, boost=config.saddle_boost, duration=config.saddle_duration,
                        cooldown=config.saddle_cooldown, max_consecutive_nonfinite=config.max_nonfinite_steps,
                        max_total_nonfinite=config.max_total_nonfinite_steps)


def loss_config(config: TrainConfig) -> LossConfig:
    return LossConfig(temperature=config.temperature, alpha=config.distill_alpha, lambda_div=config.lambda_div,
                      divergence=config.divergence, skew_beta=config.skew_beta, jsd_beta=config.jsd_beta,
                      chunk_rows=config.loss_chunk_rows)


# ------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, teacher: TeacherSource | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary with the final metrics and checkpoint.

    Launched by ``torchrun``, each process trains on its own share of every batch.
    """
    configure_cuda_allocator()  # before anything touches CUDA, the process group included
    dist = Distributed.setup(config.device, config.distributed, config.dist_timeout_s)
    try:
        return _train(config, teacher, dist)
    finally:
        dist.close()


def _train(config: TrainConfig, teacher: TeacherSource | None, dist: Distributed) -> dict[str, Any]:
    device = dist.device
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    seed_everything(config.seed)  # the same seed on every rank: the same initial student
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # bf16 autocast (fp32 weights): the default on CUDA; on CPUs asked for with precision=bf16 (~2x faster
    # for the student where the CPU has bf16 instructions, DESIGN.md section 14)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    switches: list[dict[str, str]] = []  # teacher switches, logged as events by the loop
    owns_teacher = teacher is None
    with dist.main_first():  # rank 0 builds shared files (python-docs shards, a converted teacher) once
        data_dir = prepare_data(config)
        manifest = read_manifest(data_dir)
        teacher_config = dataclasses.replace(config, teacher_device=dist.local_device(config.teacher_device))
        teacher = teacher or build_teacher(teacher_config, manifest,
                                           lambda a, b, why: switches.append({"from": a, "to": b, "reason": why}))
    check_data(config, data_dir, manifest, teacher)
    train_set = PretokenizedShardDataset(data_dir, "train")
    splits = manifest["splits"]
    val_set = PretokenizedShardDataset(data_dir, config.val_split) if config.val_split in splits else None
    sampler = ShardSampler(len(train_set), seed=config.seed, rank=dist.rank, world_size=dist.world_size)

    resume_from = resolve_resume(config.resume, output_dir)
    start_step = resumed_step(resume_from)
    stage1_steps = config.attention_transfer_steps  # steps [0, stage1_steps): attention transfer; then KD
    if start_step < stage1_steps and dist.enabled:
        raise ValueError("attention transfer (stage 1) runs in one process: run it without torchrun (e.g. "
                         "stop_at_step=attention_transfer_steps), then resume stage 2 under torchrun")
    teacher_lm, owns_teacher_lm, retrofit_report = None, False, None
    if config.student_init != "random" and (resume_from is None or start_step < stage1_steps):
        teacher_lm, owns_teacher_lm = retrofit_teacher(config, teacher, manifest["tokenizer_sha256"])
    if resume_from is not None:
        model = RetNetStudent.load(resume_from / "model", device=device)
    elif config.student_init == "teacher":
        model, retrofit_report = build_retrofitted_student(config, teacher_lm, train_set, device)
    elif config.student_init == "teacher_shape":  # the retrofit's ablation: the shape without the weights
        from student_trainer.model.retrofit import student_config_for

        model = RetNetStudent(student_config_for(teacher_lm, config.retrofit_layers, config.retrofit_group_norm_eps,
                                                 **student_behaviour(config))).to(device)
        teacher_lm = None
    else:
        model = build_student(config, teacher.vocab_size, device)
    losses = loss_config(config)
    onpolicy = build_onpolicy(config, teacher, manifest, device, autocast, dist)
    onpolicy_losses = onpolicy.settings.loss_config(losses) if onpolicy else None

    def onpolicy_step(step: int) -> bool:
        return onpolicy is not None and onpolicy.settings.is_onpolicy(step - stage1_steps)

    # DDP / FSDP2 wrapper (or the plain step); the optimisers come after it, as FSDP2 replaces the parameters
    trainable = dist.wrap(DistillStep(model, losses, device, autocast), model.decoder.layers)
    detector = SaddleDetector(health_config(config))
    guard = NonFiniteGuard.from_config(detector.config)

    def stage_optimizers(step: int) -> tuple[list[torch.optim.Optimizer], LRController]:
        """Stage 1 (retention projections only, its own LR schedule) or stage 2 (everything, KD)."""
        set_stage_trainable(model, retention_only=step < stage1_steps)
        if step < stage1_steps:
            settings = dataclasses.replace(optim_config(config), lr=config.attention_transfer_lr,
                                           warmup_steps=config.attention_transfer_warmup, total_steps=stage1_steps)
            built = build_optimizers(model, settings)
            return built, LRController(built, settings)
        settings = dataclasses.replace(optim_config(config), total_steps=config.max_steps - stage1_steps)
        built = build_optimizers(model, settings)
        return built, LRController(built, settings, multiplier=detector.multiplier, first_step=stage1_steps)

    optimizers, lr_control = stage_optimizers(start_step)
    tokens_seen, teacher_tokens = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, optimizers)
        check_resumed_teacher(config, state.get("teacher", {}), teacher)
        dist.shard_loaded_optimizer_state(optimizers)
        tokens_seen, teacher_tokens = state["tokens_seen"], state.get("teacher_tokens", 0)
        if onpolicy is not None and "onpolicy_rng" in state:
            onpolicy.load_state_dict(state["onpolicy_rng"][dist.rank])
        sampler.load_state_dict(state["sampler"])  # refuses a checkpoint of another world size by name
        if "rank_samplers" in state:
            sampler.load_state_dict(state["rank_samplers"][dist.rank])
        detector.load_state_dict(state["detector"])
        guard.load_state_dict(state["guard"])
        lr_control.load_state_dict(state["lr"])
        log.info("resumed from %s at step %d", resume_from, start_step)

    telemetry = Telemetry(output_dir, config_to_dict(config), config.wandb_mode, config.wandb_project,
                          config.progress, config.max_steps, start_step, enabled=dist.is_main)
    telemetry.log(start_step, {"event": "start", "resumed_from": str(resume_from) if resume_from else None,
                               "student_parameters": model.num_parameters(), "teacher": teacher.name,
                               "train_rows": len(train_set), "data": str(data_dir), "world_size": dist.world_size,
                               "rows_per_step": config.batch_size * dist.world_size * config.grad_accum_steps})
    if retrofit_report is not None:
        telemetry.log(0, {"event": "retrofit", **retrofit_report.to_dict()})
        for line in retrofit_report.lines():
            telemetry.print(line)
    transfer = (AttentionTransfer(model, teacher_lm, retrofit_layer_map(config, teacher_lm), config.attention_transfer_loss,
                                  autocast) if start_step < stage1_steps else None)
    evaluator = Evaluator(val_set or train_set, teacher, losses, config, device, autocast)
    # no teacher targets are needed in stage 1: prefetching starts with stage 2
    # (an on-policy step's rows are prompts only: their targets are not prefetched)
    upcoming = UpcomingBatches(train_set, sampler, config.batch_size, teacher,
                               0 if transfer is not None else config.prefetch_depth,
                               first_batch=start_step * config.grad_accum_steps,
                               wants_targets=lambda n: not onpolicy_step(n // config.grad_accum_steps))

    def trainer_state(sampler_state: dict[str, Any] | None = None, onpolicy_rng: str | None = None) -> dict[str, Any]:
        sampler_state = sampler_state or upcoming.sampler_state()
        # ranks can cross an epoch boundary at different steps (uneven partitions): keep each rank's position
        per_rank = {"rank_samplers": dist.all_gather_object(sampler_state)} if dist.enabled else {}
        if onpolicy is not None:  # each rank's sampler RNG, so that a resumed run writes the same text
            rng = onpolicy_rng or onpolicy.state_dict()
            per_rank["onpolicy_rng"] = dist.all_gather_object(rng) if dist.enabled else [rng]
        return {"tokens_seen": tokens_seen, "teacher_tokens": teacher_tokens, "sampler": sampler_state, **per_rank,
                "detector": detector.state_dict(),
                "guard": guard.state_dict(), "lr": lr_control.state_dict(), "config": config_to_dict(config),
                "teacher": {"name": teacher.name, "tokenizer_sha256": teacher.tokenizer_sha256, "k": teacher.k,
                            "weights_fingerprint": getattr(teacher, "weights_fingerprint", ""),
                            "temperature": teacher.temperature}}

    last: dict[str, Any] = {}
    if start_step == 0:
        last = evaluator.run(trainable)
        telemetry.log(0, last)
    try:
        for step in range(start_step, config.max_steps):
            trainable.train()
            step_started, teacher_seconds, micro_metrics, step_tokens = time.perf_counter(), 0.0, [], 0
            step_teacher_tokens = 0
            step_start_state, step_rows = upcoming.sampler_state(), []
            step_start_rng = onpolicy.state_dict() if onpolicy is not None else None
            micro_batches = [upcoming.next() for _ in range(config.grad_accum_steps)]
            on_policy, rollouts, sample_seconds, rewards = transfer is None and onpolicy_step(step), [], 0.0, []
            if on_policy:  # the student writes from the rows' prompts; the teacher scores it in the background
                sampling_started = time.perf_counter()
                rollouts = onpolicy.start(model, micro_batches)
                micro_batches = [rollout.batch for rollout, _ in rollouts]
                sample_seconds = time.perf_counter() - sampling_started
            row_totals = step_row_totals(micro_batches, dist) if transfer is None else None
            for micro, batch in enumerate(micro_batches):
                if transfer is not None:
                    out = transfer(batch.input_ids, batch.lengths)
                    teacher_seconds += out.teacher_seconds
                    (out.loss / config.grad_accum_steps).backward()
                    micro_metrics.append(out.metrics("train/"))
                    step_rows.extend(batch.indices.tolist())
                    step_tokens += int(batch.lengths.sum())
                    continue
                teacher_started = time.perf_counter()
                advantages = None  # the on-policy sequence term's (None: off)
                try:
                    if on_policy:
                        targets, advantages, reward = onpolicy.targets(*rollouts[micro])
                        rewards.extend([] if reward is None else [reward])
                    else:
                        targets = teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
                    lost = None
                except TeacherError as exc:
                    targets, lost = None, exc
                if dist.any_rank(lost is not None):
                    # No fallback left, a refused request or another teacher (on some rank): keep what
                    # is done (this step starts again on resume) and stop, every rank together.
                    error = str(lost) if lost else "the teacher of another rank failed"
                    path = dist.save_checkpoint(output_dir, step, model, optimizers,
                                                trainer_state(step_start_state, step_start_rng), config.keep_last)
                    kind = "teacher_unavailable" if lost is None or isinstance(lost, TeacherUnavailable) else "teacher_error"
                    telemetry.event(step, kind, {"error": error[:500], "checkpoint": str(path)})
                    if lost is None or isinstance(lost, TeacherUnavailable):
                        raise TeacherUnavailable(f"{error}. Saved {path}; start the same command again when the "
                                                 "teacher is back (resume=auto), or configure teacher_fallback") from lost
                    raise type(lost)(f"{error}. Saved {path}; fix the configuration, then start the same command "
                                     "again (resume=auto)") from lost
                teacher_seconds += time.perf_counter() - teacher_started
                step_rows.extend(batch.indices.tolist())
                step_teacher_tokens += int(batch.lengths.sum())
                # gradients are averaged across ranks in the backward of the last micro-step only
                with dist.gradient_sync(trainable, sync=micro == config.grad_accum_steps - 1):
                    out = trainable(batch, targets, row_totals, onpolicy_losses if on_policy else None, advantages)
                    out.loss.backward()  # already this micro-batch's share of the step (step_row_totals)
                micro_metrics.append(out.metrics("train/"))
                step_tokens += int(batch.lengths.sum())
            while switches:
                telemetry.event(step, "teacher_switch", switches.pop(0))
            grad_norm = clip_grad_norm(model.parameters(), config.grad_clip)
            metrics = combine_micro_metrics(micro_metrics, row_totals)
            # Every rank decides skip / saddle / stop from the same numbers, or the ranks would diverge.
            metrics = dist.all_reduce_mean({**metrics, "train/grad_norm": grad_norm, "teacher/seconds": teacher_seconds})
            grad_norm, teacher_seconds = metrics["train/grad_norm"], metrics["teacher/seconds"]
            summed = dist.all_reduce_sum({"tokens": step_tokens, "teacher_tokens": step_teacher_tokens})
            step_tokens, step_teacher_tokens = int(summed["tokens"]), int(summed["teacher_tokens"])
            step_rows = dist.all_gather_rows(step_rows)
            # a skipped step still counts: it goes on to the stage switch, evaluation, checkpoint and stop below
            skipped = guard.should_skip(metrics["train/total"], grad_norm, step)
            if skipped:
                lrs = {}
                telemetry.event(step + 1, "nonfinite_skip", {"reason": guard.last_reason, "skipped_total": guard.total_skipped})
            else:
                lrs = lr_control.apply(step)
                for optimizer in optimizers:
                    optimizer.step()
                tokens_seen += step_tokens
                teacher_tokens += step_teacher_tokens
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            # the plateau detector watches the off-policy KD loss only (stage 1's and on-policy loss are on other scales)
            watched = step >= stage1_steps and not skipped and not on_policy
            event = detector.update(step, metrics["train/total"], grad_norm) if watched else None
            if event is not None:
                telemetry.event(step + 1, "saddle_intervention", event.to_dict())

            done = step + 1
            seconds = time.perf_counter() - step_started
            metrics.update({"data/rows": step_rows, "train/grad_norm": grad_norm, "train/tokens_per_s": step_tokens / seconds,
                            "train/step_seconds": seconds, "teacher/seconds": teacher_seconds,
                            "teacher/share": teacher_seconds / seconds, "train/tokens_seen": tokens_seen,
                            "train/lr_multiplier": detector.multiplier(step), "train/stage": 1 if step < stage1_steps else 2,
                            "train/onpolicy": float(on_policy), "teacher/tokens": step_teacher_tokens,
                            "train/teacher_tokens_seen": teacher_tokens,
                            **({"onpolicy/sample_seconds": sample_seconds,
                                "onpolicy/written_tokens": sum(rollout.written_tokens for rollout, _ in rollouts)}
                               if on_policy else {}),
                            **({"onpolicy/reward": sum(rewards) / len(rewards)} if rewards else {}),
                            **{f"teacher/{key}": value for key, value in getattr(teacher, "stats", {}).items()},
                            **{f"lr/{name}": value for name, value in lrs.items()}})
            if not skipped:
                telemetry.progress(done, metrics["train/total"], metrics["train/tokens_per_s"], metrics["teacher/share"])
            if transfer is not None and done == stage1_steps:
                # stage 1 -> stage 2 (KD of every parameter), before the boundary checkpoint so that it
                # holds stage 2's optimisers and a resume from it continues exactly
                transfer = None
                if owns_teacher_lm:
                    teacher_lm = None  # the in-process copy is not needed any more
                optimizers, lr_control = stage_optimizers(done)
                upcoming.set_depth(config.prefetch_depth)
                telemetry.event(done, "stage_2", {"what": "attention transfer done; KD of all parameters"})
            if (done % config.log_every == 0 or done == config.max_steps) and not skipped:
                telemetry.log(done, {**metrics, **memory_metrics(device)})
            if done % config.eval_every == 0 or done == config.max_steps:
                last = {**metrics, **evaluator.run(trainable)}
                telemetry.log(done, {k: v for k, v in last.items() if k.startswith("eval/")})
            stopping = done == config.stop_at_step
            if done % config.save_every == 0 or done in (config.max_steps, stage1_steps) or stopping:
                dist.save_checkpoint(output_dir, done, model, optimizers, trainer_state(), config.keep_last)
            if stopping:
                telemetry.log(done, {"event": "stop", "reason": f"stop_at_step={done}; resume=auto continues"})
                break
    finally:
        telemetry.close()
        if hasattr(teacher, "stats"):
            log.info("teacher requests: %s", teacher.stats)
        if onpolicy is not None:
            onpolicy.close()
        if owns_teacher:
            teacher.close()
    done = min(config.max_steps, config.stop_at_step or config.max_steps)
    final = output_dir / "checkpoints" / f"step-{done:08d}"
    return {"output_dir": str(output_dir), "checkpoint": str(final), "steps": done, "metrics": last,
            "saddle_events": [e.to_dict() for e in detector.events], "skipped_steps": guard.total_skipped}


def resumed_step(checkpoint: Path | None) -> int:
    """The step a checkpoint resumes at (0 without one)."""
    if checkpoint is None:
        return 0
    import json

    from student_trainer.training.checkpoint import STATE_FILE

    return int(json.loads((checkpoint / STATE_FILE).read_text())["step"])


def retrofit_layer_map(config: TrainConfig, teacher_lm: nn.Module) -> list[int]:
    """The teacher layer each student layer was copied from."""
    from student_trainer.model.retrofit import resolve_layers, teacher_backbone

    return resolve_layers(config.retrofit_layers, len(teacher_backbone(teacher_lm).layers))
