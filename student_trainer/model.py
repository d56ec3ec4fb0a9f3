"""The RetNet student: TorchScale 0.3.0's ``RetNetDecoder`` with the fixes of DESIGN.md section 6.

What is patched (by subclassing; TorchScale's own code does the rest):

- One retention function, three ways to compute it: parallel (O(L^2) per layer), chunkwise (our own,
  O(L * chunk)) and recurrent (O(1) per token) all compute TorchScale's recurrent form
  ``o_n = sum_{m<=n} g^(n-m) (q_n . k_m) v_m / sqrt(S_n)``, ``S_n = sum_{j<=n} g^j``, to float rounding.
  TorchScale 0.3.0 (and upstream's later ``abs().sum().clamp(1, 5e4)`` fix) divides each parallel row
  by its |q k^T| sum and each chunkwise row by another bound, on the grounds that the group norm removes
  any per-row factor; it does only up to its epsilon, and the three paths then disagree (0.19 nats
  between chunkwise and parallel on a random-init tiny student, benchmarks/RESULTS.md). Every path here
  runs on fp32 values, so the normaliser's one job (keeping fp16 finite) does not arise.
- All three retention paths run on fp32 values and return the value dtype, so the recurrent state is
  fp32 and a bf16-cast model (not only autocast) runs.
- ``_FP32RelPos``: the decay/rotary tables stay fp32 whatever the model is cast to, are rebuilt after
  every ``.to()``/``to_empty()``, are not saved (they follow from the config), and are computed with
  autocast off.
- The path is chosen by length: batches of at least ``chunkwise_min_length`` tokens run chunkwise,
  shorter ones in parallel (faster when short).
- Decoding does not use ``RetNetDecoder.forward`` (its token-by-token ``is_first_step`` path crashes and
  it pads single tokens to a chunk when chunkwise is on): ``prefill`` builds the recurrent state chunk by
  chunk (the chunkwise path continued from a state: memory O(chunk^2 + state) at any prompt length)
  and ``step`` drives the layers with TorchScale's recurrent retention.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchscale.architecture.config import RetNetConfig
from torchscale.architecture.retnet import DecoderLayer, RetNetDecoder, RetNetRelPos
from torchscale.component.multiscale_retention import MultiScaleRetention

from shared.files import fsync_path
from student_trainer.model_config import PRESET_PARAM_COUNTS, PRESETS, StudentConfig, count_parameters

__all__ = ["PRESETS", "PRESET_PARAM_COUNTS", "RecurrentState", "RetNetStudent", "StudentConfig",
           "count_parameters", "sample_next_token", "split_params_for_muon"]

FORMAT_NAME = "retnet-student"
FORMAT_VERSION = 1
EMBED_KEY = "decoder.embed_tokens.weight"
HEAD_KEY = "decoder.output_projection.weight"


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
        if isinstance(decay, _Chunks):  # a chunk of a prompt after the state (RetNetStudent.prefill)
            return self._chunks_forward(qr, kr, v, decay, incremental_state)
        # fp32 values keep the running state fp32 even in a bf16 model.
        return super().recurrent_forward(qr, kr, v.float(), decay, incremental_state).to(v.dtype)

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


class _Decoder(RetNetDecoder):
    def __init__(self, args: RetNetConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__(args, embed_tokens=embed_tokens)
        self.retnet_rel_pos = _FP32RelPos(args)
        # TorchScale pads a chunkwise batch to whole chunks for its own kernel; ours takes a shorter last
        # chunk (the tables keep the real chunk size), so no padding.
        self.recurrent_chunk_size = 1

    def build_decoder_layer(self, args, depth, is_moe_layer=False):
        return _Layer(args, depth, is_moe_layer=is_moe_layer)


@dataclass
class RecurrentState:
    """O(1) decoding state: ``position`` tokens consumed, and per layer TorchScale's incremental state
    ``{"prev_key_value": [B, H, dv_head, dk_head] fp32, "scale": [H] fp32}`` (empty dicts before the
    first token)."""

    position: int
    layers: list[dict[str, torch.Tensor]]


class RetNetStudent(nn.Module):
    """A RetNet language model: ids ``[B, L]`` -> logits ``[B, L, V]``, with O(1)-state decoding.

    Keep the weights fp32 and train under ``torch.autocast(dtype=torch.bfloat16)``.
    """

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        args = RetNetConfig(
            vocab_size=config.vocab_size,
            decoder_embed_dim=config.d_model,
            decoder_value_embed_dim=config.value_dim,
            decoder_retention_heads=config.n_heads,
            decoder_ffn_embed_dim=config.ffn_dim,
            decoder_layers=config.n_layers,
            activation_fn="swish",  # GLU + swish = SwiGLU feed-forward
            dropout=config.dropout,
            activation_dropout=config.activation_dropout,
            share_decoder_input_output_embed=config.tie_embeddings,
            chunkwise_recurrent=config.chunkwise_recurrent,
            recurrent_chunk_size=config.recurrent_chunk_size,
            layernorm_eps=config.layernorm_eps,
            no_scale_embedding=True,
            max_target_positions=config.max_seq_len,
        )
        # Read by our subclasses (_Retention, _FP32RelPos); TorchScale's config has no such fields.
        args.group_norm_eps = config.group_norm_eps
        args.rotary_inv_freq = config.rotary_inv_freq
        args.qkv_bias = config.qkv_bias
        embed = nn.Embedding(config.vocab_size, config.d_model)
        # N(0, d^-0.5): tied with the head, this starts near log(V) loss (N(0, 1) starts at ~500).
        nn.init.normal_(embed.weight, mean=0.0, std=config.d_model**-0.5)
        self.decoder = _Decoder(args, embed)
        for layer in self.decoder.layers:
            layer.gradient_checkpointing = config.gradient_checkpointing

    # ----- parameters -------------------------------------------------------------------------------

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def output_projection(self) -> nn.Linear:
        """The LM head ``[V, d]``; its weight *is* ``embed_tokens.weight`` when tied."""
        return self.decoder.output_projection

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    # ----- training / scoring -----------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, chunkwise: bool | None = None) -> torch.Tensor:
        """Final normed hidden states ``[B, L, d]`` for ids ``[B, L]`` (before the LM head).

        ``chunkwise`` picks the retention path for this call; None: the config's choice for this length
        (:meth:`StudentConfig.uses_chunkwise`).
        """
        _check_ids(input_ids, 2, "input_ids", "[B, L]")
        if chunkwise is None:
            chunkwise = self.config.uses_chunkwise(input_ids.size(1))
        with self._chunkwise(chunkwise):
            hidden, _ = self.decoder(input_ids, features_only=True)
        return hidden

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: ``hidden [..., d] @ W^T -> [..., V]`` (``W`` is the embedding when tied).

        Losses over a large vocabulary call this on row chunks of ``hidden_states``.
        """
        return F.linear(hidden, self.output_projection.weight)

    def forward(self, input_ids: torch.Tensor, chunkwise: bool | None = None) -> torch.Tensor:
        """Logits ``[B, L, V]`` for ids ``[B, L]``; ``logits[:, t]`` predicts the token after ``t``."""
        return self.logits_from_hidden(self.hidden_states(input_ids, chunkwise))

    @contextlib.contextmanager
    def _chunkwise(self, chunkwise: bool | None) -> Iterator[None]:
        saved = self.decoder.chunkwise_recurrent
        if chunkwise is not None:
            self.decoder.chunkwise_recurrent = chunkwise
        try:
            yield
        finally:
            self.decoder.chunkwise_recurrent = saved

    # ----- recurrent decoding -----------------------------------------------------------------------

    def new_state(self) -> RecurrentState:
        """An empty decoding state (no tokens consumed)."""
        return RecurrentState(position=0, layers=[{} for _ in self.decoder.layers])

    def prefill(self, input_ids: torch.Tensor, state: RecurrentState | None = None,
                chunk_size: int | None = None) -> tuple[torch.Tensor, RecurrentState]:
        """Consume a prompt ``[B, L]`` chunk by chunk: logits of its last position ``[B, V]`` and the
        recurrent state after it (all rows share the length L; there is no padding mask).

        ``state``: continue from this state (e.g. a chat's earlier turns; it is not modified); None:
        from an empty one. ``chunk_size``: tokens per chunk (None: the config's ``recurrent_chunk_size``);
        memory is O(chunk^2 + state) whatever L, and the result equals token-by-token :meth:`step`.
        """
        _check_ids(input_ids, 2, "input_ids", "[B, L]")
        _check_range(input_ids, self.config.vocab_size)
        chunk_size = chunk_size or self.config.recurrent_chunk_size
        if chunk_size < 1:
            raise ValueError(f"prefill: chunk_size must be >= 1, found {chunk_size}.")
        state = state or self.new_state()
        self._check_state(state, input_ids.size(0))
        for start in range(0, input_ids.size(1), chunk_size):
            hidden, state = self._consume(input_ids[:, start:start + chunk_size], state)
        return self.logits_from_hidden(hidden[:, -1]), state

    def _consume(self, chunk_ids: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """``chunk_ids [B, C]`` after ``state`` -> final normed hidden states ``[B, C, d]`` and the new state."""
        x, _ = self.decoder.forward_embedding(chunk_ids)
        rel_pos = self.decoder.retnet_rel_pos.prompt_chunk(state.position, chunk_ids.size(1))
        layers = [dict(layer_state) for layer_state in state.layers]
        for layer, layer_state in zip(self.decoder.layers, layers):
            x, _ = layer(x, layer_state, retention_rel_pos=rel_pos, chunkwise_recurrent=False)
        if self.decoder.layer_norm is not None:
            x = self.decoder.layer_norm(x)
        return x, RecurrentState(state.position + chunk_ids.size(1), layers)

    def _check_state(self, state: RecurrentState, batch_size: int) -> None:
        if len(state.layers) != len(self.decoder.layers):
            raise ValueError(f"state has {len(state.layers)} layers, the model {len(self.decoder.layers)}; "
                             "use model.new_state() or model.prefill(...) to make one.")
        kv = state.layers[0].get("prev_key_value")
        if kv is not None and kv.size(0) != batch_size:
            raise ValueError(f"the input has batch size {batch_size}, the state {kv.size(0)}.")

    def step(self, token_ids: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """Feed one token per row ``[B]``: logits ``[B, V]`` for the next token and the new state.

        The given state is not modified (the new one shares no mutable containers with it).
        """
        _check_ids(token_ids, 1, "token_ids", "[B]")
        self._check_state(state, token_ids.size(0))
        x, _ = self.decoder.forward_embedding(token_ids[:, None])
        # TorchScale's recurrent tables for the token at index `position` (it takes slen - 1).
        rel_pos = self.decoder.retnet_rel_pos(state.position + 1, activate_recurrent=True)
        layers = [dict(layer_state) for layer_state in state.layers]
        for layer, layer_state in zip(self.decoder.layers, layers):
            x, _ = layer(x, layer_state, retention_rel_pos=rel_pos, chunkwise_recurrent=False)
        if self.decoder.layer_norm is not None:
            x = self.decoder.layer_norm(x)
        return self.logits_from_hidden(x[:, 0]), RecurrentState(state.position + 1, layers)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield new tokens ``[B]`` one at a time, decoding through the recurrent state.

        ``input_ids`` is ``[B, L]`` (or ``[L]``). Rows that produced ``eos_id`` keep yielding it; the
        generator stops early once every row has. Call ``eval()`` first if the model has dropout.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if not greedy and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"generate: sampling needs temperature > 0 and 0 < top_p <= 1, found "
                             f"temperature={temperature}, top_p={top_p}; use greedy=True for argmax decoding.")
        logits, state = self.prefill(input_ids)
        finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                token = sample_next_token(logits, temperature, top_p, generator)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            yield token
            if i == max_new_tokens - 1 or bool(finished.all()):
                return
            logits, state = self.step(token, state)

    # ----- persistence ------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (tied weights once) atomically to ``directory``.

        Files go to a temporary sibling first, which then replaces ``directory`` by a rename.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                    "num_parameters": self.num_parameters(), "config": self.config.to_dict()}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()
                     if not (self.config.tie_embeddings and name == HEAD_KEY)}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            for path in (tmp / "config.json", tmp / "model.safetensors", tmp):
                fsync_path(path)
            old = None
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
                os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            fsync_path(directory.parent)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "RetNetStudent":
        """Load a directory written by :meth:`save` (fp32 weights on ``device``)."""
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: expected a directory written by RetNetStudent.save.")
        meta = json.loads(config_path.read_text())
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, found "
                             f"{meta.get('format')!r} version {meta.get('format_version')!r}.")
        config = StudentConfig.from_dict(meta["config"])
        with torch.device(device):
            model = cls(config)
        state = load_file(str(directory / "model.safetensors"), device=str(device))
        if config.tie_embeddings and EMBED_KEY in state:
            state[HEAD_KEY] = state[EMBED_KEY]
        model.load_state_dict(state, strict=True)
        return model


def split_params_for_muon(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (Muon, AdamW) lists of ``(name, parameter)``.

    Muon gets the 2-D matrices inside the RetNet blocks (q/k/v/g/out projections, SwiGLU fc1/gate/fc2).
    AdamW gets everything else: the embedding (= tied head), an untied head, norms, biases. Works on
    wrapped models too (DDP ``module.``, ``torch.compile`` ``_orig_mod.`` prefixes). Each parameter
    appears once.
    """
    muon, adamw = [], []
    for name, param in model.named_parameters():  # deduplicates the tied embedding/head
        if not param.requires_grad:
            continue
        in_block = "decoder.layers." in name
        (muon if in_block and param.ndim == 2 else adamw).append((name, param))
    return muon, adamw


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ids ``[B]`` from logits ``[B, V]`` at ``temperature`` with nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token is always kept).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_ids(ids: torch.Tensor, ndim: int, name: str, shape: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != ndim or ids.dtype not in (torch.int64, torch.int32):
        found = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an int64/int32 tensor of shape {shape}, found {found}.")
    if ids.numel() == 0:
        raise ValueError(f"{name} must not be empty, found shape {tuple(ids.shape)}.")


def _check_range(ids: torch.Tensor, vocab_size: int) -> None:
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), found ids in [{low}, {high}]; "
                         "does the tokenizer match the student's vocab_size?")

