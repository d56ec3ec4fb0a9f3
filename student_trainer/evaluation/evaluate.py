"""Checkpoint evaluation: how close the student is to its teacher, and how it decodes.

``retnet-distill evaluate --checkpoint DIR [--data SHARDS] [--teacher NAME]`` measures, on held-out
rows of a shard set:

- perplexity of the student and of the teacher on the data's target tokens (full softmax, exact);
- KL(teacher || student) over the whole vocabulary at T = 1, and top-1 agreement;
- the largest difference between the student's recurrent path (prefill one token, then step) and its
  parallel forward, in log-probability units (they must agree: generation uses the recurrent path);
- decode speed through the recurrent state, and a few chat answers of student and teacher;

and writes ``report.json`` plus ``curves.png`` from the run's ``metrics.jsonl``. With ``--context N`` the
report also has a ``long_context`` section: loss by position bucket on rows of N tokens
(:mod:`student_trainer.evaluation.long_context`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.files import atomic_write
from shared.token_shards import read_manifest
from student_trainer.training.checkpoint import ResolvedCheckpoint, resolve_checkpoint
from student_trainer.data.sampler import ShardSampler
from student_trainer.data.shards import PretokenizedShardDataset
from student_trainer.model.student import RetNetStudent
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR, stop_ids

DEFAULT_PROMPTS = (
    "What does the Python statement `pass` do?",
    "How do I open a file and read its lines in Python?",
)


class EvaluationError(ValueError):
    """An input that cannot be evaluated (missing checkpoint, mismatched data); the message says why."""


@dataclass
class EvalSettings:
    """What to evaluate and how (``retnet-distill evaluate --help`` lists the same knobs)."""

    checkpoint: str  # a run folder (latest checkpoint), a checkpoint folder, or a saved model folder
    data: str | None = None  # shard folder; None: the run's own data (its train_data)
    teacher: str | None = None  # teacher model; None: the run's teacher_model
    split: str = "val"
    batches: int = 8
    batch_size: int = 4
    device: str = "cpu"
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.9
    seed: int = 0
    output_dir: str | None = None  # None: <run>/eval
    model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR
    # Long-context evaluation (student_trainer/evaluation/long_context.py); None: none (the report has no long_context).
    context: int | None = None  # tokens per long row; may exceed the student's training context
    buckets: list[int] | None = None  # inner position edges of the loss table; None: 512, 2048, 8192, ... (x4)
    context_rows: int = 1  # long rows to score (fewer when the split holds fewer)
    # lm-evaluation-harness (student_trainer/evaluation/lm_eval_tasks.py) on the teacher and the exported student;
    # None: not run. [] : the local task. lm_eval_limit: items per task (None: all).
    lm_eval_tasks: list[str] | None = None
    lm_eval_limit: int | None = None


def resolve_data(settings: EvalSettings, checkpoint: ResolvedCheckpoint) -> Path:
    """The shard folder: ``--data``, else the run's own training data (python-docs is built if missing)."""
    if settings.data and settings.data != "python-docs":
        return Path(settings.data)
    from student_trainer.training.config import TrainConfig
    from student_trainer.training.recipe import prepare_data

    known = {k: v for k, v in checkpoint.train_config.items() if k in ("train_data", "data_dir", "max_seq_length",
                                                                        "teacher_model", "model_cache_dir")}
    if settings.data == "python-docs":
        known["train_data"] = "python-docs"
    if "train_data" not in known:
        raise EvaluationError(f"{checkpoint.model_dir} records no training data; pass --data SHARDS")
    if settings.teacher:
        known["teacher_model"] = settings.teacher
    return prepare_data(TrainConfig(**known, progress=False))


def _token_logprobs(model_logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[L, V_model]`` logits -> ``[L, vocab]`` fp32 log-probs over the tokenizer's ids only."""
    return torch.log_softmax(model_logits[:, :vocab].float(), dim=-1)


@torch.no_grad()
def heldout_metrics(student: RetNetStudent, teacher_lm: Any, dataset: PretokenizedShardDataset, vocab: int,
                    batches: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Exact held-out metrics over the supervised positions of the first ``batches * batch_size`` rows.

    A position ``t`` counts when token ``t + 1`` is a target of the data's loss mask; the student and the
    teacher both predict it from tokens ``<= t``. KL(teacher || student) = sum_v p_t (log p_t - log p_s).
    """
    order = ShardSampler(len(dataset), shuffle=False)
    rows = min(len(dataset), batches * batch_size)
    sums = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0.0, "student_acc": 0.0, "teacher_acc": 0.0}
    count = 0
    for index in order.take(rows):
        row = dataset[index]
        n = row["length"]
        ids = row["input_ids"][:n].to(device)
        positions = torch.nonzero(row["loss_mask"][1:n]).flatten().to(device)  # t where token t+1 is a target
        if positions.numel() == 0:
            continue
        labels = ids[positions + 1]
        student_lp = _token_logprobs(student(ids[None])[0], vocab)[positions]
        teacher_lp = _token_logprobs(teacher_lm(input_ids=ids[None]).logits[0], vocab)[positions]
        sums["student_nll"] -= float(student_lp.gather(1, labels[:, None]).sum())
        sums["teacher_nll"] -= float(teacher_lp.gather(1, labels[:, None]).sum())
        sums["kl"] += float((teacher_lp.exp() * (teacher_lp - student_lp)).sum())
        student_top, teacher_top = student_lp.argmax(-1), teacher_lp.argmax(-1)
        sums["agree"] += float((student_top == teacher_top).sum())
        sums["student_acc"] += float((student_top == labels).sum())
        sums["teacher_acc"] += float((teacher_top == labels).sum())
        count += positions.numel()
    if count == 0:
        raise EvaluationError(f"{dataset.folder} split {dataset.split!r} has no target tokens in its first {rows} rows")
    mean = {key: value / count for key, value in sums.items()}
    return {
        "student_perplexity": math.exp(mean["student_nll"]), "teacher_perplexity": math.exp(mean["teacher_nll"]),
        "student_nll": mean["student_nll"], "teacher_nll": mean["teacher_nll"],
        "kl_teacher_student": mean["kl"], "top1_agreement": mean["agree"],
        "student_top1_accuracy": mean["student_acc"], "teacher_top1_accuracy": mean["teacher_acc"],
        "rows": float(rows), "target_tokens": float(count),
    }


@torch.no_grad()
def recurrent_parallel_difference(student: RetNetStudent, ids: torch.Tensor) -> float:
    """Max |log p_recurrent - log p_parallel| over all positions of ``ids [L]``: prefill of the first token,
    then one recurrent step per token, against one parallel forward over the same tokens."""
    parallel = torch.log_softmax(student(ids[None])[0].float(), dim=-1)
    logits, state = student.prefill(ids[None, :1])
    worst = float((torch.log_softmax(logits[0].float(), -1) - parallel[0]).abs().max())
    for t in range(1, ids.numel()):
        logits, state = student.step(ids[t : t + 1], state)
        worst = max(worst, float((torch.log_softmax(logits[0].float(), -1) - parallel[t]).abs().max()))
    return worst


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of a one-turn chat ending where the assistant's answer starts."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def student_answer(student: RetNetStudent, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, device: torch.device) -> tuple[str, list[int], float]:
    """``(text, new token ids, decode seconds)`` of one sampled answer through the recurrent state."""
    ids = torch.tensor(chat_prompt_ids(tokenizer, prompt), device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    stops, produced = stop_ids(tokenizer), []
    started = time.perf_counter()
    for token in student.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, greedy=temperature == 0,
                                  generator=generator):
        if int(token[0]) in stops:
            break
        produced.append(int(token[0]))
    return tokenizer.decode(produced, skip_special_tokens=True), produced, time.perf_counter() - started


@torch.no_grad()
def teacher_answer(teacher_lm: Any, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int) -> tuple[str, list[int]]:
    """``(text, new token ids up to the first stop id)`` of the teacher's own sampled answer."""
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=teacher_lm.device)
    torch.manual_seed(seed)
    head_rows = teacher_lm.get_output_embeddings().weight.shape[0]
    padded = list(range(len(tokenizer), head_rows))  # LM-head rows no token has (never sampled)
    out = teacher_lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              suppress_tokens=padded or None,
                              do_sample=temperature > 0, temperature=temperature or None, top_p=top_p,
                              eos_token_id=sorted(stop_ids(tokenizer)), pad_token_id=tokenizer.eos_token_id)
    produced, stops = [], stop_ids(tokenizer)
    for token in out[0, ids.shape[1]:].tolist():
        if token in stops:
            break
        produced.append(token)
    return tokenizer.decode(produced, skip_special_tokens=True), produced


@torch.no_grad()
def decode_speed(student: RetNetStudent, prompt_ids: torch.Tensor, tokens: int = 64) -> float:
    """Recurrent decode tokens/s after the prompt (greedy, batch 1, prefill excluded)."""
    logits, state = student.prefill(prompt_ids[None])
    token = logits.argmax(-1)
    started = time.perf_counter()
    for _ in range(tokens):
        logits, state = student.step(token, state, overwrite=True)
        token = logits.argmax(-1)
    return tokens / (time.perf_counter() - started)


def evaluate(settings: EvalSettings, progress: Any = None) -> dict[str, Any]:
    """Evaluate a checkpoint; writes ``report.json`` (and ``curves.png`` when the run has metrics) into the
    output folder and returns the report. ``progress(message)`` is called before each stage."""
    from teacher_server.engines.hf import HFEngine

    say = progress or (lambda message: None)
    checkpoint = resolve_checkpoint(settings.checkpoint)
    device = torch.device(settings.device)
    teacher_name = settings.teacher or checkpoint.train_config.get("teacher_model")
    if not teacher_name:
        raise EvaluationError(f"{checkpoint.model_dir} records no teacher; pass --teacher NAME")
    out_dir = Path(settings.output_dir) if settings.output_dir else (checkpoint.run_dir or checkpoint.model_dir.parent) / "eval"

    say(f"loading student {checkpoint.model_dir} and teacher {teacher_name}")
    student = RetNetStudent.load(checkpoint.model_dir, device=device).eval()
    engine = HFEngine(teacher_name, device=settings.device, dtype="float32", cache_dir=settings.model_cache_dir)
    teacher_lm, tokenizer = engine.model, engine.tokenizer
    data_dir = resolve_data(settings, checkpoint)
    manifest = read_manifest(data_dir)
    if manifest["tokenizer_sha256"] != engine.tokenizer_sha256:
        raise EvaluationError(f"{data_dir} was tokenized with {manifest['tokenizer']}, not the teacher {teacher_name}'s "
                              "tokenizer; pass --data tokenized with the teacher's tokenizer")
    if student.config.vocab_size < engine.vocab_size:
        raise EvaluationError(f"the student's vocab ({student.config.vocab_size}) is smaller than the teacher "
                              f"tokenizer's ({engine.vocab_size}); was it trained with teacher {teacher_name}?")
    split = settings.split if settings.split in manifest["splits"] else "train"
    dataset = PretokenizedShardDataset(data_dir, split)
    long_context = None  # first: a context the data cannot fill fails before the rest runs
    if settings.context is not None:
        from student_trainer.evaluation.long_context import long_context_metrics

        say(f"long-context loss on rows of {settings.context} tokens")
        long_context = long_context_metrics(student, teacher_lm, dataset, engine.vocab_size, settings.context,
                                            settings.context_rows, settings.buckets,
                                            train_context=checkpoint.train_config.get("max_seq_length"))

    say(f"held-out metrics on {data_dir.name}/{split}")
    metrics = heldout_metrics(student, teacher_lm, dataset, engine.vocab_size, settings.batches, settings.batch_size, device)
    probe = dataset[0]["input_ids"][: min(dataset[0]["length"], 64)].to(device)
    metrics["recurrent_vs_parallel_max_abs_diff"] = recurrent_parallel_difference(student, probe)
    metrics["decode_tokens_per_s"] = decode_speed(student, probe)

    say("generating samples")
    samples, generated = [], {"prompts": [], "student": [], "teacher": []}
    for i, prompt in enumerate(settings.prompts):
        text, student_ids, seconds = student_answer(student, tokenizer, prompt, settings.max_new_tokens,
                                                    settings.temperature, settings.top_p, settings.seed + i, device)
        teacher_text, teacher_ids = teacher_answer(teacher_lm, tokenizer, prompt, settings.max_new_tokens,
                                                   settings.temperature, settings.top_p, settings.seed + i)
        samples.append({"prompt": prompt, "student": text, "student_tokens": len(student_ids), "teacher": teacher_text})
        generated["prompts"].append(chat_prompt_ids(tokenizer, prompt))
        generated["student"].append(student_ids)
        generated["teacher"].append(teacher_ids)
    say("scoring the generations with the teacher")
    from student_trainer.evaluation.generation_quality import generation_metrics

    writers = {"student": student, "teacher": None}  # the teacher's own text: its reverse KL is 0 by definition
    generation = {who: generation_metrics(teacher_lm, engine.vocab_size, generated["prompts"], generated[who],
                                          writer=writers[who])
                  for who in ("student", "teacher")}
    report = {
        "checkpoint": str(checkpoint.model_dir), "step": checkpoint.step, "teacher": teacher_name,
        "data": str(data_dir), "split": split, "student_parameters": student.num_parameters(),
        "metrics": metrics, "generation": generation, "samples": samples,
        "sampling": {"temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                     "max_new_tokens": settings.max_new_tokens},
        "settings": asdict(settings),
    }
    if long_context is not None:
        report["long_context"] = long_context
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.lm_eval_tasks is not None:
        report["lm_eval"] = lm_eval_report(settings, checkpoint, teacher_name, out_dir, say)
    metrics_file = checkpoint.run_dir / "metrics.jsonl" if checkpoint.run_dir else None
    if metrics_file is not None and metrics_file.is_file():
        from student_trainer.evaluation.plots import plot_training_curves

        say("plotting training curves")
        report["curves_png"] = str(plot_training_curves(metrics_file, out_dir / "curves.png",
                                                        title=f"{checkpoint.run_dir} (step {checkpoint.step})",
                                                        generation=generation))
    report_path = out_dir / "report.json"
    atomic_write(report_path, (json.dumps(report, indent=2, default=_json_default) + "\n").encode())
    report["report_json"] = str(report_path)
    return report


def lm_eval_report(settings: EvalSettings, checkpoint: ResolvedCheckpoint, teacher_name: str, out_dir: Path,
                   say: Any) -> dict[str, Any]:
    """lm-eval on the teacher's Hugging Face folder and on the student exported to a temporary folder
    (removed after): ``{task: {metric: {"student", "teacher", "percent_of_teacher"}}}``."""
    import tempfile

    from student_trainer.hf_export.export import export
    from student_trainer.evaluation.lm_eval_tasks import percent_of_teacher, run_lm_eval
    from teacher_server.engines.model_source import resolve_model

    tasks = settings.lm_eval_tasks or None
    teacher_dir = resolve_model(teacher_name, settings.model_cache_dir).path
    with tempfile.TemporaryDirectory(prefix=".lm-eval-", dir=out_dir) as work:
        say("lm-eval: exporting the student")
        exported = export(checkpoint.model_dir, Path(work) / "student", tokenizer_name=teacher_name,
                          model_cache_dir=settings.model_cache_dir)
        say(f"lm-eval: the teacher on {tasks or 'the local task'}")
        teacher = run_lm_eval(teacher_dir, Path(work), tasks, settings.lm_eval_limit, device=settings.device)
        say(f"lm-eval: the student on {tasks or 'the local task'}")
        student = run_lm_eval(exported, Path(work), tasks, settings.lm_eval_limit, device=settings.device)
    return {"limit": settings.lm_eval_limit, "tasks": percent_of_teacher(student, teacher)}


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
