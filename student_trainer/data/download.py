"""Downloading data sets from the Hugging Face hub (streaming) into jsonl, resumably.

A registry names good public sets by category. Each set streams record by record into
``{out}/{category}/{name}.jsonl.partial``; a run that stops can be started again and continues
after the last complete line; when the set (or ``--max-examples``) is done the file is renamed to
``{name}.jsonl``. A local dataset directory or data file goes through the very same code path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: hub id (or local path), optional config and split, license, format note."""

    path: str
    license: str
    config: str | None = None
    split: str = "train"
    description: str = ""

    @property
    def name(self) -> str:
        base = Path(self.path).name if os.path.exists(self.path) else self.path.replace("/", "__")
        return f"{base}__{self.config}" if self.config else base


REGISTRY: dict[str, list[DatasetSpec]] = {
    "instruction_chat": [
        DatasetSpec("databricks/databricks-dolly-15k", "CC BY-SA 3.0", description="15k human-written instruction/response pairs"),
        DatasetSpec("HuggingFaceTB/smoltalk", "Apache-2.0", config="all", description="1M synthetic chat conversations (SmolLM2's SFT mix)"),
        DatasetSpec("tatsu-lab/alpaca", "CC BY-NC 4.0", description="52k Alpaca instructions (non-commercial)"),
    ],
    "general_text": [
        DatasetSpec("HuggingFaceFW/fineweb-edu", "ODC-By 1.0", config="sample-10BT", description="educational web text"),
        DatasetSpec("wikimedia/wikipedia", "CC BY-SA 3.0 / GFDL", config="20231101.en", description="English Wikipedia"),
    ],
    "code": [
        DatasetSpec("sahil2801/CodeAlpaca-20k", "CC BY 4.0", description="20k code instructions (Alpaca format)"),
        DatasetSpec("ise-uiuc/Magicoder-OSS-Instruct-75K", "MIT", description="75k code problems and solutions"),
    ],
    "math": [
        DatasetSpec("openai/gsm8k", "MIT", config="main", description="8.8k grade-school math word problems"),
        DatasetSpec("meta-math/MetaMathQA", "MIT", description="395k augmented math questions and answers"),
    ],
}

# Columns renamed so that preprocessing recognises the format (e.g. gsm8k's question/answer).
_RENAMES = {("question", "answer"): ("prompt", "completion"), ("query", "response"): ("prompt", "completion"),
            ("problem", "solution"): ("prompt", "completion")}


class DownloadError(RuntimeError):
    """A data set could not be fetched; the message says why and what to do instead."""


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    for (a, b), (x, y) in _RENAMES.items():
        if a in record and b in record and x not in record and "instruction" not in record:
            renamed = {key: value for key, value in record.items() if key not in (a, b)}
            return {**renamed, x: record[a], y: record[b]}
    return record


def check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail fast (instead of ~25 s of retries inside ``datasets``) when the hub cannot be reached."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise DownloadError(
            f"cannot reach the Hugging Face hub at {endpoint} ({type(exc).__name__}: {exc}). This machine may be "
            "offline: copy the data files here and pass them to `retnet-distill preprocess --input`, or pass a "
            "local dataset folder or file to `retnet-distill download --dataset PATH`."
        ) from exc


def _count_lines(path: Path) -> int:
    """Complete lines in ``path``; a half-written last line (a killed run) is cut off."""
    if not path.exists():
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        complete = data.rfind(b"\n") + 1
        if complete != len(data):
            fh.truncate(complete)
    return data[:complete].count(b"\n")


def _open_stream(spec: DatasetSpec) -> Iterable[dict[str, Any]]:
    import datasets

    local = Path(spec.path)
    if local.is_file():  # a single data file: let datasets pick the builder by its suffix
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}.get(local.suffix)
        if builder is None:
            raise DownloadError(f"{local}: unknown data file type {local.suffix!r}")
        return datasets.load_dataset(builder, data_files=str(local), split=spec.split, streaming=True)
    if not local.exists():
        check_hub_reachable()
    try:
        return datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
    except (ConnectionError, OSError) as exc:
        raise DownloadError(f"could not open {spec.path}: {exc}") from exc


def download(
    spec: DatasetSpec,
    out_dir: str | Path,
    category: str = "custom",
    max_examples: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Stream ``spec`` into ``out_dir/category/name.jsonl`` (resuming a ``.partial`` file); returns its path."""
    folder = Path(out_dir) / category
    folder.mkdir(parents=True, exist_ok=True)
    final, partial = folder / f"{spec.name}.jsonl", folder / f"{spec.name}.jsonl.partial"
    if final.exists():
        return final
    done = _count_lines(partial)
    if max_examples is not None and done >= max_examples:
        partial.replace(final)
        return final
    stream = _open_stream(spec)
    if done:
        stream = stream.skip(done)
    written = done
    with open(partial, "a", encoding="utf-8") as fh:
        for record in stream:
            fh.write(json.dumps(_normalise(dict(record)), ensure_ascii=False, default=str) + "\n")
            written += 1
            if on_progress is not None and written % 100 == 0:
                on_progress(written)
            if max_examples is not None and written >= max_examples:
                break
        fh.flush()
        os.fsync(fh.fileno())
    partial.replace(final)
    (folder / f"{spec.name}.jsonl.source").write_text(  # not *.json: preprocess must not read it as data
        json.dumps({"path": spec.path, "config": spec.config, "split": spec.split, "license": spec.license, "examples": written}, indent=2)
    )
    return final
