"""Record formats of instruction and text data sets, and their conversion to one canonical form.

Every record becomes a :class:`Document`: either a conversation (a list of ``{"role", "content"}``
turns, rendered later with the teacher's chat template, loss on assistant turns only) or plain
text (loss on every token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "dolly", "prompt_completion", "text")

_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
}
_ROLES = {"system", "user", "assistant"}


class InvalidRecord(ValueError):
    """A record that cannot become a document; the message says which field is wrong."""


@dataclass(frozen=True)
class Document:
    """A conversation (``turns``) or plain ``text``; exactly one of them is set."""

    turns: tuple[tuple[str, str], ...] | None = None
    text: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.turns is not None


def detect_format(record: Any) -> str:
    """Name of the format of ``record`` (one of :data:`FORMATS`), by its keys."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"expected a JSON object, found {type(record).__name__}")
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise InvalidRecord(
        f"unknown format: keys {sorted(keys)}; expected one of messages, conversations, instruction+output "
        "(Alpaca), instruction+response (Dolly), prompt+completion, or text (or force one with --format)"
    )


def _text_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in record else type(value).__name__
        raise InvalidRecord(f"field '{key}' must be a string, found {found}")
    return value


def _conversation(turns: list[tuple[str, str]]) -> Document:
    if not turns:
        raise InvalidRecord("empty conversation")
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise InvalidRecord("conversation has no non-empty assistant turn: nothing to learn from")
    for role, _ in turns:
        if role not in _ROLES:
            raise InvalidRecord(f"unknown role {role!r}; expected system, user or assistant")
    return Document(turns=tuple(turns))


def _user_then_assistant(prompt: str, answer: str, system: str = "") -> Document:
    if not prompt.strip():
        raise InvalidRecord("the prompt/instruction is empty")
    if not answer.strip():
        raise InvalidRecord("the answer/response is empty")
    turns = [("system", system)] if system.strip() else []
    return _conversation([*turns, ("user", prompt), ("assistant", answer)])


def to_document(record: Any, fmt: str | None = None) -> Document:
    """Convert one record to a :class:`Document`; ``fmt`` forces a format, else it is detected.

    Raises:
        InvalidRecord: the record does not fit the format (missing fields, empty conversation, ...).
    """
    fmt = fmt or detect_format(record)
    if not isinstance(record, dict):
        raise InvalidRecord(f"expected a JSON object, found {type(record).__name__}")
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise InvalidRecord("field 'messages' must be a list of {role, content}")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise InvalidRecord(f"messages[{i}] must be an object with string 'role' and 'content'")
            turns.append((message["role"], message["content"]))
        return _conversation(turns)
    if fmt == "sharegpt":
        conversations = record.get("conversations")
        if not isinstance(conversations, list):
            raise InvalidRecord("field 'conversations' must be a list of {from, value}")
        turns = []
        for i, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
                raise InvalidRecord(f"conversations[{i}] must be an object with string 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(turn["from"].lower())
            if role is None:
                raise InvalidRecord(f"conversations[{i}]: unknown speaker {turn['from']!r}")
            turns.append((role, turn["value"]))
        return _conversation(turns)
    if fmt == "alpaca":
        instruction, extra = _text_field(record, "instruction"), _text_field(record, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _user_then_assistant(prompt, _text_field(record, "output"), _text_field(record, "system", required=False))
    if fmt == "dolly":
        instruction, context = _text_field(record, "instruction"), _text_field(record, "context", required=False)
        prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
        return _user_then_assistant(prompt, _text_field(record, "response"))
    if fmt == "prompt_completion":
        return _user_then_assistant(_text_field(record, "prompt"), _text_field(record, "completion"))
    if fmt == "text":
        text = _text_field(record, "text")
        if not text.strip():
            raise InvalidRecord("field 'text' is empty")
        return Document(text=text)
    raise InvalidRecord(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
