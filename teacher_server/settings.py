"""Server settings: the one place the environment is read (``TEACHER_*`` variables)."""

from __future__ import annotations

import difflib
import os
from typing import Literal, Mapping

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TeacherSettings(BaseSettings):
    """Every knob of the teacher service. ``TEACHER_<NAME>`` sets ``<name>`` (e.g. ``TEACHER_PORT``)."""

    # env_ignore_empty: `TEACHER_API_KEY=` (an empty line in an .env file) means "unset", not "the empty key".
    model_config = SettingsConfigDict(env_prefix="TEACHER_", extra="forbid", protected_namespaces=(), env_ignore_empty=True)

    model: str = Field("smollm2-135m-instruct", description="HF hub id, local dir, .gguf file, or smollm2-135m-instruct (embedded)")
    engine: Literal["hf", "vllm"] = Field("hf", description="hf (CPU or CUDA) or vllm (CUDA, T=1 only, own env)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    torch_threads: int = Field(0, ge=0, description="CPU threads of the engine (0: torch's default); 1 helps on busy shared hosts")
    model_cache_dir: str = Field("~/.cache/retnet-distill/models", description="where GGUF models are converted to safetensors once")
    trust_remote_code: bool = Field(False, description="let transformers run a model repo's own code")
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    default_k: int = Field(64, ge=1, description="k when a request sends none")
    max_k: int = Field(1024, ge=1, description="largest k a request may ask for")
    max_score_ids: int = Field(256, ge=0, description="wire v1.1: most score_ids per position (m) a request may send; 0 turns scoring off")
    max_tokens_per_request: int = Field(32768, ge=1, description="more tokens in one request: 413")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies: 413")
    batch_max_tokens: int = Field(16384, ge=1, description="token budget of one dynamic batch")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="how long the first request of a batch waits for company")
    micro_batch_tokens: int = Field(8192, ge=1, description="padded tokens per transformer pass inside a batch")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm engine: share of GPU memory for weights and KV cache")
    vllm_max_model_len: int | None = Field(None, ge=2, description="vllm engine: context length (default: the model's); sequences may use one less")
    vllm_allow_padded_head: bool = Field(False, description="vllm engine: serve an LM head padded beyond the tokenizer (padded mass goes to the tail)")
    max_queued_tokens: int = Field(262144, ge=1, description="more tokens waiting than this: 429")
    max_queue_wait_s: float = Field(30.0, gt=0, description="work queued longer than this is answered 503 (Retry-After), not computed")
    max_reply_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="a reply larger than this (tokens x k x bytes per entry): 413")
    body_read_timeout_s: float = Field(30.0, gt=0, description="a request body not fully received in this time: 408")
    limit_concurrency: int | None = Field(512, ge=2, description="open connections (and tasks) beyond this get uvicorn's 503")
    timeout_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close after this many seconds")
    data_root: str = Field("data", description="cache jobs: datasets are names inside this folder")
    cache_root: str = Field("cache", description="cache jobs: outputs (and job state) go inside this folder")
    cache_job_busy_retry_s: float = Field(60.0, ge=0, description="cache jobs: how long a job retries while the queue is full (429) before it fails")
    api_key: SecretStr | None = Field(None, description="if set, /v1/* needs 'Authorization: Bearer <key>'")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    parent_pid: int | None = Field(None, ge=1, description="drain and exit when this process is gone (set by a parent that starts the service)")

    @model_validator(mode="after")
    def _check_limits(self) -> "TeacherSettings":
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        if self.max_tokens_per_request > self.max_queued_tokens:
            raise ValueError("max_tokens_per_request must not exceed max_queued_tokens, or big requests always get 429")
        return self


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per ``TEACHER_*`` variable that is no setting (pydantic-settings ignores those
    silently, so a typo such as ``TEACHER_MAXK`` would otherwise change nothing without a word)."""
    environ = os.environ if environ is None else environ
    known = {name.upper() for name in TeacherSettings.model_fields}
    problems = []
    for variable in sorted(environ):
        if not variable.startswith("TEACHER_") or variable[len("TEACHER_"):] in known:
            continue
        name = variable[len("TEACHER_"):]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean TEACHER_{close[0]}?" if close else ""
        if name.startswith(("SERVICE_", "PORT_")):
            hint += " (Kubernetes injects such variables for a Service named 'teacher': set enableServiceLinks: false)"
        problems.append(f"{variable} is not a teacher setting{hint}")
    return problems
