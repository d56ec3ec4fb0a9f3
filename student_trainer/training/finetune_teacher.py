"""Teacher finetuning: adapt a Hugging Face causal LM teacher to the distillation data, then serve it.

``retnet-distill finetune-teacher --config configs/teacher_ft.yaml [key=value ...]`` runs
:func:`finetune`: full finetuning or LoRA (merged into the base weights on save) on the same
pre-tokenized shards and loss masks the student trains on. The result is a plain model directory
(safetensors + config + the source's tokenizer files + ``finetune.json``) that
``retnet-teacher --model DIR`` and direct/cached mode load like any other teacher.

Two rules (DESIGN.md section 11), each the fix of a bug of the original project:

- Labels are the input ids with the non-target positions set to -100, and nothing else. Hugging
  Face causal LMs shift internally (row ``t`` predicts ``labels[t + 1]``); the original shifted the
  labels itself as well and so trained on token ``t + 2``.
- The vocabulary never changes: no added tokens, no ``resize_token_embeddings``. The student and
  every teacher cache are keyed by the tokenizer's fingerprint, which must stay the same.

The recipe reads top to bottom: setup (config, data, model), loop, save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from shared.fingerprint import tokenizer_sha256
from student_trainer.training.config import ConfigError, load_dataclass_config
from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import PretokenizedShardDataset, collate_rows, read_manifest
from student_trainer.training.telemetry import Telemetry, memory_metrics
from teacher_server.engines.hf import pick_device, weights_fingerprint
from teacher_server.engines.model_source import ModelSource, model_name, resolve_model

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # Hugging Face's "not a target" label
INFO_FILE = "finetune.json"
INFO_FORMAT = "retnet-distill-teacher-finetune"
# Linear layers of Llama / Mistral / Qwen / SmolLM blocks: attention and MLP, never the embedding or head.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tokenizer files copied byte for byte from the base model, so the fingerprint cannot drift.
_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model")
_TOKENIZER_PREFIXES = ("tokenizer", "chat_template")


class FinetuneError(RuntimeError):
    """A finetuning run that cannot start or whose result would be wrong; the message says how to fix it."""


# ----------------------------------------------------------------------------------------- config


@dataclass
class TeacherFinetuneConfig:
    """Every setting of a teacher finetuning run (see the README's table)."""

    # model
    base_model: str = "smollm2-135m-instruct"  # alias, local model dir, .gguf file or hub id
    model_cache_dir: str = "~/.cache/retnet-distill/models"
    method: Literal["full", "lora"] = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # data
    train_data: str = "python-docs"  # a shard folder from `retnet-distill preprocess`, or python-docs
    data_dir: str = "data"  # where python-docs shards are built (shared with `retnet-distill train`)
    val_split: str = "val"
    max_seq_length: int = 1024
    batch_size: int = 8
    grad_accum_steps: int = 1
    # optimiser
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 200
    # evaluation and telemetry
    eval_batches: int = 8  # held-out batches of the val split, measured before and after training
    log_every: int = 1
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "retnet-distill"
    progress: bool = True
    # run and output
    output_dir: str = "runs/teacher_ft"  # metrics.jsonl and W&B files
    save_dir: str | None = None  # the finetuned teacher; None: {output_dir}/{base name}-{method}-ft
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the base checkpoint's dtype
    overwrite: bool = False  # replace an existing save_dir
    device: str = "auto"  # auto (CUDA if available), cpu, cuda, cuda:N
    seed: int = 0
    cpu_threads: int = 0  # 0: torch's default

    def check(self) -> None:
        """Cross-field checks (types are checked while loading)."""
        for key in ("lora_r", "max_seq_length", "batch_size", "grad_accum_steps", "max_steps", "eval_batches", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, found {getattr(self, key)}")
        if self.max_seq_length < 2:
            raise ConfigError(f"max_seq_length must be >= 2 (a target needs a prefix), found {self.max_seq_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, found {self.lr}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be in [0, max_steps={self.max_steps}); "
                              "shorten the warmup or train longer")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], found {self.min_lr_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), found {self.lora_dropout}")
        if self.method == "lora" and not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty; name the linear layers to adapt, e.g. [q_proj, v_proj]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"weight_decay and grad_clip must be >= 0 (grad_clip=0: no clipping), found "
                              f"{self.weight_decay} and {self.grad_clip}")

    @property
    def resolved_save_dir(self) -> Path:
        if self.save_dir:
            return Path(self.save_dir).expanduser()
        return Path(self.output_dir) / f"{model_name(self.base_model)}-{self.method}-ft"


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TeacherFinetuneConfig:
    """YAML file (optional) plus ``key=value`` overrides -> a checked :class:`TeacherFinetuneConfig`
    (the training config's rules: unknown keys rejected with the closest known one, values type-checked)."""
    return load_dataclass_config(TeacherFinetuneConfig, path, overrides)


# -------------------------------------------------------------------------------- labels and loss


def build_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels: ``input_ids [B, L]`` with every non-target position set to -100.

    Token ``t`` is a target when ``loss_mask[b, t]`` is set and ``t < lengths[b]`` (right padding
    is never a target). Nothing is shifted: the model's loss pairs row ``t - 1`` with ``labels[t]``.

    Returns:
        ``labels [B, L]`` int64.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    is_target = loss_mask.bool() & (positions[None, :] < lengths.to(input_ids.device)[:, None])
    return torch.where(is_target, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the targets, and their count.

    The shift is explicit here: row ``t`` of ``logits [B, L, V]`` predicts ``labels[:, t + 1]``;
    ``labels [B, L]`` come from :func:`build_labels`. ``sum / count`` equals
    ``model(input_ids, labels=labels).loss``. Returning the sum lets gradient accumulation weight
    every target token the same, however the targets fall into micro-batches.
    """
    next_labels = labels[:, 1:]
    rows = next_labels != IGNORE_INDEX  # [B, L-1]
    count = int(rows.sum())
    if count == 0:
        return logits.sum() * 0.0, 0  # keeps the graph (and the backward) valid for a batch without targets
    # Only the target rows are upcast to fp32: a bf16 [B, L, V] copy would be the largest tensor of the step.
    selected = logits[:, :-1][rows].float()  # [count, V]
    return F.cross_entropy(selected, next_labels[rows], reduction="sum"), count


@dataclass
class Batch:
    """A micro-batch: ``input_ids [B, L]`` and ``labels [B, L]``, trimmed to its longest row."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    tokens: int  # real (unpadded) tokens

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> "Batch":
        batch = collate_rows(rows)
        longest = int(batch["lengths"].max())
        input_ids = batch["input_ids"][:, :longest]
        labels = build_labels(input_ids, batch["loss_mask"][:, :longest], batch["lengths"])
        return cls(input_ids, labels, int(batch["lengths"].sum()))

    @property
    def targets(self) -> int:
        """Target tokens the loss sees (the first column has no prefix, so it is never one)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------ setup


def prepare_data(config: TeacherFinetuneConfig) -> Path:
    """The shard folder to train on; ``python-docs`` is built once with the base model's tokenizer
    (in the same folder ``retnet-distill train`` uses, so both share it)."""
    if config.train_data != "python-docs" or Path("python-docs").exists():
        return Path(config.train_data)
    from student_trainer.data.python_docs import python_docs_shards

    return python_docs_shards(config.data_dir, config.base_model, config.max_seq_length, config.model_cache_dir,
                              config.progress)


def check_data(config: TeacherFinetuneConfig, folder: Path, manifest: dict[str, Any], tokenizer: Any) -> None:
    """The shards must be tokenized by the base model's own tokenizer, in rows of ``max_seq_length``, with a val split."""
    if manifest["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
        raise FinetuneError(
            f"{folder} was tokenized with {manifest['tokenizer']} (sha256 {manifest['tokenizer_sha256'][:12]}...), "
            f"not with the tokenizer of {config.base_model}; preprocess the data with --tokenizer {config.base_model}"
        )
    if manifest["max_seq_length"] != config.max_seq_length:
        raise FinetuneError(f"{folder} has rows of {manifest['max_seq_length']} tokens but max_seq_length="
                            f"{config.max_seq_length}; set max_seq_length={manifest['max_seq_length']}")
    if config.val_split not in manifest["splits"]:
        raise FinetuneError(
            f"{folder} has no {config.val_split!r} split (it has {sorted(manifest['splits'])}), so there is no "
            "held-out loss; preprocess with --val-fraction 0.05, or set val_split=train (then it is not held out)"
        )


def load_base(config: TeacherFinetuneConfig, device: torch.device) -> tuple[torch.nn.Module, Any, ModelSource]:
    """The base model in fp32 on ``device`` (weights stay fp32; CUDA runs under bf16 autocast), its tokenizer, its source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(config.base_model, config.model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).to(device)
    return model, tokenizer, source


def wrap_lora(model: torch.nn.Module, config: TeacherFinetuneConfig) -> torch.nn.Module:
    """``model`` with LoRA adapters on ``lora_target_modules``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise FinetuneError(f"LoRA could not attach to lora_target_modules={config.lora_target_modules}: {exc}. "
                            f"This model's linear layers are named {linear}; set lora_target_modules to some "
                            "of them (not the LM head)") from exc


def vocab_shape(model: torch.nn.Module) -> tuple[int, int]:
    """Rows of the input embedding and of the LM head: the vocabulary as the weights see it."""
    return model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warmup + cosine, the student's schedule (:func:`student_trainer.training.optim.lr_factor`)."""
    # Imported here: student_trainer.training.optim pulls in TorchScale (~2 s), which only this number needs.
    from student_trainer.training.optim import lr_factor as schedule

    return schedule(step, warmup_steps, total_steps, min_lr_ratio)


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, autocast) -> dict[str, float]:
    """Mean next-token loss per target token over ``batches`` (and its perplexity)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast:
            logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits
        loss_sum, n = masked_lm_loss(logits, batch.labels.to(device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    if count == 0:
        raise FinetuneError("the held-out batches hold no target tokens (the loss mask is all zero); "
                            "check the data's loss mask or raise eval_batches")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "targets": count}


# ------------------------------------------------------------------------------------------- save


def _copy_tokenizer(source: ModelSource, tokenizer: Any, folder: Path) -> None:
    """The base model's tokenizer files, byte for byte (re-saving could rewrite them differently)."""
    src = Path(source.path)
    copied = False
    if src.is_dir():
        for file in src.iterdir():
            if file.is_file() and (file.name in _TOKENIZER_FILES or file.name.startswith(_TOKENIZER_PREFIXES)):
                shutil.copy2(file, folder / file.name)
                copied = True
    if not copied:  # a hub id: transformers holds the files in its own cache
        tokenizer.save_pretrained(folder)


def _save_dtype(config: TeacherFinetuneConfig, source: ModelSource) -> torch.dtype:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.save_dtype != "auto":
        return names[config.save_dtype]
    from transformers import AutoConfig

    base_dtype = getattr(AutoConfig.from_pretrained(source.path), "dtype", None)
    base_dtype = str(base_dtype).removeprefix("torch.") if base_dtype is not None else "float32"
    return names.get(base_dtype, torch.float32)


def save_teacher(model: torch.nn.Module, tokenizer: Any, source: ModelSource, folder: Path, info: dict[str, Any],
                 probe_ids: torch.Tensor, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                 base_vocab_rows: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write the finetuned teacher to ``folder`` atomically: a LoRA model is merged into its base weights first.

    The folder holds safetensors weights, ``config.json``, the base model's tokenizer files and
    ``finetune.json`` (``info`` plus the checks below); it appears only when complete (a temp
    folder, then a rename). Checks before it appears: the merged model gives the same logits as the
    adapter model on ``probe_ids [B, L]``, the embedding and head keep ``base_vocab_rows`` rows
    (the base model's; default: the rows ``model`` has now), and the saved tokenizer has the base
    tokenizer's fingerprint.

    Returns:
        The ``finetune.json`` contents.
    """
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; set overwrite=true to replace it or choose another save_dir")
    from peft import PeftModel

    info = dict(info)
    vocab_before = base_vocab_rows or vocab_shape(model)
    if isinstance(model, PeftModel):
        model.eval()
        with torch.no_grad():
            before = model(input_ids=probe_ids, use_cache=False).logits.float()
            model = model.merge_and_unload()
            after = model(input_ids=probe_ids, use_cache=False).logits.float()
        diff = float((after - before).abs().max())
        # fp32 sums in another order differ by ~1e-6 of the logits' scale; a wrong merge by O(1).
        if not diff <= 1e-3 * max(1.0, float(before.abs().max())):
            raise FinetuneError(f"merging the LoRA adapters changed the logits by up to {diff:.3g}; expected the "
                                "merged model to match the adapter model (a peft/transformers version issue?)")
        info["merge_max_abs_logit_diff"] = diff
    if vocab_shape(model) != tuple(vocab_before):
        raise FinetuneError(f"the (embedding, head) rows changed from {tuple(vocab_before)} to {vocab_shape(model)}; "
                            "finetuning must never add tokens or resize embeddings")
    info["vocab_rows"] = list(vocab_before)
    model = model.to(dtype=dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a server running as another user reads it
        model.save_pretrained(staging, safe_serialization=True)
        _copy_tokenizer(source, tokenizer, staging)
        from transformers import AutoTokenizer

        saved_sha = tokenizer_sha256(AutoTokenizer.from_pretrained(staging))
        if saved_sha != tokenizer_sha256(tokenizer):
            raise FinetuneError(f"the tokenizer saved in {staging} has another fingerprint than {source.path}'s")
        info.update(saved_dtype=str(dtype).removeprefix("torch."), tokenizer_sha256=saved_sha)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for file in staging.iterdir():
            os.chmod(file, 0o644)  # the weights come out 0600; a teacher container's user must read them
        if folder.exists():  # overwrite: move the old one aside first, so a crash leaves one of them whole
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


# ------------------------------------------------------------------------------------------ recipe


def finetune(config: TeacherFinetuneConfig) -> dict[str, Any]:
    """Finetune ``config.base_model`` on the shards' targets and save it; returns the ``finetune.json`` contents."""
    started = time.perf_counter()
    save_dir = config.resolved_save_dir
    if save_dir.exists() and not config.overwrite:  # fail before training, not after
        raise FileExistsError(f"{save_dir} already exists; set overwrite=true to replace it or choose another save_dir")
    device = torch.device(pick_device(config.device))
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    seed_everything(config.seed)
    # bf16 autocast on CUDA with fp32 weights; fp32 on CPU (bf16 on CPUs without native support is ~5x slower).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    model, tokenizer, source = load_base(config, device)
    data_dir = prepare_data(config)
    manifest = read_manifest(data_dir)
    check_data(config, data_dir, manifest, tokenizer)
    train_set = PretokenizedShardDataset(data_dir, "train")
    val_set = PretokenizedShardDataset(data_dir, config.val_split)
    eval_rows = list(range(min(len(val_set), config.eval_batches * config.batch_size)))
    eval_batches = [Batch.from_rows([val_set[i] for i in eval_rows[a : a + config.batch_size]])
                    for a in range(0, len(eval_rows), config.batch_size)]
    sampler = ShardSampler(len(train_set), seed=config.seed)

    vocab_rows = vocab_shape(model)
    if config.method == "lora":
        model = wrap_lora(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))

    telemetry = Telemetry(config.output_dir, dataclasses.asdict(config), config.wandb_mode, config.wandb_project,
                          config.progress, config.max_steps)
    try:
        before = held_out_loss(model, eval_batches, device, autocast)
        telemetry.log(0, {"event": "start", "base_model": config.base_model, "method": config.method,
                          "trainable_parameters": trainable, "parameters": total, "data": str(data_dir),
                          "train_rows": len(train_set), "eval/loss": before["loss"], "eval/ppl": before["ppl"]})
        log.info("held-out loss before: %.4f (%d targets)", before["loss"], before["targets"])
        tokens_seen, targets_seen, skipped = 0, 0, 0
        for step in range(config.max_steps):
            step_started = time.perf_counter()
            micro = [Batch.from_rows([train_set[i] for i in sampler.take(config.batch_size)])
                     for _ in range(config.grad_accum_steps)]
            # Normalise by the step's target count, so every target token weighs the same across micro-batches.
            step_targets = max(1, sum(b.targets for b in micro))
            loss_total = 0.0
            for batch in micro:
                with autocast:
                    logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits
                loss_sum, _ = masked_lm_loss(logits, batch.labels.to(device))
                (loss_sum / step_targets).backward()
                loss_total += float(loss_sum.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf")))
            if not math.isfinite(grad_norm) or not math.isfinite(loss_total):
                optimizer.zero_grad(set_to_none=True)  # one bad batch must not poison the weights
                skipped += 1
                telemetry.event(step + 1, "nonfinite_skip", {"loss": loss_total, "grad_norm": grad_norm})
                continue
            lr = config.lr * lr_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = sum(b.tokens for b in micro)
            tokens_seen, targets_seen = tokens_seen + step_tokens, targets_seen + sum(b.targets for b in micro)
            seconds = time.perf_counter() - step_started
            loss = loss_total / step_targets
            telemetry.progress(step + 1, loss, step_tokens / seconds, 0.0)
            if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                telemetry.log(step + 1, {"train/loss": loss, "train/grad_norm": grad_norm, "lr/adamw": lr,
                                         "train/tokens_per_s": step_tokens / seconds, "train/step_seconds": seconds,
                                         "train/tokens_seen": tokens_seen, **memory_metrics(device)})
        after = held_out_loss(model, eval_batches, device, autocast)
        log.info("held-out loss after: %.4f (before %.4f)", after["loss"], before["loss"])
        telemetry.log(config.max_steps, {"eval/loss": after["loss"], "eval/ppl": after["ppl"]})

        info = {
            "format": INFO_FORMAT, "version": 1,
            "base_model": config.base_model, "base_model_path": source.path,
            "base_weights_fingerprint": weights_fingerprint(source.path),
            "method": config.method,
            "lora": ({"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                      "target_modules": list(config.lora_target_modules), "merged": True}
                     if config.method == "lora" else None),
            "steps": config.max_steps, "skipped_steps": skipped, "tokens_seen": tokens_seen,
            "target_tokens_seen": targets_seen, "trainable_parameters": trainable, "parameters": total,
            "held_out_loss": {"before": before["loss"], "after": after["loss"]},
            "held_out_ppl": {"before": before["ppl"], "after": after["ppl"]},
            "held_out": {"split": config.val_split, "rows": len(eval_rows), "targets": before["targets"]},
            "data": {"path": str(data_dir), "fingerprint": manifest["fingerprint"], "train_rows": len(train_set)},
            "vocab_size": len(tokenizer),
            "device": str(device), "seconds": round(time.perf_counter() - started, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": dataclasses.asdict(config),
        }
        probe = eval_batches[0].input_ids[:2, :64].to(device)
        info = save_teacher(model, tokenizer, source, save_dir, info, probe, _save_dtype(config, source),
                            config.overwrite, base_vocab_rows=vocab_rows)
        telemetry.log(config.max_steps, {"event": "saved", "save_dir": str(save_dir)})
    finally:
        telemetry.close()
    log.info("saved the finetuned teacher to %s; serve it with: retnet-teacher --model %s", save_dir, save_dir)
    return {**info, "save_dir": str(save_dir)}
