"""Configuration of an exported RetNet student (written by ``retnet-distill export``).

This file is copied into the export folder next to ``modeling_retnet_student.py`` and loaded with
``trust_remote_code=True``; it imports only ``transformers`` and the standard library.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class RetNetStudentConfig(PretrainedConfig):
    """Shape of a RetNet student: ``hidden_size`` split into ``num_heads`` query/key heads (even head dim,
    rotated in pairs) and ``value_dim`` into as many value heads; a SwiGLU feed-forward of
    ``intermediate_size``; RMSNorms of ``rms_norm_eps``; the retention's per-head group norm of
    ``group_norm_eps``; fixed per-head decays ``1 - 2^(-5-h)``; rotary frequencies ``rotary_inv_freq``
    (one per pair of key dims; None: TorchScale's ``1 / 10000^linspace(0, 1, dk/2)``).
    ``chunk_size``: tokens per block when scoring or prefilling long inputs (memory O(L * chunk)).
    """

    model_type = "retnet_student"

    def __init__(self, vocab_size: int = 320, hidden_size: int = 64, num_hidden_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int = 128, value_dim: int = 64, rms_norm_eps: float = 1e-6,
                 group_norm_eps: float | None = None, rotary_inv_freq: list[float] | None = None,
                 qkv_bias: bool = False, chunk_size: int = 512, max_position_embeddings: int = 2048,
                 tie_word_embeddings: bool = True, use_cache: bool = True, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.value_dim = value_dim
        self.rms_norm_eps = rms_norm_eps
        self.group_norm_eps = rms_norm_eps if group_norm_eps is None else group_norm_eps
        self.rotary_inv_freq = None if rotary_inv_freq is None else [float(x) for x in rotary_inv_freq]
        self.qkv_bias = qkv_bias
        self.chunk_size = chunk_size
        # RetNet has no position limit; this is the context the student was trained on.
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        if hidden_size % num_heads or (hidden_size // num_heads) % 2 or value_dim % num_heads:
            raise ValueError(f"RetNetStudentConfig: hidden_size {hidden_size} and value_dim {value_dim} must split into "
                             f"{num_heads} heads, with an even key head dim; found key head dim "
                             f"{hidden_size / num_heads}, value head dim {value_dim / num_heads}")
        if self.rotary_inv_freq is not None and len(self.rotary_inv_freq) != hidden_size // num_heads // 2:
            raise ValueError(f"RetNetStudentConfig: rotary_inv_freq must hold key_head_dim / 2 = "
                             f"{hidden_size // num_heads // 2} values, found {len(self.rotary_inv_freq)}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
