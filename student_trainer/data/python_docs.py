"""The embedded default corpus ``python-docs``: no download, shipped with every Python.

The standard library's ``pydoc_data.topics`` holds the English text of the language reference
topics (``help("assert")``, ...). Each section becomes a user question and an assistant answer,
in the chat ``messages`` format, so the main job and the CPU configs train on real instruction
data on any machine.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

CORPUS_NAME = "python-docs"
_HEADING = re.compile(r"^(.+)\n([*=\-~^]{3,})\s*$", re.MULTILINE)
_QUESTIONS = (
    "Explain {title} in Python.",
    "How does {title} work in Python?",
    "What does the Python language reference say about {title}?",
    "Describe {title} in Python, with the relevant syntax.",
)
_MAX_ANSWER_CHARS = 2400


def _sections(text: str) -> Iterator[tuple[str, str]]:
    """(title, body) for every underlined heading of a topic."""
    matches = list(_HEADING.finditer(text))
    for i, match in enumerate(matches):
        if len(match.group(2).strip()) < len(match.group(1).strip()) // 2:
            continue  # a line of dashes inside a table, not a heading underline
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        if body:
            yield match.group(1).strip(), body


def _parts(body: str) -> list[str]:
    """Split a long answer at paragraph breaks into parts of at most ~_MAX_ANSWER_CHARS."""
    parts, current = [], ""
    for paragraph in body.split("\n\n"):
        if current and len(current) + len(paragraph) > _MAX_ANSWER_CHARS:
            parts.append(current.strip())
            current = ""
        current += paragraph + "\n\n"
    if current.strip():
        parts.append(current.strip())
    return parts


def python_docs_conversations() -> Iterator[dict]:
    """``{"messages": [user, assistant]}`` records, in a fixed order."""
    from pydoc_data.topics import topics

    count = 0
    for topic in sorted(topics):
        for title, body in _sections(topics[topic]):
            parts = _parts(body)
            for number, part in enumerate(parts, start=1):
                subject = "the" + title[3:] if title.startswith("The ") else title
                question = _QUESTIONS[count % len(_QUESTIONS)].format(title=subject)
                if len(parts) > 1:
                    question += f" (part {number} of {len(parts)})"
                count += 1
                yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": part}]}


def write_python_docs(folder: str | Path) -> Path:
    """Write the corpus as jsonl (once per Python version) and return its path."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{CORPUS_NAME}-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in python_docs_conversations():
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(path)
    return path


def python_docs_shards(data_dir: str | Path, tokenizer: str, max_seq_length: int, model_cache_dir: str,
                       progress: bool = True) -> Path:
    """The ``python-docs`` shard folder for ``tokenizer`` at ``max_seq_length``, built once under
    ``data_dir`` (5% of the documents held out as ``val``); the trainer and the teacher finetuner
    share it."""
    from student_trainer.data.preprocess import PreprocessConfig, preprocess

    slug = "".join(c if c.isalnum() else "-" for c in Path(tokenizer).name)
    folder = Path(data_dir) / f"{CORPUS_NAME}-{slug}-{max_seq_length}"
    if not (folder / "manifest.json").is_file():
        preprocess(PreprocessConfig(inputs=[CORPUS_NAME], output=str(folder), tokenizer=tokenizer,
                                    max_seq_length=max_seq_length, val_fraction=0.05,
                                    model_cache_dir=model_cache_dir, progress=progress))
    return folder
