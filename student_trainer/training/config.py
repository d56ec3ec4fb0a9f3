"""Training configuration: one flat dataclass, loaded from YAML, with ``key=value`` overrides.

Flat on purpose: every key can be overridden the same way on the command line
(``retnet-distill train --config configs/train_cpu.yaml max_steps=50 teacher_topk=32``), and the
original project's key names (``model_variant``, ``teacher_model``, ``teacher_topk``,
``distill_alpha``, ...) keep their meaning. Unknown keys are rejected by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value that is not accepted; the message names it."""


@dataclass
class TrainConfig:
    """Every setting of a training run (see the README's table for each key)."""

    # run
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto (CUDA if available), cpu, cuda, cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cpu_threads: int = 0  # 0: torch's default
    max_steps: int = 1000
    stop_at_step: int | None = None  # end this invocation after this step with a checkpoint (time-sliced jobs)
    resume: str = "auto"  # auto (latest checkpoint in output_dir), never, or a checkpoint folder
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 3
    # several processes (`torchrun --nproc_per_node=N -m student_trainer.cli train ...`; ignored in one process)
    distributed: Literal["ddp", "fsdp2"] = "ddp"  # ddp: a full student per rank; fsdp2: sharded (needs optimizer=adamw)
    dist_timeout_s: float = 1800.0  # how long a rank waits for the others in a collective (> teacher_deadline_s)
    # student
    model_variant: Literal["tiny", "350M", "500M"] | None = None  # None: 500M (random init) or the teacher's shape
    student_vocab_size: int | None = None  # None: the teacher tokenizer's length
    # retrofit: student_init=teacher copies the teacher's weights into a RetNet of its shape (README: Retrofit)
    # (teacher_shape: random weights in the teacher's shape, the ablation of the retrofit)
    student_init: Literal["random", "teacher", "teacher_shape"] = "random"
    retrofit_layers: list[int] | None = None  # teacher layers to keep, e.g. [0, 2, 4, ...]; None: all
    retrofit_group_norm_eps: float = 1e-8  # the retention group norm's epsilon (parallel == recurrent needs it small)
    retrofit_calibration_rows: int = 8  # training rows the output-gate fit and the step-0 check read
    attention_transfer_steps: int = 0  # stage 1: steps that train only the retention on the teacher's attention
    attention_transfer_lr: float = 1e-3
    attention_transfer_warmup: int = 10
    attention_transfer_loss: Literal["relative", "mse"] = "relative"
    # the retention path (README: Long context): rows of >= chunkwise_min_length tokens train chunkwise
    # (O(L * chunk)), shorter ones in parallel; null: never, unless chunkwise_recurrent forces it always
    chunkwise_min_length: int | None = 1024
    recurrent_chunk_size: int | None = None  # tokens per chunk; None: the preset's (512; tiny 16)
    chunkwise_recurrent: bool = False
    gradient_checkpointing: bool = False
    # data
    train_data: str = "python-docs"  # a shard folder from `retnet-distill preprocess`, or python-docs
    val_split: str = "val"
    max_seq_length: int = 1024
    batch_size: int = 8
    grad_accum_steps: int = 1
    data_dir: str = "data"  # where python-docs shards are built when train_data is python-docs
    # teacher
    teacher_mode: Literal["direct", "cached", "network"] = "direct"
    teacher_url: str | None = None  # network mode: one URL, or several separated by commas
    prefetch_depth: int = 2  # network mode: batches whose targets are requested ahead of the step
    teacher_fallback: list[str] = field(default_factory=list)  # network mode: e.g. [direct] or [cached]
    teacher_retries: int = 4  # network mode: retries of a request (across replicas)
    teacher_deadline_s: float = 300.0  # network mode without fallback: keep retrying this long, then checkpoint + stop
    teacher_probe_s: float = 10.0  # network mode on a fallback: how often to check whether the service is back
    # network mode: how targets travel. fp16: wire v1 tensors (260 B/token at k=64); coded: wire v1.2, one
    # checksummed codec block per reply (ids as delta-coded sets, log-probs on a grid, exact tail: README "Compact
    # teacher targets"), with teacher_mass_cutoff > 0 dropping each row's least likely ids up to that mass;
    # sampled: teacher_topk ids drawn per position (unbiased KD gradients, ids + counts).
    teacher_encoding: Literal["fp16", "coded", "sampled"] = "fp16"  # sampled: teacher_topk draws per position
    teacher_mass_cutoff: float = 0.0
    teacher_cache: str | None = None  # cached mode: a folder written by `retnet-distill cache`
    teacher_cache_verify: bool = True  # cached mode: check each shard's sha256 at its first read (once per file)
    teacher_model: str = "smollm2-135m-instruct"  # network/cached modes: the served/cached teacher must be this one
    teacher_fingerprint: str | None = None  # the teacher weights' fingerprint (GET /v1/models); None: the first source's
    allow_teacher_mismatch: bool = False  # only warn when a source serves another model or weights
    teacher_device: str = "auto"
    teacher_dtype: str = "auto"
    teacher_topk: int = 64
    model_cache_dir: str = "~/.cache/retnet-distill/models"
    # loss
    temperature: float = 1.0
    distill_alpha: float = 0.5  # weight of the hard-label CE; the KL gets (1 - alpha) * T^2
    lambda_div: float = 0.0
    divergence: Literal["forward", "reverse", "skew", "jsd"] = "forward"
    skew_beta: float = 0.1
    jsd_beta: float = 0.5  # divergence=jsd: beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s
    loss_chunk_rows: int = 512
    # on-policy distillation (README: On-policy distillation): this share of the KD steps trains on the
    # student's own continuations of the batch's prompts, which the teacher scores (wire v1.1 score_ids)
    onpolicy_fraction: float = 0.0  # 0: off; 0.25: every fourth KD step
    onpolicy_max_new_tokens: int = 64  # tokens the student writes per prompt (fewer where it ends its turn)
    # the student samples as `generate` does by default (0.7 / 0.9): at temperature 1 its answers came out
    # 10% less likely to the teacher, at 0.7 / 0.9 1.5% (RESULTS.md, session 12)
    onpolicy_temperature: float = 0.7  # the student's sampling temperature
    onpolicy_top_p: float = 0.9  # nucleus of the student's sampling (1: the whole vocabulary)
    onpolicy_student_topk: int = 64  # the student's top ids the teacher scores at each written token (+ the sampled one)
    onpolicy_divergence: Literal["reverse_kl", "jsd"] = "reverse_kl"
    onpolicy_jsd_beta: float = 0.5
    # the teacher's temperature when it scores the student's text; below `temperature` it is a sharper
    # target (the student, at `temperature`, learns the teacher's p^(1/T') renormalised); None: `temperature`
    onpolicy_teacher_temperature: float | None = None
    onpolicy_stop_ids: list[int] | None = None  # ids that end the student's text; None: the data's eos_id
    # the sequence term: a policy gradient of the rewards of the tokens after each written token, which the
    # token-level divergence does not see (where a token leads); 0: off (README: On-policy distillation)
    onpolicy_sequence_weight: float = 0.0
    onpolicy_sequence_reward: Literal["reverse_kl", "teacher_logprob"] = "reverse_kl"
    onpolicy_sequence_discount: float = 0.9  # of the later rewards in a token's return (0: the next token's only)
    # each later position's reward: of the drawn token, or its expectation over the student's top k
    onpolicy_sequence_return: Literal["expected", "sampled"] = "expected"
    # optimiser
    optimizer: Literal["muon", "adamw"] = "muon"
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # training health
    saddle_detection: bool = True
    saddle_window: int = 100
    saddle_min_improvement: float = 0.002
    saddle_warmup_steps: int = 1000  # never fires before this step (keep it past the LR warmup)
    saddle_patience: int = 50  # consecutive plateau-looking steps before an intervention
    saddle_boost: float = 2.0
    saddle_duration: int = 50
    saddle_cooldown: int = 200
    max_nonfinite_steps: int = 10  # skipped non-finite steps in a row before the run stops
    max_total_nonfinite_steps: int | None = 100  # skipped non-finite steps in all before it stops (None: no limit)
    # telemetry
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "retnet-distill"
    progress: bool = True
    tags: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Cross-field checks (types are checked while loading)."""
        positive = ("max_steps", "log_every", "eval_every", "save_every", "keep_last", "max_seq_length", "batch_size",
                    "grad_accum_steps", "teacher_topk", "loss_chunk_rows", "saddle_window", "max_nonfinite_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, found {getattr(self, key)}")
        if self.max_total_nonfinite_steps is not None and self.max_total_nonfinite_steps < 1:
            raise ConfigError(f"max_total_nonfinite_steps must be >= 1 or null (no limit), found "
                              f"{self.max_total_nonfinite_steps}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distill_alpha must be in [0, 1] (1 = CE only), found {self.distill_alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, found {self.temperature}")
        self._check_retrofit()
        self._check_chunking()
        stage2_steps = self.max_steps - self.attention_transfer_steps
        if self.warmup_steps >= stage2_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be < the KD steps (max_steps "
                              f"{self.max_steps} - attention_transfer_steps {self.attention_transfer_steps} = "
                              f"{stage2_steps}); shorten the warmup or train longer")
        unknown = set(self.teacher_fallback) - {"direct", "cached"}
        if unknown or (self.teacher_fallback and self.teacher_mode != "network"):
            raise ConfigError(f"teacher_fallback takes direct and/or cached after teacher_mode=network, found "
                              f"{self.teacher_fallback} with teacher_mode={self.teacher_mode}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, found {self.lr}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"jsd_beta must be in (0, 1), found {self.jsd_beta}")
        self._check_onpolicy()
        if self.distributed == "fsdp2" and self.optimizer == "muon":
            # torch.optim.Muon orthogonalises each rank's DTensor shard, not the whole matrix (torch 2.14)
            raise ConfigError("distributed=fsdp2 needs optimizer=adamw: torch's Muon would orthogonalise each rank's "
                              "shard of a weight matrix instead of the whole matrix; set optimizer=adamw, or "
                              "distributed=ddp to keep Muon")
        if not 0 <= self.teacher_mass_cutoff < 1:
            raise ConfigError(f"teacher_mass_cutoff must be in [0, 1) (0: keep every id), found {self.teacher_mass_cutoff}")
        if self.teacher_encoding == "sampled" and not 1 <= self.teacher_topk <= 255:
            raise ConfigError(f"teacher_encoding=sampled draws teacher_topk ids per position: at most 255, found "
                              f"{self.teacher_topk}")
        if self.teacher_encoding == "sampled" and self.teacher_fallback:
            raise ConfigError(f"teacher_encoding=sampled cannot fall back to {self.teacher_fallback}: those teachers give "
                              "top-k targets, so the run's targets would change kind mid-run; drop teacher_fallback or "
                              "use teacher_encoding=coded")
        if self.teacher_mass_cutoff and self.teacher_encoding != "coded":
            raise ConfigError(f"teacher_mass_cutoff ({self.teacher_mass_cutoff}) needs teacher_encoding=coded (the fp16 "
                              "encoding sends every id); set teacher_encoding=coded or teacher_mass_cutoff=0")
        if self.teacher_mode == "network" and self.dist_timeout_s <= self.teacher_deadline_s:
            raise ConfigError(f"dist_timeout_s ({self.dist_timeout_s}) must be > teacher_deadline_s "
                              f"({self.teacher_deadline_s}): the other ranks wait that long for a rank whose "
                              "teacher is retrying")


    def _check_onpolicy(self) -> None:
        if not 0.0 <= self.onpolicy_fraction <= 1.0:
            raise ConfigError(f"onpolicy_fraction must be in [0, 1] (0: off), found {self.onpolicy_fraction}")
        if not self.onpolicy_fraction:
            return
        if not 1 <= self.onpolicy_max_new_tokens < self.max_seq_length:
            raise ConfigError(f"onpolicy_max_new_tokens must be in [1, max_seq_length={self.max_seq_length}) (the "
                              f"prompt needs a token), found {self.onpolicy_max_new_tokens}")
        if not self.onpolicy_temperature > 0:
            raise ConfigError(f"onpolicy_temperature must be > 0, found {self.onpolicy_temperature}")
        if not 0.0 < self.onpolicy_top_p <= 1.0:
            raise ConfigError(f"onpolicy_top_p must be in (0, 1] (1: no nucleus filtering), found {self.onpolicy_top_p}")
        if self.onpolicy_student_topk < 1:
            raise ConfigError(f"onpolicy_student_topk must be >= 1, found {self.onpolicy_student_topk}")
        if not 0.0 < self.onpolicy_jsd_beta < 1.0:
            raise ConfigError(f"onpolicy_jsd_beta must be in (0, 1), found {self.onpolicy_jsd_beta}")
        if self.onpolicy_teacher_temperature is not None and not (math.isfinite(self.onpolicy_teacher_temperature)
                                                                  and self.onpolicy_teacher_temperature > 0):
            raise ConfigError(f"onpolicy_teacher_temperature must be a finite number > 0 (or null: the run's temperature="
                              f"{self.temperature}), found {self.onpolicy_teacher_temperature}")
        if not (math.isfinite(self.onpolicy_sequence_weight) and self.onpolicy_sequence_weight >= 0):
            raise ConfigError(f"onpolicy_sequence_weight must be a finite number >= 0 (0: off), found "
                              f"{self.onpolicy_sequence_weight}")
        if not 0.0 <= self.onpolicy_sequence_discount <= 1.0:
            raise ConfigError(f"onpolicy_sequence_discount must be in [0, 1] (0: the next token's reward only, 1: the "
                              f"mean of all later ones), found {self.onpolicy_sequence_discount}")
        if self.teacher_mode == "cached" or "cached" in self.teacher_fallback:
            where = "teacher_mode=cached" if self.teacher_mode == "cached" else "teacher_fallback includes cached"
            raise ConfigError(f"onpolicy_fraction={self.onpolicy_fraction} needs a teacher that scores the student's "
                              f"own text, but {where}: a cache holds only the teacher's top k of its own data. Use "
                              "teacher_mode=direct or network (with teacher_fallback: [direct]), or onpolicy_fraction=0")

    def _check_chunking(self) -> None:
        from student_trainer.model.config import PRESETS, StudentConfig

        if self.recurrent_chunk_size is not None and self.recurrent_chunk_size < 1:
            raise ConfigError(f"recurrent_chunk_size must be >= 1 (or null: the preset's), found {self.recurrent_chunk_size}")
        preset = PRESETS[self.student_preset] if self.student_init == "random" else {}
        chunk = self.recurrent_chunk_size or preset.get("recurrent_chunk_size", StudentConfig.recurrent_chunk_size)
        if self.chunkwise_min_length is not None and self.chunkwise_min_length < chunk:
            raise ConfigError(f"chunkwise_min_length ({self.chunkwise_min_length}) must be >= recurrent_chunk_size "
                              f"({chunk}): a row shorter than one chunk gains nothing from the chunkwise path; raise "
                              "chunkwise_min_length, lower recurrent_chunk_size, or set chunkwise_min_length=null")

    def _check_retrofit(self) -> None:
        if self.student_init != "random":
            if self.model_variant is not None:
                raise ConfigError(f"model_variant={self.model_variant} contradicts student_init={self.student_init}: "
                                  "that student has the teacher's shape (use retrofit_layers for a shallower one); drop "
                                  "model_variant, or set student_init=random")
            if self.student_vocab_size is not None:
                raise ConfigError(f"student_vocab_size cannot be set with student_init={self.student_init}: the student "
                                  "keeps the teacher's embedding rows")
        elif self.retrofit_layers:
            raise ConfigError(f"retrofit_layers needs student_init=teacher (or teacher_shape), found "
                              f"retrofit_layers={self.retrofit_layers} with student_init=random")
        if self.attention_transfer_steps and self.student_init != "teacher":
            raise ConfigError(f"attention_transfer_steps needs student_init=teacher (a student built from the teacher's "
                              f"weights), found attention_transfer_steps={self.attention_transfer_steps} with "
                              f"student_init={self.student_init}")
        if self.retrofit_layers is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in self.retrofit_layers):
            raise ConfigError(f"retrofit_layers must be a list of teacher layer indices, found {self.retrofit_layers}")
        if not self.retrofit_group_norm_eps > 0:
            raise ConfigError(f"retrofit_group_norm_eps must be > 0, found {self.retrofit_group_norm_eps}")
        if self.retrofit_calibration_rows < 1:
            raise ConfigError(f"retrofit_calibration_rows must be >= 1, found {self.retrofit_calibration_rows}")
        if not 0 <= self.attention_transfer_steps < self.max_steps:
            raise ConfigError(f"attention_transfer_steps must be in [0, max_steps={self.max_steps}) (stage 2 needs "
                              f"at least one step), found {self.attention_transfer_steps}")
        if self.attention_transfer_steps and not 0 <= self.attention_transfer_warmup < self.attention_transfer_steps:
            raise ConfigError(f"attention_transfer_warmup ({self.attention_transfer_warmup}) must be in [0, "
                              f"attention_transfer_steps={self.attention_transfer_steps})")
        if self.attention_transfer_lr <= 0:
            raise ConfigError(f"attention_transfer_lr must be > 0, found {self.attention_transfer_lr}")

    @property
    def student_preset(self) -> str:
        """The preset of a random-init student (``model_variant``, default 500M)."""
        return self.model_variant or "500M"


def _field_types(cls: type | None = None) -> dict[str, Any]:
    hints = typing.get_type_hints(cls or TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls or TrainConfig)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, found {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, found {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, found {value!r}") from None
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. output_dir=2024 from an override
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, found {value!r} ({type(value).__name__})")
    return value


def _unknown_key(key: str, known: dict[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see the README for every key"
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``lr=1e-3``, ``progress=false``, ``tags=[a,b]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_dataclass_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) plus ``key=value`` overrides -> a checked instance of the dataclass ``cls``
    (which has a ``check()`` method): the loader of every config of this package.

    Raises:
        ConfigError: an unknown key (with the closest known one), a value of the wrong type, or
            values that do not go together.
    """
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of key: value, found {type(loaded).__name__}")
        values.update(loaded)
    for item in overrides or []:
        key, value = parse_override(item)
        values[key] = value
    types_by_key = _field_types(cls)
    for key in values:
        if key not in types_by_key:
            raise _unknown_key(key, types_by_key)
    config = cls(**{key: _coerce(key, value, types_by_key[key]) for key, value in values.items()})
    config.check()
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) plus ``key=value`` overrides -> a checked :class:`TrainConfig`."""
    return load_dataclass_config(TrainConfig, path, overrides)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
