"""Serving settings: the one place the ``STUDENT_SERVE_*`` environment is read."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal, Mapping

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "STUDENT_SERVE_"


class ServeSettings(BaseSettings):
    """Every knob of ``retnet-distill serve``. ``STUDENT_SERVE_<NAME>`` sets ``<name>`` (e.g. ``STUDENT_SERVE_PORT``);
    command-line flags override the environment."""

    # env_ignore_empty: `STUDENT_SERVE_API_KEY=` (an empty line in an .env file) means "unset", not "the empty key".
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=(), env_ignore_empty=True)

    checkpoint: str = Field("", description="a run folder, checkpoints/step-N, a student folder or an HF export folder")
    tokenizer: str | None = Field(None, description="the teacher's tokenizer (default: the run's teacher_model, or the export's own)")
    model_id: str | None = Field(None, description="the model name clients send and /v1/models lists (default: the folder's name)")
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(8001, ge=0, le=65535, description="bind port")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="CPU threads of the decode loop (0: torch's default)")
    malloc_mmap_threshold: int = Field(
        0, ge=0, le=32 << 20, description="glibc only: fix the mmap threshold at this many bytes (e.g. 1048576), so "
        "every larger activation is mmapped and unmapped when freed: the RSS stays flat over prompt lengths, at the cost "
        "of slower prefill (1.3-1.4x here); 0: glibc's adaptive threshold (at most 32 MiB, glibc's limit)")
    release_prefill_memory: bool = Field(
        True, description="glibc only: malloc_trim after every prefill forward, so the heap gives the freed prefill "
        "activations back to the OS and the RSS does not keep the longest prompt's working memory")
    model_cache_dir: str = Field("~/.cache/retnet-distill/models", description="where GGUF tokenizers are converted once")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sends none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for (more: 400)")
    max_prompt_tokens: int = Field(32768, ge=1, description="longer prompts: 400")
    max_batch_size: int = Field(64, ge=1, description="most requests decoding together; later ones wait for a free row")
    prefill_tokens: int = Field(512, ge=1, description="prompt tokens prefilled per decode step while streams decode "
                                "(chunked prefill: bounds how long a new long prompt delays the running streams)")
    prefill_batch_tokens: int = Field(4096, ge=1, description="most prompt tokens in one prefill forward while no "
                                      "stream decodes (bounds the server's memory whatever the batch and context)")
    max_waiting_requests: int = Field(256, ge=1, description="requests queued for a free row; more: 429")
    api_key: SecretStr | None = Field(None, description="if set, /v1/* needs 'Authorization: Bearer <key>'")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _check(self) -> "ServeSettings":
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens_limit "
                             f"({self.max_tokens_limit})")
        return self

    @property
    def served_model_id(self) -> str:
        """``model_id``, else the checkpoint folder's name (a ``checkpoints/step-N/model`` path names its run)."""
        if self.model_id:
            return self.model_id
        path = Path(self.checkpoint).resolve()
        if path.name == "model" and path.parent.parent.name == "checkpoints":
            path = path.parent
        if path.parent.name == "checkpoints":
            return f"{path.parent.parent.name}-{path.name}"
        return path.name or "student"


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per ``STUDENT_SERVE_*`` variable that is no setting (pydantic-settings ignores those silently,
    so a typo would otherwise change nothing)."""
    environ = os.environ if environ is None else environ
    known = {name.upper() for name in ServeSettings.model_fields}
    problems = []
    for variable in sorted(environ):
        if variable.startswith(ENV_PREFIX) and variable[len(ENV_PREFIX):] not in known:
            close = difflib.get_close_matches(variable[len(ENV_PREFIX):], known, n=1)
            hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            problems.append(f"{variable} is not a serve setting{hint}")
    return problems
