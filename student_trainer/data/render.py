"""Documents to tokens with a loss mask: chat-template rendering that marks assistant tokens.

``apply_chat_template(..., return_assistant_tokens_mask=True)`` needs ``{% generation %}`` markers
that most templates (SmolLM2's included) lack; transformers then only warns and returns an
all-zero mask. So we derive the mask ourselves: render the conversation turn by turn, take the
character span each assistant turn adds (its content and its end-of-turn marker, not the
``<|im_start|>assistant`` header, which ``add_generation_prompt`` puts in the prompt), tokenize
the whole conversation once with offsets, and mark the tokens that start inside those spans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from student_trainer.data.formats import Document, InvalidRecord

log = logging.getLogger(__name__)

# Used only when a tokenizer has no chat template of its own (a warning says so).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizedDocument:
    """``tokens [n]`` int32 and ``mask [n]`` uint8, where ``mask[t] = 1`` makes token ``t`` a target."""

    tokens: np.ndarray
    mask: np.ndarray


class DocumentTokenizer:
    """Turns :class:`Document` objects into token ids and loss masks with a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("preprocessing needs a fast (Rust) tokenizer for offset mappings; this one is slow")
        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            log.warning("tokenizer has no chat template; conversations are rendered as ChatML")
            tokenizer.chat_template = CHATML_TEMPLATE
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def _render(self, turns: tuple[tuple[str, str], ...], generation_prompt: bool = False) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def assistant_spans(self, turns: tuple[tuple[str, str], ...]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans ``[start, end)`` of its assistant turns."""
        text = self._render(turns)
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            if i == 0:
                raise InvalidRecord("conversation starts with an assistant turn; expected a user (or system) turn first")
            before = self._render(turns[:i], generation_prompt=True)
            through = self._render(turns[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise InvalidRecord(
                    "the chat template does not render turn by turn as a prefix of the whole conversation, so "
                    "assistant tokens cannot be located; use a tokenizer whose template is prefix-stable"
                )
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, document: Document) -> TokenizedDocument:
        """Tokens and targets of one document (chat: assistant turns; text: every non-special token)."""
        if document.is_chat:
            text, spans = self.assistant_spans(document.turns)
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            tokens = np.asarray(encoded["input_ids"], dtype=np.int32)
            starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
            mask = np.zeros(len(tokens), dtype=np.uint8)
            for lo, hi in spans:
                mask[(starts >= lo) & (starts < hi)] = 1
        else:
            tokens = np.asarray(self.tokenizer(document.text, add_special_tokens=True)["input_ids"], dtype=np.int32)
            mask = (~np.isin(tokens, self.special_ids)).astype(np.uint8)
        if not mask.any():
            raise InvalidRecord("the document has no target tokens after tokenization")
        return TokenizedDocument(tokens=tokens, mask=mask)
