"""Configuration of the RetNet student: one dataclass, named presets and their exact parameter counts.

Every dimension is explicit: TorchScale's own defaults do not even build (value dim 1280 is not
divisible by its default 3 heads), so nothing here relies on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LLAMA3_VOCAB = 128_256


@dataclass
class StudentConfig:
    """Shape and behaviour of a :class:`~student_trainer.model.student.RetNetStudent`.

    ``d_model`` is split into ``n_heads`` query/key heads of ``d_model // n_heads`` dims (must be
    even: the rotary position shift rotates pairs) and ``value_dim`` into ``n_heads`` value heads.
    ``ffn_dim`` is the hidden width of the SwiGLU feed-forward block. ``max_seq_len`` is the
    training context; RetNet itself has no position limit and decodes past it.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    value_dim: int
    dropout: float = 0.0
    activation_dropout: float = 0.0
    # Which retention path scores a batch (training, evaluation): the parallel one is O(L^2) per layer,
    # the chunkwise one O(L * chunk). Sequences of at least ``chunkwise_min_length`` tokens run chunkwise
    # (None: never, unless ``chunkwise_recurrent``, which forces it at every length). The default is the
    # crossover measured in benchmarks/bench_seq_scaling.py; prompts are always prefilled chunk by chunk.
    chunkwise_recurrent: bool = False
    chunkwise_min_length: int | None = 1024
    recurrent_chunk_size: int = 512
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    layernorm_eps: float = 1e-6
    # The retention's per-head group norm; None: layernorm_eps. A retrofitted student needs a much
    # smaller one (1e-8): with teacher-sized q.k the parallel and recurrent paths otherwise disagree.
    group_norm_eps: float | None = None
    # Rotary frequencies, one per pair of key dims (key_head_dim // 2 values); None: TorchScale's own
    # table. A retrofitted student carries its teacher's (rope_theta, rope scaling), which it must keep.
    rotary_inv_freq: list[float] | None = None
    qkv_bias: bool = False  # biases on q/k/v (Qwen2-style teachers)
    gradient_checkpointing: bool = False
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "value_dim",
                     "recurrent_chunk_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"StudentConfig.{name} must be a positive integer, found {value!r}.")
        if self.chunkwise_min_length is not None and (
                isinstance(self.chunkwise_min_length, bool) or not isinstance(self.chunkwise_min_length, int)
                or self.chunkwise_min_length < self.recurrent_chunk_size):
            raise ValueError(
                f"StudentConfig.chunkwise_min_length must be an integer >= recurrent_chunk_size "
                f"({self.recurrent_chunk_size}) or None, found {self.chunkwise_min_length!r}: a sequence shorter "
                "than one chunk is padded to a whole chunk, so the chunkwise path only costs more there; raise "
                "chunkwise_min_length or lower recurrent_chunk_size.")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"StudentConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(remainder {self.d_model % self.n_heads}); pick d_model as a multiple of n_heads, "
                f"e.g. d_model={self.d_model - self.d_model % self.n_heads or self.n_heads}."
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"StudentConfig: the key head dim d_model/n_heads = {self.d_model // self.n_heads} must be "
                "even (the rotary position shift rotates pairs of dims); change d_model or n_heads."
            )
        if self.value_dim % self.n_heads != 0:
            raise ValueError(
                f"StudentConfig: value_dim={self.value_dim} must be divisible by n_heads={self.n_heads} "
                f"(remainder {self.value_dim % self.n_heads}); pick value_dim as a multiple of n_heads, "
                f"e.g. 2 * d_model = {2 * self.d_model}."
            )
        for name in ("dropout", "activation_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"StudentConfig.{name} must be in [0, 1), found {value!r}.")
        if not self.layernorm_eps > 0:
            raise ValueError(f"StudentConfig.layernorm_eps must be > 0, found {self.layernorm_eps!r}.")
        if self.group_norm_eps is not None and not self.group_norm_eps > 0:
            raise ValueError(f"StudentConfig.group_norm_eps must be > 0 or None, found {self.group_norm_eps!r}.")
        if self.rotary_inv_freq is not None:
            self.rotary_inv_freq = [float(x) for x in self.rotary_inv_freq]
            if len(self.rotary_inv_freq) != self.key_head_dim // 2:
                raise ValueError(f"StudentConfig.rotary_inv_freq must hold key_head_dim / 2 = {self.key_head_dim // 2} "
                                 f"frequencies, found {len(self.rotary_inv_freq)}.")

    def uses_chunkwise(self, length: int) -> bool:
        """Whether a batch of ``length`` tokens per row is scored by the chunkwise retention path."""
        return self.chunkwise_recurrent or (self.chunkwise_min_length is not None and length >= self.chunkwise_min_length)

    @property
    def key_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def value_head_dim(self) -> int:
        return self.value_dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudentConfig":
        """Build from a dict (e.g. ``config.json``); unknown keys are rejected by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"StudentConfig: unknown key(s) {unknown}; expected a subset of {sorted(known)}. "
                "Remove or rename them."
            )
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "StudentConfig":
        """A named preset (``tiny``, ``350M``, ``500M``) with optional field overrides.

        ``tiny`` has no natural vocabulary, so pass ``vocab_size`` for it (default 320).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown student preset {name!r}; expected one of {sorted(PRESETS)}.")
        values = dict(PRESETS[name])
        values.update(overrides)
        values["preset"] = name
        return cls.from_dict(values)


# Sizes follow the original project (d, layers, heads, Llama-3 vocab, tied embeddings); value_dim is
# RetNet's usual 2*d and ffn_dim was chosen to land on the nominal size.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, ffn_dim=128, value_dim=128,
                 recurrent_chunk_size=16, max_seq_len=256),
    "350M": dict(vocab_size=LLAMA3_VOCAB, d_model=960, n_layers=12, n_heads=12, ffn_dim=4032,
                 value_dim=1920, recurrent_chunk_size=512, max_seq_len=2048),
    "500M": dict(vocab_size=LLAMA3_VOCAB, d_model=1152, n_layers=15, n_heads=12, ffn_dim=3712,
                 value_dim=2304, recurrent_chunk_size=512, max_seq_len=2048),
}

# Exact trainable parameter counts (tied embedding counted once), checked in tests/test_model.py by
# building each preset on the meta device.
PRESET_PARAM_COUNTS: dict[str, int] = {
    "tiny": 135_488,  # with the default vocab_size=320
    "350M": 350_969_280,
    "500M": 499_469_184,
}


def count_parameters(config: StudentConfig) -> int:
    """Closed-form parameter count of a student built from ``config`` (tied embedding counted once).

    Per layer: q, k (d x d), v, g (d x dv), out (dv x d), SwiGLU fc1, gate (d x f), fc2 (f x d) and
    two RMSNorm weights (d), q/k/v biases (2d + dv) with ``qkv_bias``; the retention group norm has no weights. Plus the embedding (V x d),
    an untied head (V x d) when not tied, and the final RMSNorm (d).
    """
    d, dv, f, vocab = config.d_model, config.value_dim, config.ffn_dim, config.vocab_size
    per_layer = 2 * d * d + 3 * d * dv + 3 * d * f + 2 * d + ((2 * d + dv) if config.qkv_bias else 0)
    head = 0 if config.tie_embeddings else vocab * d
    return vocab * d + head + config.n_layers * per_layer + d
