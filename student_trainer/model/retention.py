"""Multi-scale retention with the fixes of DESIGN.md section 6, as TorchScale subclasses.

One retention function on three paths: parallel (O(L^2) per layer), chunkwise (ours, O(L * chunk);
also ``RetNetStudent.prefill``'s path after a state) and recurrent (O(1) per token), all computing
TorchScale's recurrent form ``o_n = sum_{m<=n} g^(n-m) (q_n . k_m) v_m / sqrt(S_n)`` with
``S_n = sum_{j<=n} g^j``, to float rounding, on fp32 values. The recurrent step also takes one
position per row (a batch of prompts of different lengths decoding together).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchscale.architecture.config import RetNetConfig
from torchscale.architecture.retnet import DecoderLayer, RetNetDecoder, RetNetRelPos
from torchscale.component.multiscale_retention import MultiScaleRetention


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # torch.autocast rejects device types without autocast support (e.g. meta).
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _FP32RelPos(RetNetRelPos):
    """TorchScale's decay and rotary tables, pinned to fp32.

    Casting them to bf16 would round the decay of slow heads (1 - 2^-16) to 1.0 and quantise positions.
    """

    def __init__(self, args: RetNetConfig) -> None:
        super().__init__(args)
        self.args = args
        self._rebuild_tables(self.decay.device)

    def _rebuild_tables(self, device: torch.device) -> None:
        # TorchScale's own formula, evaluated on the CPU in fp32 whatever the ambient device/dtype.
        with torch.device("cpu"):
            fresh = RetNetRelPos(self.args)
        angle = fresh.angle
        inv_freq = getattr(self.args, "rotary_inv_freq", None)
        if inv_freq is not None:  # a teacher's table; TorchScale pairs dims (2i, 2i+1) with angle i
            angle = torch.tensor(inv_freq, dtype=torch.float32).repeat_interleave(2)
        self.register_buffer("angle", angle.to(device, torch.float32), persistent=False)
        self.register_buffer("decay", fresh.decay.to(device, torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)  # moves (and maybe casts, or empties) the buffers
        self._rebuild_tables(self.decay.device)
        return self

    def forward(self, slen: int, activate_recurrent: bool = False, chunkwise_recurrent: bool = False):
        with _autocast_off(self.decay.device):
            if chunkwise_recurrent and not activate_recurrent:  # not TorchScale's [H, C, C] chunk masks
                return self._rotary(0, slen), _Chunks(self.decay, self.recurrent_chunk_size)
            return super().forward(slen, activate_recurrent, chunkwise_recurrent)

    def recurrent_step(self, position: int | torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The tables for one token at ``position`` (an int, or one per row ``[B]``): rotary ``(sin, cos)``
        (``[dk]``, or ``[B, 1, 1, dk]`` to broadcast over heads) and the per-head decays ``[H]``."""
        if not isinstance(position, torch.Tensor):  # TorchScale's tables for the token at index slen - 1
            return self.forward(position + 1, activate_recurrent=True)
        with _autocast_off(self.decay.device):
            angles = position.to(self.decay.device, torch.float32)[:, None] * self.angle[None, :]
            rotary = (torch.sin(angles)[:, None, None, :], torch.cos(angles)[:, None, None, :])
            return rotary, self.decay.exp()

    def prompt_chunk(self, start: int, length: int) -> tuple[tuple[torch.Tensor, torch.Tensor], "_Chunks"]:
        """The retention's tables for tokens at positions ``start .. start + length - 1`` consumed after
        a recurrent state (``RetNetStudent.prefill``): rotary ``(sin, cos)`` ``[length, dk]`` and decays."""
        with _autocast_off(self.decay.device):
            return self._rotary(start, length), _Chunks(self.decay, length, start)

    def _rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(start, start + length, device=self.decay.device, dtype=torch.float32)
        angles = index[:, None] * self.angle[None, :]
        return torch.sin(angles), torch.cos(angles)


@dataclass
class _Chunks:
    """The retention's "mask" on the chunkwise and prompt paths: per-head log-decays ``[H]`` (fp32), tokens
    per chunk, and the position of the first token (after a recurrent state; 0 for a whole sequence)."""

    log_decay: torch.Tensor
    chunk_size: int
    start: int = 0
    # decay tables by chunk length, built by the first layer and reused by the others in this forward
    tables: dict[int, "_DecayTables"] = field(default_factory=dict)


class _Retention(MultiScaleRetention):
    """Multi-scale retention computing one function on all three paths (no row normaliser), with our own
    chunkwise path (also used by ``prefill``); optionally its own group-norm epsilon and q/k/v biases
    (``StudentConfig.group_norm_eps``, ``qkv_bias``)."""

    def __init__(self, args: RetNetConfig, embed_dim: int, value_dim: int, num_heads: int) -> None:
        super().__init__(args, embed_dim, value_dim, num_heads)
        group_norm_eps = getattr(args, "group_norm_eps", None)
        if group_norm_eps is not None:
            self.group_norm.eps = group_norm_eps
        if getattr(args, "qkv_bias", False):
            for name in ("q_proj", "k_proj", "v_proj"):
                linear = getattr(self, name)
                linear.bias = nn.Parameter(torch.zeros(linear.out_features))

    def parallel_forward(self, qr, kr, v, mask):
        """qr, kr: [B, H, L, dk] fp32 (rotated); v: [B, L, H*dv]; mask: [H, L, L] -> [B, L, H, dv].

        ``mask[n, m] = g^(n-m) / sqrt(S_n)`` with ``S_n = sum_{j<=n} g^j``: the recurrent path's own scale,
        so parallel, chunkwise and recurrent outputs are the same numbers (no row normaliser, see the
        module docstring)."""
        bsz, tgt_len, _ = v.size()
        vr = v.float().view(bsz, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        output = torch.matmul((qr @ kr.transpose(-1, -2)) * mask, vr).transpose(1, 2)
        return output.to(v.dtype)

    def recurrent_forward(self, qr, kr, v, decay, incremental_state):
        """One token per row: qr, kr [B, H, 1, dk]; v [B, 1, H*dv] -> [B, H, dv] in v's dtype.

        TorchScale's recurrence (``S_n = g S_(n-1) + 1``, state ``K_n / sqrt(S_n)``), written out so that
        the scale may be per row (``[B, H]``: prompts of different lengths decoding together) as well as
        shared (``[H]``); fp32 values keep the running state fp32 even in a bf16 model.
        """
        if isinstance(decay, _Chunks):  # a chunk of a prompt after the state (RetNetStudent.prefill)
            return self._chunks_forward(qr, kr, v, decay, incremental_state)
        bsz, heads, dk = v.size(0), self.num_heads, kr.size(-1)
        # [B*H, dv, 1] @ [B*H, 1, dk] products: two passes over the state per token (scale the old one,
        # add the new outer product in place) instead of six elementwise ones; decoding is bound by them
        values = v.float().view(bsz * heads, self.head_dim, 1)
        keys = kr.reshape(bsz * heads, 1, dk)
        overwrite = incremental_state.pop("overwrite", False)  # RetNetStudent.step(overwrite=True)
        if "prev_key_value" in incremental_state:
            prev_kv, prev_scale = incremental_state["prev_key_value"], incremental_state["scale"]
            scale = prev_scale * decay + 1
            keep = (prev_scale.sqrt() * decay / scale.sqrt()).expand(bsz, heads).reshape(-1, 1, 1)
            prev_kv = prev_kv.view(bsz * heads, self.head_dim, dk)
            # in place, the old state is given up: no fresh [B*H, dv, dk] buffer per layer and token (a
            # fresh one costs its page faults, 3-4x the product itself on the 2-core VM; RESULTS.md)
            kv = (prev_kv.mul_(keep) if overwrite else prev_kv * keep).baddbmm_(
                values / scale.sqrt().expand(bsz, heads).reshape(-1, 1, 1), keys)
        else:
            scale = torch.ones_like(decay)
            kv = torch.bmm(values, keys)
        kv = kv.view(bsz, heads, self.head_dim, dk)  # [B, H, dv, dk]
        incremental_state["prev_key_value"], incremental_state["scale"] = kv, scale
        output = torch.bmm(kv.view(bsz * heads, self.head_dim, dk), qr.reshape(bsz * heads, dk, 1))
        return output.view(bsz, heads, self.head_dim).to(v.dtype)

    def chunk_recurrent_forward(self, qr, kr, v, inner_mask):
        return self._chunks_forward(qr, kr, v, inner_mask, {})

    def _chunks_forward(self, qr: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, chunks: "_Chunks",
                        state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The chunkwise path: L tokens in chunks of ``chunks.chunk_size`` (the last may be shorter),
        each one :meth:`_chunk_step` after the state the earlier ones left in ``state`` (updated).
        qr, kr: [B, H, L, dk] (rotated); v: [B, L, H*dv] -> [B, L, H, dv] in v's dtype."""
        outputs, tables, begin = [], chunks.tables, 0
        # split, not slicing: the backward of each slice would write a zero-filled copy of the whole
        # [B, H, L, dk] input (O(L^2 / chunk) in all); split's backward concatenates once.
        size = chunks.chunk_size
        for q, k, values in zip(qr.split(size, dim=2), kr.split(size, dim=2), v.split(size, dim=1)):
            length = values.size(1)
            if length not in tables:  # the decay tables depend on the chunk's length, not its position
                tables[length] = _DecayTables.build(chunks.log_decay, length)
            outputs.append(self._chunk_step(q, k, values, tables[length], chunks.start + begin, state))
            begin += length
        return torch.cat(outputs, dim=1).to(v.dtype)

    def _chunk_step(self, qr: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, tables: "_DecayTables",
                    start: int, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """TorchScale's recurrence over C tokens at once: the outputs token-by-token ``recurrent_forward``
        gives at positions ``n = start .. start + C - 1``, and (in ``state``) its state after the last.

        That recurrence keeps ``S_n = sum_{j<=n} g^j`` and ``kv_n = K_n / sqrt(S_n)`` with the raw sum
        ``K_n = sum_{m<=n} g^(n-m) v_m k_m^T``; its output at ``n`` is ``q_n . kv_n``. Within a chunk,
        ``K_n = g^(i+1) K_(start-1) + sum_{j<=i} g^(i-j) v_j k_j^T`` (i = n - start), so a chunk costs
        one ``[C, C]`` decay-masked product per head plus one product with the incoming state.
        qr, kr: [B, H, C, dk]; v: [B, C, H*dv] -> [B, C, H, dv] fp32.
        """
        bsz, length, _ = v.size()
        with _autocast_off(v.device):
            qr, kr = qr.float(), kr.float()
            vr = v.float().view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, C, dv]
            root_scale = tables.root_scale(start)  # sqrt(S_n): [H, C, 1]
            output = ((qr @ kr.transpose(-1, -2)) * tables.inner) @ vr  # [B, H, C, dv]
            new_raw = (vr * tables.to_end).transpose(-1, -2) @ kr  # [B, H, dv, dk]
            if "prev_key_value" in state:  # [B, H, dv, dk]: K_(start-1) / sqrt(S_(start-1))
                previous = state["prev_key_value"] * state["scale"].sqrt().view(-1, 1, 1)
                output = output + tables.from_start * (qr @ previous.transpose(-1, -2))
                new_raw = new_raw + tables.whole * previous
            output = output / root_scale
            state["prev_key_value"] = new_raw / root_scale[:, -1:]
            state["scale"] = root_scale[:, -1, 0] ** 2
        return output.transpose(1, 2)


@dataclass
class _DecayTables:
    """The decay factors of one chunk of C tokens, per head (fp32; computed in float64)."""

    log_decay: torch.Tensor  # [H, 1] float64
    inner: torch.Tensor  # [H, C, C]: g^(i-j) for j <= i, else 0
    to_end: torch.Tensor  # [H, C, 1]: g^(C-1-j), token j's weight in the state after the chunk
    from_start: torch.Tensor  # [H, C, 1]: g^(i+1), the incoming state's weight at token i
    whole: torch.Tensor  # [H, 1, 1]: g^C

    @classmethod
    def build(cls, log_decay: torch.Tensor, length: int) -> "_DecayTables":
        log_g = log_decay.double()[:, None]  # [H, 1]
        offsets = torch.arange(length, device=log_decay.device, dtype=torch.float64)[None, :]  # [1, C]
        lag = offsets.T - offsets  # [C, C]: i - j
        inner = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_g[:, :, None]), 0.0)
        return cls(log_g, inner.float(), torch.exp((length - 1 - offsets) * log_g).float()[..., None],
                   torch.exp((offsets + 1) * log_g).float()[..., None], torch.exp(length * log_g).float()[..., None])

    def root_scale(self, start: int) -> torch.Tensor:
        """``sqrt(S_n)`` for the chunk's tokens ``n = start + i``: ``[H, C, 1]`` fp32, with
        ``S_n = (1 - g^(n+1)) / (1 - g)`` in float64 (slow heads far into a prompt)."""
        positions = start + torch.arange(self.inner.size(-1), device=self.log_decay.device, dtype=torch.float64)
        scale = torch.expm1((positions[None, :] + 1) * self.log_decay) / torch.expm1(self.log_decay)
        return scale.sqrt().float()[..., None]


class _Layer(DecoderLayer):
    gradient_checkpointing = False

    def build_retention(self, embed_dim, args):
        return _Retention(args, embed_dim, args.decoder_value_embed_dim, args.decoder_retention_heads)

    def forward(self, x, incremental_state=None, chunkwise_recurrent=False, retention_rel_pos=None):
        if self.gradient_checkpointing and self.training and incremental_state is None and torch.is_grad_enabled():
            return checkpoint(super().forward, x, None, chunkwise_recurrent, retention_rel_pos, use_reentrant=False)
        return super().forward(x, incremental_state, chunkwise_recurrent, retention_rel_pos)


class Decoder(RetNetDecoder):
    def __init__(self, args: RetNetConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__(args, embed_tokens=embed_tokens)
        self.retnet_rel_pos = _FP32RelPos(args)
        # TorchScale pads a chunkwise batch to whole chunks for its own kernel; ours takes a shorter last
        # chunk (the tables keep the real chunk size), so no padding.
        self.recurrent_chunk_size = 1

    def build_decoder_layer(self, args, depth, is_moe_layer=False):
        return _Layer(args, depth, is_moe_layer=is_moe_layer)
