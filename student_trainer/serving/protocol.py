"""The OpenAI-compatible request and response shapes (the subset served), and the JSON error of OpenAI's shape."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class _Request(BaseModel):
    """Fields both routes take; unknown fields (``user``, penalties...) are ignored, as OpenAI's servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: go on past the end-of-text token (benchmarks of fixed lengths)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise ApiError(400, f"stop holds at most 4 strings, found {len(stops)}", param="stop")
        return stops


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string (a list of parts must be text parts)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"message content parts must be {{'type': 'text', 'text': ...}}, found type "
                               f"{part.get('type')!r}; this model reads text only", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]  # text, a list of one text, or token ids (as OpenAI's API takes them)

    def prompt_ids(self) -> list[int] | None:
        """The prompt's token ids when it was sent as ids, else None."""
        if isinstance(self.prompt, list) and self.prompt and all(isinstance(i, int) for i in self.prompt):
            return list(self.prompt)  # type: ignore[arg-type]
        return None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"prompt must be one string (or a list of one), found a list of {len(self.prompt)}; "
                           "send one request per prompt", param="prompt")
        return self.prompt[0]


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, found {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        found = first.get("input")
        shown = repr(found) if not isinstance(found, dict) or len(repr(found)) < 200 else "an object"
        raise ApiError(400, f"{param}: {first['msg']} (found {shown})", param=param) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(kind: Literal["chat", "text"]) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def completion_body(kind: Literal["chat", "text"], request_id: str, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streaming reply (``chat.completion`` or ``text_completion``)."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: Literal["chat", "text"], request_id: str, model: str, text: str | None,
               finish_reason: str | None, role: bool = False, usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One server-sent chunk (``chat.completion.chunk`` or ``text_completion``); with ``usage_counts`` the
    final usage chunk (no choices)."""
    if usage_counts is not None:
        choices: list[dict[str, Any]] = []
    elif kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body
