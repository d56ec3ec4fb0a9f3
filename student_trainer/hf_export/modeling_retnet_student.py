"""A RetNet student as a Hugging Face causal LM, in plain torch (written by ``retnet-distill export``).

It computes what ``student_trainer.model.student.RetNetStudent`` computes (TorchScale 0.3.0's RetNet decoder with
the project's fixes), without TorchScale: per layer ``x + retention(rms(x))`` then ``x + swiglu(rms(x))``,
a final RMSNorm and the LM head. Retention is ``o_n = sum_{m<=n} g^(n-m) (q_n . k_m) v_m / sqrt(S_n)``
with ``S_n = sum_{j<=n} g^j``, rotary-shifted q/k in TorchScale's interleaved layout, a per-head RMS group
norm and a swish output gate. Inputs are scored block by block (``config.chunk_size`` tokens, exact), and
``generate()`` keeps the recurrent state as its cache (``cache_params``): the prompt is consumed in
blocks, then one O(1) recurrent step per token, so memory does not grow with the context.

This file imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_retnet_student import RetNetStudentConfig


class RetNetStudentCache:
    """The recurrent state after ``position`` tokens: per layer ``kv [B, H, dv, dk]`` (fp32, the decayed sum
    of ``v k^T`` divided by ``sqrt(S)``) and ``scale [H]`` (``S`` of the last position); its size does not
    depend on how many tokens it has consumed."""

    def __init__(self, num_layers: int) -> None:
        self.position = 0
        self.kv: list[torch.Tensor | None] = [None] * num_layers
        self.scale: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position


@dataclass
class RetNetStudentCausalLMOutput(ModelOutput):
    """``logits [B, L, V]`` (the last ``logits_to_keep`` positions when set), the recurrent state when
    ``use_cache``, the mean next-token loss when ``labels`` were given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache_params: RetNetStudentCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RetNetStudentRMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in fp32 (no weight for the group norm)."""

    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.weight is None else y * self.weight


def rotate_pairs(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary shift of ``x [B, H, L, dk]`` with dims ``(2i, 2i+1)`` as one pair (``sin, cos [L, dk]``)."""
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class RetNetStudentRetention(nn.Module):
    """Multi-scale retention: ``[B, L, d] -> [B, L, d]``, from a state or none."""

    def __init__(self, config: RetNetStudentConfig) -> None:
        super().__init__()
        d, dv, self.num_heads = config.hidden_size, config.value_dim, config.num_heads
        self.key_dim, self.head_dim = d // self.num_heads, dv // self.num_heads
        self.q_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, dv, bias=config.qkv_bias)
        self.g_proj = nn.Linear(d, dv, bias=False)
        self.out_proj = nn.Linear(dv, d, bias=False)
        self.group_norm = RetNetStudentRMSNorm(self.head_dim, config.group_norm_eps, affine=False)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, log_decay: torch.Tensor,
                cache: RetNetStudentCache | None, layer: int) -> torch.Tensor:
        """``x [B, L, d]`` at positions ``cache.position ..`` (0 without a cache); the layer's state in
        ``cache`` is read and replaced. ``sin, cos [L, dk]``; ``log_decay [H]`` (fp32 log g)."""
        bsz, length, _ = x.shape
        q = self.q_proj(x).view(bsz, length, self.num_heads, self.key_dim).transpose(1, 2)
        k = (self.k_proj(x) * self.key_dim ** -0.5).view(bsz, length, self.num_heads, self.key_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = rotate_pairs(q, sin, cos).float(), rotate_pairs(k, sin, cos).float(), v.float()
        if cache is None:
            out, _, _ = retain_block(q, k, v, log_decay, 0, None, None)
        elif length == 1 and cache.kv[layer] is not None:
            out, cache.kv[layer], cache.scale[layer] = retain_step(q, k, v, log_decay, cache.kv[layer], cache.scale[layer])
        else:
            out, cache.kv[layer], cache.scale[layer] = retain_block(q, k, v, log_decay, cache.position,
                                                                    cache.kv[layer], cache.scale[layer])
        out = self.group_norm(out.to(x.dtype).transpose(1, 2)).reshape(bsz, length, -1)  # [B, L, H * dv]
        return self.out_proj(F.silu(self.g_proj(x)) * out)


def retain_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, start: int,
                 kv: torch.Tensor | None, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Retention over a block of C tokens at positions ``start .. start + C - 1`` after a state (or none).

    q, k ``[B, H, C, dk]``, v ``[B, H, C, dv]`` fp32 -> outputs ``[B, H, C, dv]`` and the state after the
    block (``kv [B, H, dv, dk]``, ``scale [H]``). Within the block: ``(q k^T * D) v`` with the causal decay
    matrix ``D[i, j] = g^(i-j)``; the incoming raw state ``K = kv * sqrt(scale)`` adds ``g^(i+1) q K^T``;
    every output is divided by ``sqrt(S_n)``, ``S_n = (1 - g^(n+1)) / (1 - g)``. Decay tables in float64.
    """
    length = q.size(2)
    log_g = log_decay.double()[:, None]  # [H, 1]
    offsets = torch.arange(length, device=q.device, dtype=torch.float64)[None, :]  # [1, C]
    lag = offsets.T - offsets  # [C, C]: i - j
    inner = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_g[:, :, None]), 0.0).float()  # [H, C, C]
    positions = start + offsets  # [1, C]
    root_scale = (torch.expm1((positions + 1) * log_g) / torch.expm1(log_g)).sqrt().float()[..., None]  # [H, C, 1]
    out = ((q @ k.transpose(-1, -2)) * inner) @ v  # [B, H, C, dv]
    raw = (v * torch.exp((length - 1 - offsets) * log_g).float()[..., None]).transpose(-1, -2) @ k  # [B, H, dv, dk]
    if kv is not None:
        previous = kv * scale.sqrt().view(-1, 1, 1)
        out = out + torch.exp((offsets + 1) * log_g).float()[..., None] * (q @ previous.transpose(-1, -2))
        raw = raw + torch.exp(length * log_g).float()[..., None] * previous
    return out / root_scale, raw / root_scale[:, -1:], root_scale[:, -1, 0] ** 2


def retain_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, kv: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token after a state: q, k ``[B, H, 1, dk]``, v ``[B, H, 1, dv]`` -> output ``[B, H, 1, dv]`` and the
    new state: ``S' = g S + 1``, ``kv' = kv sqrt(S) g / sqrt(S') + v k^T / sqrt(S')``, output ``q . kv'``."""
    decay = log_decay.exp()  # [H]
    new_scale = scale * decay + 1
    root = new_scale.sqrt()[:, None, None]
    # two passes over the state (scale it, add v k^T in place) and one product for the output: decoding
    # is bound by these passes, not by the arithmetic
    new_kv = (kv * ((scale.sqrt() * decay)[:, None, None] / root)).add_(v.transpose(-1, -2) / root @ k)  # [B, H, dv, dk]
    return q @ new_kv.transpose(-1, -2), new_kv, new_scale  # output [B, H, 1, dv]


class RetNetStudentFeedForward(nn.Module):
    """SwiGLU: ``fc2(silu(fc1 x) * gate x)``."""

    def __init__(self, config: RetNetStudentConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.silu(h.float()).type_as(h) * self.gate(x))


class RetNetStudentLayer(nn.Module):
    def __init__(self, config: RetNetStudentConfig) -> None:
        super().__init__()
        self.retention_norm = RetNetStudentRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.retention = RetNetStudentRetention(config)
        self.ffn_norm = RetNetStudentRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = RetNetStudentFeedForward(config)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, log_decay: torch.Tensor,
                cache: RetNetStudentCache | None, layer: int) -> torch.Tensor:
        x = x + self.retention(self.retention_norm(x), sin, cos, log_decay, cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class RetNetStudentPreTrainedModel(PreTrainedModel):
    config_class = RetNetStudentConfig
    base_model_prefix = "model"
    _no_split_modules = ["RetNetStudentLayer"]
    _is_stateful = True  # the cache is a recurrent state, not per-token keys/values

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the model brings its own state


class RetNetStudentModel(RetNetStudentPreTrainedModel):
    """Embedding, RetNet layers and the final norm: ids ``[B, L]`` -> hidden states ``[B, L, d]``."""

    def __init__(self, config: RetNetStudentConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RetNetStudentLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RetNetStudentRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _tables(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary ``sin, cos [length, dk]`` for positions ``start ..`` and the per-head log-decays ``[H]``, fp32."""
        config = self.config
        heads, key_dim = config.num_heads, config.hidden_size // config.num_heads
        with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
            if config.rotary_inv_freq is not None:
                angle = torch.tensor(config.rotary_inv_freq, dtype=torch.float32, device=device)
            else:
                angle = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2, dtype=torch.float32, device=device))
            angle = angle.repeat_interleave(2)
            log_decay = torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float32, device=device)))
            angles = torch.arange(start, start + length, dtype=torch.float32, device=device)[:, None] * angle[None, :]
            return torch.sin(angles), torch.cos(angles), log_decay

    def forward(self, input_ids: torch.Tensor, cache_params: RetNetStudentCache | None = None) -> torch.Tensor:
        """``input_ids [B, L]`` after ``cache_params`` (updated in place; None: from position 0, no state kept)
        -> final normed hidden states ``[B, L, d]``. Inputs longer than ``config.chunk_size`` run block by
        block through the state (memory O(L * chunk)); one token after a state is one recurrent step."""
        length = input_ids.size(1)
        cache = cache_params
        if cache is None and length > self.config.chunk_size:  # a state carried between blocks, then dropped
            cache = RetNetStudentCache(len(self.layers))
        step = cache is not None and length == 1 and cache.kv[0] is not None
        block = 1 if step else self.config.chunk_size
        x, outputs = self.embed_tokens(input_ids), []
        for offset in range(0, length, block):
            h = x[:, offset:offset + block]
            start = cache.position if cache is not None else 0
            sin, cos, log_decay = self._tables(start, h.size(1), h.device)
            for index, layer in enumerate(self.layers):
                h = layer(h, sin, cos, log_decay, cache, index)
            if cache is not None:
                cache.position += h.size(1)
            outputs.append(self.norm(h))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class RetNetStudentForCausalLM(RetNetStudentPreTrainedModel, GenerationMixin):
    """The language model: ids ``[B, L]`` -> logits ``[B, L, V]``; ``generate()`` decodes from the recurrent
    state (``cache_params``). No padding mask: RetNet has none, so a batch must hold prompts of one length
    (an ``attention_mask`` with zeros is refused)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetStudentConfig) -> None:
        super().__init__(config)
        self.model = RetNetStudentModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> "RetNetStudentForCausalLM":
        """Transformers' loader, after checking that a local export folder has its weights and config."""
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir():
            missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder} is an incomplete RetNet student export: {', '.join(missing)} missing; "
                                        f"write it again with `retnet-distill export CHECKPOINT {folder} --force`")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache_params: RetNetStudentCache | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> RetNetStudentCausalLMOutput | tuple:
        """Logits ``[B, L, V]`` for ``input_ids [B, L]`` (consumed after ``cache_params`` when given).

        ``use_cache``: return the state after the input (a new one when ``cache_params`` is None).
        ``labels [B, L]``: mean cross-entropy of each next token (-100 ignored).
        ``logits_to_keep``: only the last N positions' logits (0: all).
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("RetNetStudentForCausalLM takes input_ids only (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("RetNetStudentForCausalLM has no padding mask (RetNet has none): found an attention_mask "
                             "with zeros; pass prompts of one length per batch, or one prompt at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache_params is None:
            cache_params = RetNetStudentCache(self.config.num_hidden_layers)
        hidden = self.model(input_ids, cache_params)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        output = RetNetStudentCausalLMOutput(loss=loss, logits=logits, cache_params=cache_params if use_cache else None)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache_params: RetNetStudentCache | None = None,
                                      use_cache: bool | None = None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        """The prompt on the first call (it builds the state); afterwards only the newest token and the state."""
        if inputs_embeds is not None:
            raise ValueError("RetNetStudentForCausalLM.generate takes input_ids only (inputs_embeds is not supported)")
        if cache_params is not None and use_cache is not False:
            input_ids, attention_mask = input_ids[:, -1:], None
        inputs = {"input_ids": input_ids.contiguous(), "cache_params": cache_params, "use_cache": use_cache,
                  "attention_mask": attention_mask}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict[str, Any],
                                            is_encoder_decoder: bool = False, num_new_tokens: int = 1) -> dict[str, Any]:
        # our cache has its own name: carry it to the next step
        model_kwargs["cache_params"] = outputs.get("cache_params")
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)
