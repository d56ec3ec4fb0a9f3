"""Teacher weights -> a RetNet student of the teacher's shape (DESIGN.md section 14).

A Llama-family causal LM (Llama, SmolLM2, Mistral, Qwen2: RMSNorm, SwiGLU, RoPE, GQA) maps onto a
:class:`RetNetStudent` exactly up to the token mixer:

- embeddings, the final norm and both per-layer RMSNorms are copied (with the teacher's epsilon);
- ``gate_proj / up_proj / down_proj`` -> TorchScale's GLU ``fc1 / gate / fc2`` (it computes
  ``fc2(silu(fc1 x) * gate x)``, Llama ``down(silu(gate x) * up x)``);
- ``q_proj``: each head's rows permuted from Llama's rotate-half layout (dim ``i`` pairs with
  ``i + dk/2``) to TorchScale's interleaved one (dim ``2i`` pairs with ``2i + 1``); ``k_proj`` the same
  after the GQA expansion from the KV heads to all heads; ``v_proj`` expanded; ``o_proj -> out_proj``;
- the rotary frequencies are the teacher's own (``rotary_inv_freq``, rope scaling included); the key
  scale ``dk^-0.5`` is the same on both sides.

What the teacher does not have is learned: the retention decay replaces softmax, and the swish output
gate ``g_proj`` (no bias) starts from a closed-form fit (:func:`init_output_gates`). Then stage 1
(:mod:`student_trainer.training.attention_transfer`) trains the retention projections to reproduce each
layer's attention output.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.model.student import RetNetStudent, StudentConfig

log = logging.getLogger(__name__)

DEFAULT_GROUP_NORM_EPS = 1e-8  # DESIGN.md section 14: 1e-5 lets parallel and recurrent paths disagree by 0.87
SWISH_MIN = -0.2784645  # min of x * sigmoid(x), reached at x = -1.2784645
SWISH_ARGMIN = -1.2784645


class RetrofitError(ValueError):
    """A teacher or setting that cannot be retrofitted; the message names what is missing or wrong."""


# ----------------------------------------------------------------------------------------- checks


def teacher_backbone(teacher_lm: nn.Module) -> nn.Module:
    """The decoder stack of a HF causal LM (``model.model`` for Llama-family classes)."""
    backbone = getattr(teacher_lm, "model", None)
    if backbone is None or not hasattr(backbone, "layers"):
        raise RetrofitError(f"{type(teacher_lm).__name__} has no .model.layers decoder stack; expected a Hugging "
                            "Face Llama-family causal LM (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, ...)")
    return backbone


def check_teacher(teacher_lm: nn.Module) -> None:
    """Refuse a teacher that the exact mapping cannot express, naming each missing piece.

    Raises:
        RetrofitError: with every problem found (not only the first).
    """
    backbone = teacher_backbone(teacher_lm)
    config = teacher_lm.config
    problems: list[str] = []
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        problems.append(f"heads x head_dim = {heads} x {head_dim} != hidden_size {hidden} (RetNet's query/key "
                        "width is the model width)")
    if head_dim % 2:
        problems.append(f"odd head_dim {head_dim} (rotary rotates pairs of dims)")
    act = getattr(config, "hidden_act", None)
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act {act!r} (the student's feed-forward is SwiGLU: silu)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (the student's feed-forward has no biases)")
    layer = backbone.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj")),
                         (layer, ("input_layernorm", "post_attention_layernorm"))):
        for name in names:
            if owner is None or not hasattr(owner, name):
                problems.append(f"no layer module {name}")
    if attn is not None:
        for extra in ("q_norm", "k_norm"):
            if hasattr(attn, extra):
                problems.append(f"per-head {extra} (Qwen3-style query/key norms have no RetNet counterpart yet)")
        o_proj = getattr(attn, "o_proj", None)
        if o_proj is not None and getattr(o_proj, "bias", None) is not None:
            problems.append("a bias on o_proj (the student's out_proj has none)")
    norm = getattr(backbone, "norm", None)
    if norm is None or not hasattr(norm, "weight") or getattr(norm, "bias", None) is not None:
        problems.append("no final RMSNorm (weight only) at model.norm")
    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        problems.append("no rotary embedding with inv_freq at model.rotary_emb")
    elif float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        problems.append(f"rotary attention_scaling {rotary.attention_scaling} (YaRN-style scaled cos/sin are not supported)")
    if problems:
        raise RetrofitError(f"cannot retrofit {type(teacher_lm).__name__} (model_type "
                            f"{getattr(config, 'model_type', '?')!r}) into a RetNet student: "
                            + "; ".join(problems) + ". Supported: Llama-family causal LMs with RMSNorm, SwiGLU, "
                            "RoPE and (grouped-query) attention, e.g. Llama, SmolLM2, Mistral, Qwen2.")


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """The teacher layers the student keeps, in order (``None``: all ``depth`` of them).

    Raises:
        RetrofitError: an index outside ``[0, depth)``, a repeated or unsorted list, or an empty one.
    """
    if layers is None:
        return list(range(depth))
    chosen = [int(i) for i in layers]
    if not chosen:
        raise RetrofitError("retrofit_layers is empty; list the teacher layers to keep, e.g. [0, 2, 4] or null for all")
    outside = [i for i in chosen if not 0 <= i < depth]
    if outside:
        raise RetrofitError(f"retrofit_layers {outside} outside the teacher's {depth} layers (valid: 0..{depth - 1})")
    if chosen != sorted(set(chosen)):
        raise RetrofitError(f"retrofit_layers must be strictly increasing without repeats, found {chosen}")
    return chosen


# ----------------------------------------------------------------------------------------- mapping


def student_config_for(teacher_lm: nn.Module, layers: Sequence[int] | None = None,
                       group_norm_eps: float = DEFAULT_GROUP_NORM_EPS, **overrides: Any) -> StudentConfig:
    """The :class:`StudentConfig` of a student with the teacher's shape (``overrides``: e.g.
    ``max_seq_len``, ``chunkwise_recurrent``, ``gradient_checkpointing``; shape fields are refused)."""
    check_teacher(teacher_lm)
    config = teacher_lm.config
    backbone = teacher_backbone(teacher_lm)
    shape = {"vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "value_dim", "tie_embeddings",
             "layernorm_eps", "rotary_inv_freq", "qkv_bias"}
    clash = sorted(shape & set(overrides))
    if clash:
        raise RetrofitError(f"a retrofitted student has its teacher's shape; {clash} cannot be set (drop them, or "
                            "use student_init=random for a student of another shape)")
    chosen = resolve_layers(layers, len(backbone.layers))
    q_proj = backbone.layers[0].self_attn.q_proj
    return StudentConfig(
        vocab_size=backbone.embed_tokens.weight.shape[0], d_model=config.hidden_size, n_layers=len(chosen),
        n_heads=config.num_attention_heads, ffn_dim=config.intermediate_size, value_dim=config.hidden_size,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)), layernorm_eps=float(config.rms_norm_eps),
        group_norm_eps=group_norm_eps, rotary_inv_freq=backbone.rotary_emb.inv_freq.float().tolist(),
        qkv_bias=q_proj.bias is not None, **overrides,
    )


def rotate_half_to_interleaved(head_dim: int) -> torch.Tensor:
    """Row order ``[head_dim]`` that turns Llama's rotate-half layout into TorchScale's interleaved one:
    new row ``2i`` is old row ``i``, new row ``2i + 1`` is old row ``i + head_dim / 2``."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


def _heads(weight: torch.Tensor, kv_heads: int, heads: int, head_dim: int, permute: bool) -> torch.Tensor:
    """``[kv_heads * head_dim, ...]`` rows -> ``[heads * head_dim, ...]``: GQA-expanded, rotary-permuted."""
    rows = weight.reshape(kv_heads, head_dim, *weight.shape[1:])
    rows = rows.repeat_interleave(heads // kv_heads, dim=0)
    if permute:
        rows = rows[:, rotate_half_to_interleaved(head_dim)]
    return rows.reshape(heads * head_dim, *weight.shape[1:])


@torch.no_grad()
def copy_teacher_weights(student: RetNetStudent, teacher_lm: nn.Module, layers: Sequence[int] | None = None) -> None:
    """Copy every weight the mapping defines from ``teacher_lm`` into ``student`` (in place).

    ``g_proj`` keeps its initialisation (see :func:`init_output_gates`).
    """
    backbone = teacher_backbone(teacher_lm)
    config = teacher_lm.config
    chosen = resolve_layers(layers, len(backbone.layers))
    if len(chosen) != len(student.decoder.layers):
        raise RetrofitError(f"the student has {len(student.decoder.layers)} layers but {len(chosen)} teacher layers "
                            "were chosen; build it with student_config_for(teacher, layers)")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // heads

    def put(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
        if target.shape != source.shape:
            raise RetrofitError(f"{name}: the student's shape {tuple(target.shape)} does not match the teacher's "
                                f"{tuple(source.shape)}")
        target.copy_(source.to(target.dtype))

    put(student.embed_tokens.weight, backbone.embed_tokens.weight, "embed_tokens")
    if not student.config.tie_embeddings:
        put(student.output_projection.weight, teacher_lm.get_output_embeddings().weight, "lm_head")
    put(student.decoder.layer_norm.weight, backbone.norm.weight, "norm")
    for ours, index in zip(student.decoder.layers, chosen):
        theirs = backbone.layers[index]
        attn, ret = theirs.self_attn, ours.retention
        put(ours.retention_layer_norm.weight, theirs.input_layernorm.weight, f"layers.{index}.input_layernorm")
        put(ours.final_layer_norm.weight, theirs.post_attention_layernorm.weight, f"layers.{index}.post_attention_layernorm")
        put(ours.ffn.fc1.weight, theirs.mlp.gate_proj.weight, f"layers.{index}.mlp.gate_proj")
        put(ours.ffn.gate.weight, theirs.mlp.up_proj.weight, f"layers.{index}.mlp.up_proj")
        put(ours.ffn.fc2.weight, theirs.mlp.down_proj.weight, f"layers.{index}.mlp.down_proj")
        for name, kv, permute in (("q_proj", heads, True), ("k_proj", kv_heads, True), ("v_proj", kv_heads, False)):
            source = getattr(attn, name)
            put(getattr(ret, name).weight, _heads(source.weight, kv, heads, head_dim, permute), f"layers.{index}.{name}")
            if source.bias is not None:
                put(getattr(ret, name).bias, _heads(source.bias, kv, heads, head_dim, permute), f"layers.{index}.{name}.bias")
        put(ret.out_proj.weight, attn.o_proj.weight, f"layers.{index}.o_proj")


# ----------------------------------------------------------------------------------------- teacher taps


@dataclass
class AttentionTap:
    """What one teacher layer's attention saw and produced: ``inputs [B, L, d]`` (after its input
    norm), ``heads [B, L, H * dv]`` (before ``o_proj``, only when asked) and ``outputs [B, L, d]``."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    heads: torch.Tensor | None = None


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_attention(teacher_lm: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                      with_heads: bool = False) -> list[AttentionTap]:
    """One teacher forward over ``input_ids [B, L]`` (causal, no LM head) recording the attention of
    each of ``layers``; tensors stay on the teacher's device, in fp32."""
    backbone = teacher_backbone(teacher_lm)
    taps: dict[int, dict[str, torch.Tensor]] = {index: {} for index in layers}
    handles = []
    for index in layers:
        attn, store = backbone.layers[index].self_attn, taps[index]

        def on_attention(module, args, kwargs, output, store=store):
            store["inputs"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).float()
            store["outputs"] = (output[0] if isinstance(output, tuple) else output).float()

        handles.append(attn.register_forward_hook(on_attention, with_kwargs=True))
        if with_heads:
            handles.append(attn.o_proj.register_forward_pre_hook(
                lambda module, args, store=store: store.__setitem__("heads", args[0].float())))
    device = next(teacher_lm.parameters()).device
    with _hooks(handles):
        backbone(input_ids=input_ids.to(device), use_cache=False)
    return [AttentionTap(taps[i]["inputs"], taps[i]["outputs"], taps[i].get("heads")) for i in layers]


def retention_output(student: RetNetStudent, layer: int, inputs: torch.Tensor) -> torch.Tensor:
    """Student layer ``layer``'s retention on already-normed ``inputs [B, L, d]`` -> ``[B, L, d]``
    (the same computation the layer runs inside its residual block, on the path the student's config
    picks for this length: chunkwise for long rows)."""
    chunkwise = student.config.uses_chunkwise(inputs.size(1))
    rel_pos = student.decoder.retnet_rel_pos(inputs.size(1), chunkwise_recurrent=chunkwise)
    return student.decoder.layers[layer].retention(inputs, rel_pos, chunkwise_recurrent=chunkwise)


def valid_rows(tensor: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, ...]`` -> ``[N, ...]`` rows at positions ``< lengths`` (all when ``lengths`` is None)."""
    if lengths is None:
        return tensor.reshape(-1, *tensor.shape[2:])
    keep = torch.arange(tensor.size(1), device=tensor.device)[None, :] < lengths.to(tensor.device)[:, None]
    return tensor[keep]


@torch.no_grad()
def layer_errors(student: RetNetStudent, teacher_lm: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                 lengths: torch.Tensor | None = None, taps: list[AttentionTap] | None = None) -> list[float]:
    """Per student layer: ``||retention(x) - attention(x)|| / ||attention(x)||`` on the teacher's own
    hidden states ``x`` over the valid rows of ``input_ids [B, L]`` (0 = the attention exactly).
    ``taps``: an earlier :func:`capture_attention` of the same rows (saves the teacher forward)."""
    taps = taps or capture_attention(teacher_lm, input_ids, layers)
    device = student.embed_tokens.weight.device
    errors = []
    for j, tap in enumerate(taps):
        ours = valid_rows(retention_output(student, j, tap.inputs.to(device)).float(), lengths)
        theirs = valid_rows(tap.outputs.to(device), lengths)
        errors.append(float((ours - theirs).norm() / theirs.norm().clamp(min=1e-12)))
    return errors


# ----------------------------------------------------------------------------------------- gate init


def inverse_swish(values: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """``z`` with ``z * sigmoid(z) = values`` on swish's increasing branch (``z >= -1.278``); values
    below swish's minimum are clamped to it. Bisection, elementwise."""
    target = values.float().clamp(min=SWISH_MIN)
    low = torch.full_like(target, SWISH_ARGMIN)
    high = torch.maximum(target.abs() + 2.0, torch.full_like(target, 2.0))
    for _ in range(iterations):
        mid = (low + high) / 2
        below = F.silu(mid) < target
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    return (low + high) / 2


@torch.no_grad()
def init_output_gates(student: RetNetStudent, teacher_lm: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                      lengths: torch.Tensor | None = None, ridge: float = 1e-3,
                      taps: list[AttentionTap] | None = None) -> list[float]:
    """Closed-form start for each layer's swish gate ``g_proj`` (it has no bias), from calibration rows.

    Per value channel ``c``: the least-squares scale ``s_c = <n_c, a_c> / <n_c, n_c>`` of the
    group-normed retention output ``n`` onto the teacher's head output ``a`` (before ``o_proj``), so
    that ``s * n ~ a``. The gate must output ``s_c`` whatever the token, so ``g_proj`` maps ``x`` to
    ``(x . w) z_c`` with ``z_c = swish^-1(s_c)`` and ``w`` the ridge least-squares solution of
    ``X w ~ 1`` over the calibration inputs ``X`` (the normed hidden states carry a nearly constant
    direction). Returns the fit's R^2 of ``X w ~ 1`` per layer (1 = an exactly constant gate).
    """
    taps = taps or capture_attention(teacher_lm, input_ids, layers, with_heads=True)
    device = student.embed_tokens.weight.device
    fits = []
    for j, tap in enumerate(taps):
        retention = student.decoder.layers[j].retention
        normed: dict[str, torch.Tensor] = {}
        handle = retention.group_norm.register_forward_hook(lambda m, a, out: normed.__setitem__("n", out.float()))
        with _hooks([handle]):
            retention_output(student, j, tap.inputs.to(device))
        n = valid_rows(normed["n"].flatten(2), lengths)  # [N, H * dv]
        a = valid_rows(tap.heads.to(device), lengths)  # [N, H * dv]
        scale = (n * a).sum(0) / (n * n).sum(0).clamp(min=1e-12)
        z = inverse_swish(scale)
        x = valid_rows(tap.inputs.to(device), lengths)  # [N, d]
        gram = x.T @ x + ridge * x.pow(2).sum(0).mean() * torch.eye(x.size(1), device=device)
        w = torch.linalg.solve(gram, x.T @ torch.ones(x.size(0), device=device))
        fitted = x @ w
        fits.append(float(1 - (fitted - 1).pow(2).mean()))
        retention.g_proj.weight.copy_(z[:, None] * w[None, :])
    return fits


# ----------------------------------------------------------------------------------------- entry point


@dataclass
class RetrofitReport:
    """Per student layer: its teacher layer, the gate fit's R^2, and the relative error of the retention
    output against the teacher's attention output before and after the gate initialisation."""

    teacher_layers: list[int]
    gate_fit_r2: list[float]
    error_random_gate: list[float]
    error_fitted_gate: list[float]

    def lines(self) -> list[str]:
        head = "student layer <- teacher layer: |retention - attention| / |attention| (random gate -> fitted gate), gate R^2"
        return [head] + [f"  {j:3d} <- {t:3d}: {a:8.3f} -> {b:8.3f}   R^2 {r:.3f}" for j, (t, a, b, r) in
                         enumerate(zip(self.teacher_layers, self.error_random_gate, self.error_fitted_gate, self.gate_fit_r2))]

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_layers": self.teacher_layers, "gate_fit_r2": self.gate_fit_r2,
                "error_random_gate": self.error_random_gate, "error_fitted_gate": self.error_fitted_gate}


def retrofit(teacher_lm: nn.Module, calibration_ids: torch.Tensor, calibration_lengths: torch.Tensor | None = None,
             layers: Sequence[int] | None = None, group_norm_eps: float = DEFAULT_GROUP_NORM_EPS,
             device: str | torch.device = "cpu", **overrides: Any) -> tuple[RetNetStudent, RetrofitReport]:
    """Build a student of the teacher's shape (or of ``layers`` of it), copy the teacher's weights,
    fit the output gates on ``calibration_ids [B, L]`` and measure each layer's distance to the
    teacher's attention. ``overrides``: non-shape :class:`StudentConfig` fields (e.g. ``max_seq_len``)."""
    config = student_config_for(teacher_lm, layers, group_norm_eps, **overrides)
    chosen = resolve_layers(layers, len(teacher_backbone(teacher_lm).layers))
    with torch.device(device):
        student = RetNetStudent(config)
    copy_teacher_weights(student, teacher_lm, chosen)
    taps = capture_attention(teacher_lm, calibration_ids, chosen, with_heads=True)  # one teacher forward for all three
    before = layer_errors(student, teacher_lm, calibration_ids, chosen, calibration_lengths, taps=taps)
    fits = init_output_gates(student, teacher_lm, calibration_ids, chosen, calibration_lengths, taps=taps)
    after = layer_errors(student, teacher_lm, calibration_ids, chosen, calibration_lengths, taps=taps)
    report = RetrofitReport(chosen, fits, before, after)
    for line in report.lines():
        log.info("%s", line)
    return student, report


def load_teacher_lm(model: str, cache_dir: str, device: str = "cpu") -> tuple[nn.Module, Any, str]:
    """The teacher as a HF causal LM in fp32 (any name ``retnet-teacher --model`` accepts), its
    tokenizer, and the tokenizer's fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.fingerprint import tokenizer_sha256
    from teacher_server.engines.model_source import resolve_model

    source = resolve_model(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    teacher_lm = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).to(device).eval()
    return teacher_lm, tokenizer, tokenizer_sha256(tokenizer)
