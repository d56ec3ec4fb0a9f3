"""Reading raw records from jsonl, json, parquet and text files or folders (recursive, sorted)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}


class InputError(ValueError):
    """A problem with an input file, naming the file and (where there is one) the line or row."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.reason = str(path), line, message


@dataclass(frozen=True)
class RawRecord:
    """One record and where it came from (``line`` is 1-based for jsonl, the row/item index otherwise)."""

    path: str
    line: int
    value: Any  # the parsed object, or an InputError for a line that does not parse


def list_input_files(inputs: list[str | Path]) -> list[Path]:
    """Every readable data file under ``inputs`` (files as given, folders recursively), sorted.

    Raises:
        InputError: a path does not exist, a file has an unknown suffix, or nothing is found at all.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise InputError(path, None, f"unknown file type {path.suffix!r}; expected one of {sorted(SUFFIXES)}")
            files.append(path)
        else:
            raise InputError(path, None, "no such file or folder")
    if not files:
        raise InputError(", ".join(map(str, inputs)) or "(none)", None, f"no input files found (looked for {sorted(SUFFIXES)})")
    return files


def file_fingerprint(path: Path) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of one input file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield RawRecord(str(path), number, json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawRecord(str(path), number, InputError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})"))


def _read_json(path: Path) -> Iterator[RawRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"not valid JSON ({exc.msg})") from exc
    items = data if isinstance(data, list) else [data]
    for index, item in enumerate(items):
        yield RawRecord(str(path), index, item)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(path, None, f"not a readable parquet file ({exc})") from exc
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            yield RawRecord(str(path), row, item)
            row += 1


def _read_text(path: Path) -> Iterator[RawRecord]:
    yield RawRecord(str(path), 1, {"text": path.read_text(encoding="utf-8", errors="strict")})


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "text": _read_text}


def read_records(files: list[Path]) -> Iterator[RawRecord]:
    """Records of every file in order; a jsonl line that does not parse comes as an InputError value."""
    for path in files:
        try:
            yield from _READERS[SUFFIXES[path.suffix.lower()]](path)
        except UnicodeDecodeError as exc:
            raise InputError(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
