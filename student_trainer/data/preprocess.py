"""Raw files to memory-mapped training shards: read, recognise, render, mask, pack or pad, write.

Deterministic: the same inputs and parameters give byte-identical shards (files are read in
sorted order, the validation split is chosen by a hash of each record's content).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from shared.fingerprint import tokenizer_sha256
from student_trainer.data.formats import FORMATS, InvalidRecord, to_document
from student_trainer.data.python_docs import CORPUS_NAME, write_python_docs
from student_trainer.data.readers import InputError, file_fingerprint, list_input_files, read_records
from student_trainer.data.render import DocumentTokenizer
from student_trainer.data.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST, ShardWriter, atomic_write
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR, load_tokenizer


@dataclass
class PreprocessConfig:
    """What ``retnet-distill preprocess`` does; every field is a flag of the same name."""

    inputs: list[str]
    output: str
    tokenizer: str = "smollm2-135m-instruct"
    max_seq_length: int = 1024
    format: str | None = None  # None: detect per record
    pack: bool = True  # False: one document per row, truncated, right-padded
    val_fraction: float = 0.0
    skip_invalid: bool = False
    rows_per_shard: int = 8192
    overwrite: bool = False
    model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR
    corpus_dir: str = "~/.cache/retnet-distill/corpora"  # where embedded corpora are written once
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (e.g. corpus name)

    def check(self) -> None:
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2, found {self.max_seq_length}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}; found {self.format!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), found {self.val_fraction}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be positive, found {self.rows_per_shard}")


class SplitBuilder:
    """Packs (or pads) the documents of one split into rows and hands them to a ShardWriter."""

    def __init__(self, writer: ShardWriter, pack: bool, eos_id: int) -> None:
        self.writer, self.pack, self.eos_id = writer, pack, eos_id
        self.seq_len = writer.seq_len
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._buffered = 0
        self.documents = self.tokens = self.targets = self.truncated = 0
        self.doc_lengths: list[int] = []

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        self.documents += 1
        self.doc_lengths.append(len(tokens))
        if not self.pack:
            if len(tokens) > self.seq_len:
                self.truncated += 1
                tokens, mask = tokens[: self.seq_len], mask[: self.seq_len]
            self._emit(tokens, mask)
            return
        if tokens[-1] != self.eos_id:  # EOS between documents, as context (not a target)
            tokens = np.append(tokens, np.int32(self.eos_id))
            mask = np.append(mask, np.uint8(0))
        self._tokens.append(tokens)
        self._masks.append(mask)
        self._buffered += len(tokens)
        if self._buffered >= self.seq_len:
            stream, stream_mask = np.concatenate(self._tokens), np.concatenate(self._masks)
            full = len(stream) // self.seq_len * self.seq_len
            for start in range(0, full, self.seq_len):
                self._emit(stream[start : start + self.seq_len], stream_mask[start : start + self.seq_len])
            self._tokens, self._masks = [stream[full:]], [stream_mask[full:]]
            self._buffered = len(stream) - full

    def _emit(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        self.tokens += len(tokens)
        self.targets += int(mask.sum())
        self.writer.add(tokens, mask)

    def finish(self) -> dict[str, Any]:
        if self._buffered:  # the last, partial row of a packed stream: right-padded
            self._emit(np.concatenate(self._tokens), np.concatenate(self._masks))
        self.writer.flush()
        lengths = np.asarray(self.doc_lengths or [0])
        rows = sum(shard["rows"] for shard in self.writer.shards)
        return {
            "documents": self.documents,
            "rows": rows,
            "tokens": self.tokens,
            "target_tokens": self.targets,
            "padding_tokens": rows * self.seq_len - self.tokens,
            "truncated_documents": self.truncated,
            "document_tokens": {
                "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
                "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max()),
            },
            "shards": self.writer.shards,
        }


def resolve_inputs(inputs: list[str], corpus_dir: str) -> list[str]:
    """Input paths, with the embedded corpus name ``python-docs`` replaced by its jsonl file."""
    return [str(write_python_docs(corpus_dir)) if item == CORPUS_NAME and not Path(item).exists() else item for item in inputs]


def _record_hash(value: Any) -> int:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()
    return int.from_bytes(hashlib.sha256(canonical).digest()[:8], "little")


def _progress(enabled: bool) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        TextColumn("{task.completed} examples, {task.fields[tokens]} tokens, {task.fields[ex_s]:.0f} examples/s, {task.fields[tok_s]:.0f} tokens/s"),
        disable=not enabled,
    )


def preprocess(config: PreprocessConfig) -> dict[str, Any]:
    """Run the pipeline and return the manifest (also written to ``output/manifest.json``).

    Raises:
        InputError: a bad record (naming file and line) unless ``skip_invalid``; no input files;
            no valid documents at all.
        FileExistsError: the output holds a finished shard set and ``overwrite`` is False.
    """
    config.check()
    files = list_input_files(resolve_inputs(config.inputs, config.corpus_dir))
    output = Path(config.output)
    if (output / MANIFEST).exists():
        if not config.overwrite:
            raise FileExistsError(f"{output} already holds a shard set; pass --overwrite to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(config.tokenizer, config.model_cache_dir)
    encoder = DocumentTokenizer(tokenizer)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ValueError(f"tokenizer {config.tokenizer} has no EOS token; packing needs one between documents")
    builders = {
        split: SplitBuilder(ShardWriter(output, split, config.max_seq_length, pad_id, config.rows_per_shard), config.pack, eos_id)
        for split in (["train", "val"] if config.val_fraction > 0 else ["train"])
    }
    val_cut = int(config.val_fraction * 2**64)
    skipped: Counter[str] = Counter()
    skipped_examples: list[str] = []
    formats: Counter[str] = Counter()
    started, seen, tokens_seen = time.perf_counter(), 0, 0

    with _progress(config.progress) as progress:
        task = progress.add_task("preprocessing", tokens=0, ex_s=0.0, tok_s=0.0)
        for record in read_records(files):
            seen += 1
            try:
                if isinstance(record.value, InputError):
                    raise record.value
                document = to_document(record.value, config.format)
                encoded = encoder.encode(document)
            except (InvalidRecord, InputError) as exc:
                error = exc if isinstance(exc, InputError) else InputError(record.path, record.line, str(exc))
                if not config.skip_invalid:
                    raise error from exc
                skipped[error.reason.split(";")[0].split(" (")[0]] += 1
                if len(skipped_examples) < 20:
                    skipped_examples.append(str(error))
                continue
            formats["chat" if document.is_chat else "text"] += 1
            split = "val" if "val" in builders and _record_hash(record.value) < val_cut else "train"
            builders[split].add(encoded.tokens, encoded.mask)
            tokens_seen += len(encoded.tokens)
            if seen % 200 == 0:
                elapsed = time.perf_counter() - started
                progress.update(task, completed=seen, tokens=tokens_seen, ex_s=seen / elapsed, tok_s=tokens_seen / elapsed)
        elapsed = time.perf_counter() - started
        progress.update(task, completed=seen, tokens=tokens_seen, ex_s=seen / max(elapsed, 1e-9), tok_s=tokens_seen / max(elapsed, 1e-9))

    if sum(b.documents for b in builders.values()) == 0:
        raise InputError(", ".join(map(str, files)), None, f"no valid documents ({sum(skipped.values())} skipped as invalid)")
    splits = {name: builder.finish() for name, builder in builders.items()}
    if "val" in splits and splits["val"]["rows"] == 0:
        del splits["val"]  # too few documents for the requested fraction; said in counts below
    shard_digests = [digest for split in splits.values() for shard in split["shards"] for digest in shard["sha256"].values()]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fingerprint": hashlib.sha256("".join(shard_digests).encode()).hexdigest(),
        "tokenizer": config.tokenizer,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": len(tokenizer),
        "max_seq_length": config.max_seq_length,
        "pad_id": int(pad_id),
        "eos_id": int(eos_id),
        "mask_semantics": "mask[t] = 1 when token t is a training target (the student's row t-1 predicts it)",
        "parameters": {k: v for k, v in asdict(config).items() if k not in ("output", "progress", "overwrite", "model_cache_dir", "corpus_dir")},
        "inputs": [file_fingerprint(path) for path in files],
        "counts": {
            "records": seen,
            "documents": {"chat": formats["chat"], "text": formats["text"]},
            "skipped_invalid": sum(skipped.values()),
            "skipped_by_reason": dict(sorted(skipped.items())),
            "skipped_examples": skipped_examples,
        },
        "splits": splits,
        "seconds": round(elapsed, 3),
    }
    atomic_write(output / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest
