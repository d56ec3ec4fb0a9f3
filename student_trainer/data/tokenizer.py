"""Loading the teacher's tokenizer by the same names the teacher service accepts."""

from __future__ import annotations

from typing import Any

from teacher_server.engines.model_source import resolve_model

DEFAULT_MODEL_CACHE_DIR = "~/.cache/retnet-distill/models"


def load_tokenizer(name: str, model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR) -> Any:
    """A Hugging Face tokenizer for a hub id, a local directory, a ``.gguf`` file or an alias
    such as ``smollm2-135m-instruct`` (converted once into the model cache, like the server does)."""
    from transformers import AutoTokenizer

    source = resolve_model(name, model_cache_dir)
    return AutoTokenizer.from_pretrained(source.path)


def stop_ids(tokenizer: Any) -> set[int]:
    """Ids that end an answer: EOS and the chat template's end-of-turn token when it has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids
