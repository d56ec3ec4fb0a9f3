"""Fingerprints that let the trainer and the teacher check they speak about the same tokens."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of a tokenizer's id -> token mapping (vocab plus added tokens), hex.

    Works on any object with ``get_vocab()`` (every Hugging Face tokenizer). Two tokenizers with
    the same fingerprint map every id to the same token string, which is what top-k targets need;
    the hash ignores serialisation details that change between library versions.
    """
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps(by_id, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()
