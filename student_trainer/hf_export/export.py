"""``retnet-distill export CHECKPOINT OUT_DIR``: a student as a Hugging Face model folder.

The folder holds ``config.json`` (``model_type`` ``retnet_student``, ``auto_map`` for AutoConfig and
AutoModelForCausalLM), the two code files of this package (plain torch + transformers), the weights
under the exported module names (``model.safetensors``; a tied head is stored once, as the embedding),
the teacher's tokenizer with its chat template, ``generation_config.json`` and a model card with the
run's figures. It is written into a temporary sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from shared.files import fsync_path, replace_folder
from student_trainer.data.tokenizer import stop_ids
from student_trainer.training.checkpoint import CheckpointNotFound, ResolvedCheckpoint, resolve_checkpoint
from student_trainer.model.student import FORMAT_NAME, HEAD_KEY, RetNetStudent
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR, load_tokenizer

TEMPLATES = Path(__file__).resolve().parent
CODE_FILES = ("configuration_retnet_student.py", "modeling_retnet_student.py")
MODEL_TYPE = "retnet_student"
# RetNetStudent's parameter names -> the exported module's (the order of the rules matters)
_RENAMES = (
    (r"^decoder\.embed_tokens\.weight$", "model.embed_tokens.weight"),
    (r"^decoder\.layer_norm\.weight$", "model.norm.weight"),
    (r"^decoder\.output_projection\.weight$", "lm_head.weight"),
    (r"^decoder\.layers\.(\d+)\.retention_layer_norm\.weight$", r"model.layers.\1.retention_norm.weight"),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.weight$", r"model.layers.\1.ffn_norm.weight"),
    (r"^decoder\.layers\.(\d+)\.retention\.([qkvg]_proj|out_proj)\.(weight|bias)$", r"model.layers.\1.retention.\2.\3"),
    (r"^decoder\.layers\.(\d+)\.ffn\.(fc1|fc2|gate)\.weight$", r"model.layers.\1.ffn.\2.weight"),
)


class ExportError(ValueError):
    """An input that cannot be exported (not a checkpoint, an occupied output folder); the message says why."""


def exported_name(name: str) -> str:
    """The exported module's name for a ``RetNetStudent`` parameter (``decoder.layers.0.ffn.fc1.weight`` ->
    ``model.layers.0.ffn.fc1.weight``); an unknown name is refused (a model this exporter does not know)."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ExportError(f"parameter {name!r} has no exported name; this exporter knows TorchScale RetNet students "
                      "written by RetNetStudent.save (update student_trainer/hf_export/export.py for new modules)")


def hf_config(student: RetNetStudent, tokenizer: Any) -> dict[str, Any]:
    """``config.json`` of the export: the student's shape, the special tokens and the ``auto_map``."""
    from student_trainer.hf_export.configuration_retnet_student import RetNetStudentConfig

    c = student.config
    stops = sorted(stop_ids(tokenizer))
    config = RetNetStudentConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_heads=c.n_heads,
        intermediate_size=c.ffn_dim, value_dim=c.value_dim, rms_norm_eps=c.layernorm_eps,
        group_norm_eps=c.group_norm_eps, rotary_inv_freq=c.rotary_inv_freq, qkv_bias=c.qkv_bias,
        chunk_size=c.recurrent_chunk_size, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops[0] if len(stops) == 1 else (stops or None),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    data = config.to_dict()
    data.update(architectures=["RetNetStudentForCausalLM"], dtype="float32",
                auto_map={"AutoConfig": "configuration_retnet_student.RetNetStudentConfig",
                          "AutoModelForCausalLM": "modeling_retnet_student.RetNetStudentForCausalLM"})
    return data


def _checkpoint(path: str | Path) -> tuple[ResolvedCheckpoint, RetNetStudent]:
    expected = ("a run folder (with checkpoints/), a checkpoints/step-N folder (with model/), or a student folder "
                f"written by RetNetStudent.save (config.json with format {FORMAT_NAME!r} + model.safetensors)")
    if not Path(path).is_dir():
        raise ExportError(f"{path} is not a folder; expected {expected}")
    try:
        resolved = resolve_checkpoint(path)
    except CheckpointNotFound as exc:
        raise ExportError(f"{exc}; expected {expected}") from None
    meta = json.loads((resolved.model_dir / "config.json").read_text())
    if meta.get("model_type") == MODEL_TYPE:
        raise ExportError(f"{resolved.model_dir} is already a Hugging Face export (model_type {MODEL_TYPE!r}); "
                          f"export takes {expected}")
    try:
        student = RetNetStudent.load(resolved.model_dir)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise ExportError(f"{resolved.model_dir} is not a student checkpoint: {exc}; expected {expected}") from None
    return resolved, student.eval()


def _figures(resolved: ResolvedCheckpoint) -> tuple[str, dict[str, Any]]:
    """Where the model card's numbers come from and the numbers: ``evaluate``'s ``report.json`` (the run's
    ``eval/``, or the main job's ``eval/`` beside ``train/``), else the last held-out metrics of
    ``metrics.jsonl``, else none."""
    run = resolved.run_dir
    if run is None:
        return "none", {}
    for report_path in (run / "eval" / "report.json", run.parent / "eval" / "report.json"):
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            return str(report_path), report
    metrics_path = run / "metrics.jsonl"
    if metrics_path.is_file():
        last: dict[str, Any] = {}
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if any(key.startswith("eval/") for key in record):
                last = record
        if last:
            return str(metrics_path), last
    return "none", {}


def model_card(resolved: ResolvedCheckpoint, student: RetNetStudent, teacher: str) -> str:
    """``README.md`` of the export: what the model is, how to load it, and the run's figures (and their source)."""
    c = student.config
    source, figures = _figures(resolved)
    retrofit = c.rotary_inv_freq is not None
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [retnet, distillation]", "---", "",
             "# RetNet student", "",
             f"A RetNet ({student.num_parameters():,} parameters: {c.n_layers} layers, d {c.d_model}, {c.n_heads} heads, "
             f"value dim {c.value_dim}, SwiGLU {c.ffn_dim}, vocab {c.vocab_size}, "
             f"{'tied' if c.tie_embeddings else 'untied'} embeddings) distilled from `{teacher}` by retnet-distill"
             f"{', initialised from the teacher weights (retrofit)' if retrofit else ''}. "
             "It decodes from a recurrent state of fixed size: memory does not grow with the context.", "",
             "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
             'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
             'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
             'generate = pipeline("text-generation", model="THIS_FOLDER", trust_remote_code=True)',
             "```", "",
             "No padding mask (RetNet has none): batch prompts of one length, or one at a time.", "",
             "## Figures", "",
             f"Exported from `{resolved.model_dir}` (step {resolved.step if resolved.step is not None else 'unknown'}).", ""]
    if "metrics" in figures:  # evaluate's report.json
        lines.append(f"From `retnet-distill evaluate` ({source}, step {figures.get('step')}, data "
                     f"{figures.get('data')} split {figures.get('split')}):")
        if figures.get("step") != resolved.step:
            lines.append(f"(this report is of step {figures.get('step')}, not of the exported step {resolved.step})")
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in figures["metrics"].items()]
    elif figures:
        lines += [f"No evaluate report; the last held-out metrics logged in training ({source}, step "
                  f"{figures.get('step')}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in figures.items() if key.startswith("eval/")]
    else:
        lines.append("No figures: the checkpoint has no run folder with an evaluate report or metrics.jsonl.")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def export(checkpoint: str | Path, out_dir: str | Path, tokenizer_name: str | None = None, force: bool = False,
           model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR) -> Path:
    """Write the Hugging Face folder of ``checkpoint`` (a run, checkpoint or student folder) to ``out_dir``.

    ``tokenizer_name``: the teacher tokenizer (default: the run's ``teacher_model``). An existing non-empty
    ``out_dir`` is refused unless ``force`` (then replaced whole). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder; pick another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty; pick another OUT_DIR or pass --force to replace it")
    resolved, student = _checkpoint(checkpoint)
    name = tokenizer_name or resolved.train_config.get("teacher_model")
    if not name:
        raise ExportError(f"{resolved.model_dir} records no teacher; pass --tokenizer NAME (the teacher's tokenizer)")
    tokenizer = load_tokenizer(str(name), resolved.train_config.get("model_cache_dir", model_cache_dir))
    if student.config.vocab_size < len(tokenizer):
        raise ExportError(f"the student's vocab ({student.config.vocab_size}) is smaller than tokenizer {name}'s "
                          f"({len(tokenizer)}); pass --tokenizer with the teacher it was distilled from")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(student, tokenizer), indent=2) + "\n")
        for code in CODE_FILES:
            shutil.copyfile(TEMPLATES / code, tmp / code)
        weights = {exported_name(key): value.detach().cpu().contiguous() for key, value in student.state_dict().items()
                   if not (student.config.tie_embeddings and key == HEAD_KEY)}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        _generation_config(tokenizer).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(resolved, student, str(name)))
        _share(tmp)
        for path in [*tmp.iterdir(), tmp]:
            fsync_path(path)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _share(folder: Path) -> None:
    """Give ``folder`` and its files the umask's usual modes: ``mkdtemp`` (and safetensors) made them
    owner-only, which an export meant to be shared or uploaded must not be."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    stops = sorted(stop_ids(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stops[0] if len(stops) == 1 else (stops or None)  # EOS and the chat template's end-of-turn token
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
