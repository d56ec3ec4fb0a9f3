"""Loading what ``retnet-distill serve`` serves: a training checkpoint or a Hugging Face export folder.

An export (``retnet-distill export``) stores the weights under the exported module names; loading it
back maps them to :class:`RetNetStudent`'s, the inverse of ``hf_export.export._RENAMES``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from student_trainer.training.checkpoint import CheckpointNotFound, resolve_checkpoint
from student_trainer.hf_export.export import MODEL_TYPE
from student_trainer.model.student import EMBED_KEY, HEAD_KEY, RetNetStudent, StudentConfig
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR, load_tokenizer

# exported module names -> RetNetStudent's (the inverse of hf_export.export._RENAMES)
_INVERSE_RENAMES = (
    (r"^model\.embed_tokens\.weight$", "decoder.embed_tokens.weight"),
    (r"^model\.norm\.weight$", "decoder.layer_norm.weight"),
    (r"^lm_head\.weight$", "decoder.output_projection.weight"),
    (r"^model\.layers\.(\d+)\.retention_norm\.weight$", r"decoder.layers.\1.retention_layer_norm.weight"),
    (r"^model\.layers\.(\d+)\.ffn_norm\.weight$", r"decoder.layers.\1.final_layer_norm.weight"),
    (r"^model\.layers\.(\d+)\.retention\.([qkvg]_proj|out_proj)\.(weight|bias)$", r"decoder.layers.\1.retention.\2.\3"),
    (r"^model\.layers\.(\d+)\.ffn\.(fc1|fc2|gate)\.weight$", r"decoder.layers.\1.ffn.\2.weight"),
)
EXPECTED = ("a run folder (with checkpoints/), a checkpoints/step-N folder, a student folder written by "
            f"RetNetStudent.save, or a Hugging Face export folder (config.json with model_type {MODEL_TYPE!r})")


class LoadError(ValueError):
    """What was given cannot be served; the message says what was expected."""


@dataclass
class LoadedModel:
    """A student in eval mode and the tokenizer its ids belong to."""

    student: RetNetStudent
    tokenizer: Any
    source: str  # "checkpoint" or "export"


def student_name(exported: str) -> str:
    """``model.layers.0.ffn.fc1.weight`` -> ``decoder.layers.0.ffn.fc1.weight``; unknown names are refused."""
    for pattern, replacement in _INVERSE_RENAMES:
        if re.match(pattern, exported):
            return re.sub(pattern, replacement, exported)
    raise LoadError(f"export weight {exported!r} has no RetNetStudent name; expected a folder written by "
                    "retnet-distill export (update student_trainer/serving/loading.py for new modules)")


def load_export(folder: Path, device: str = "cpu") -> RetNetStudent:
    """A :class:`RetNetStudent` from an export folder's ``config.json`` + ``model.safetensors``."""
    hf = json.loads((folder / "config.json").read_text())
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise LoadError(f"{weights_path} not found: the export folder has no weights; export it again")
    config = StudentConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                           n_heads=hf["num_heads"], ffn_dim=hf["intermediate_size"], value_dim=hf["value_dim"],
                           layernorm_eps=hf["rms_norm_eps"], group_norm_eps=hf.get("group_norm_eps"),
                           rotary_inv_freq=hf.get("rotary_inv_freq"), qkv_bias=hf.get("qkv_bias", False),
                           recurrent_chunk_size=hf.get("chunk_size", 512),
                           max_seq_len=hf.get("max_position_embeddings", 2048),
                           tie_embeddings=hf.get("tie_word_embeddings", True))
    with torch.device(device):
        student = RetNetStudent(config)
    state = {student_name(key): value for key, value in load_file(str(weights_path), device=str(device)).items()}
    if config.tie_embeddings and EMBED_KEY in state:
        state[HEAD_KEY] = state[EMBED_KEY]
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LoadError(f"{weights_path} does not match its config.json: {exc}") from None
    return student


def load_model(path: str, tokenizer_name: str | None = None, device: str = "cpu",
               model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR) -> LoadedModel:
    """The student and tokenizer of ``path`` (see :data:`EXPECTED`). ``tokenizer_name`` overrides the run's
    ``teacher_model`` (needed for a bare student folder) or the export's own tokenizer."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"{path} is not a folder; expected {EXPECTED}")
    config_path = folder / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("model_type") == MODEL_TYPE:
        from transformers import AutoTokenizer

        student = load_export(folder, device)
        # trust_remote_code: transformers 5 reads config.json (auto_map) for any tokenizer load and would ask
        tokenizer = (load_tokenizer(tokenizer_name, model_cache_dir) if tokenizer_name
                     else AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True))
        source = "export"
    else:
        try:
            resolved = resolve_checkpoint(folder)
            student = RetNetStudent.load(resolved.model_dir, device=device)
        except (CheckpointNotFound, ValueError, FileNotFoundError, KeyError) as exc:
            raise LoadError(f"{exc}; expected {EXPECTED}") from None
        name = tokenizer_name or resolved.train_config.get("teacher_model")
        if not name:
            raise LoadError(f"{resolved.model_dir} records no teacher; pass --tokenizer NAME (the teacher's tokenizer)")
        tokenizer = load_tokenizer(str(name), resolved.train_config.get("model_cache_dir", model_cache_dir))
        source = "checkpoint"
    if student.config.vocab_size < len(tokenizer):
        raise LoadError(f"the student's vocab ({student.config.vocab_size}) is smaller than the tokenizer's "
                        f"({len(tokenizer)}); pass --tokenizer with the teacher it was distilled from")
    return LoadedModel(student.eval(), tokenizer, source)
