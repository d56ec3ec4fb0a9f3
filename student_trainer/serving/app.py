"""The FastAPI app of ``retnet-distill serve``: OpenAI-compatible routes over the continuous-batching engine.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /ready``, ``GET /metrics`` (Prometheus). Errors are OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from student_trainer.serving.engine import (Engine, EngineFull, Event, Generation, SamplingParams,
                                            set_malloc_mmap_threshold)
from student_trainer.serving.loading import LoadedModel, load_model
from student_trainer.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, chunk_body,
                                              completion_body, error_body, new_id, parse, usage)
from student_trainer.serving.settings import ServeSettings

log = logging.getLogger(__name__)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics")
MAX_BODY_BYTES = 16 * 1024 * 1024


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("student_serve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.tokens = Counter("student_serve_tokens_generated", "tokens sampled", registry=self.registry)
        self.prompt_tokens = Counter("student_serve_prompt_tokens", "prompt tokens prefilled", registry=self.registry)
        self.active_streams = Gauge("student_serve_active_streams", "streaming responses open", registry=self.registry)
        self.active_requests = Gauge("student_serve_active_requests", "requests decoding (rows of the batch)",
                                     registry=self.registry)
        self.waiting_requests = Gauge("student_serve_waiting_requests", "requests queued or prefilling",
                                      registry=self.registry)
        self.batch_size = Gauge("student_serve_batch_size", "rows of the last decode step", registry=self.registry)
        self.batch_rows = Histogram("student_serve_batch_rows", "rows per decode step", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    def on_step(self, rows: int) -> None:
        self.tokens.inc(rows)
        self.batch_size.set(rows)
        self.batch_rows.observe(rows)


class CountRequests:
    """Pure ASGI middleware: counts every response by route and status (keeps streaming and disconnects intact)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


class ServerState:
    """What the routes share: settings, the loaded model and its engine (None while loading), metrics."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings, self.metrics = settings, Metrics()
        self.model_id = settings.served_model_id
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None

    def serve(self, loaded: LoadedModel) -> None:
        s = self.settings
        engine = Engine(loaded.student, loaded.tokenizer, s.max_batch_size, s.prefill_tokens, s.max_waiting_requests,
                        self.metrics.on_step, s.prefill_batch_tokens, s.release_prefill_memory)
        self.metrics.active_requests.set_function(lambda: len(engine.active))
        self.metrics.waiting_requests.set_function(lambda: engine.waiting)
        engine.start()
        self.loaded, self.engine = loaded, engine

    def load(self) -> None:
        try:
            if self.settings.torch_threads:
                import torch

                torch.set_num_threads(self.settings.torch_threads)
            s = self.settings
            self.serve(load_model(s.checkpoint, s.tokenizer, s.device, s.model_cache_dir))
            log.info("serving %s as %r", s.checkpoint, self.model_id)
        except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
            log.exception("cannot load %s", self.settings.checkpoint)
            self.load_error = f"cannot load {self.settings.checkpoint}: {exc}"


def create_app(settings: ServeSettings, loaded: LoadedModel | None = None) -> FastAPI:
    """The app; ``loaded`` serves an already loaded model, else ``settings.checkpoint`` loads in the background
    (``/health`` answers at once, ``/ready`` turns 200 once it serves)."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loaded is not None:
            state.serve(loaded)
        else:
            threading.Thread(target=state.load, name="student-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.close()

    app = FastAPI(title="retnet-distill student (OpenAI-compatible)", lifespan=lifespan)
    app.state.serve = state
    app.add_middleware(CountRequests, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal server error (the traceback is in the server log)", "server_error"),
                            status_code=500)

    def check_key(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
            raise ApiError(401, "the API key is not valid for this server", code="invalid_api_key")

    def engine() -> Engine:
        if state.engine is None:
            raise ApiError(503, state.load_error or "the model is still loading; retry when GET /ready answers 200",
                           error_type="server_error", code="not_ready")
        return state.engine

    async def read_json(request: Request) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body has {len(body)} bytes, more than this server's {MAX_BODY_BYTES}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object with "
                           "Content-Type: application/json") from None

    def sampling(req: Any, max_tokens: int | None) -> SamplingParams:
        if req.model != state.model_id:
            raise ApiError(404, f"model {req.model!r} does not exist here; this server serves {state.model_id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        if req.n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), found {req.n}; send n requests instead", param="n")
        max_tokens = max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}, more than this server's limit of "
                           f"{settings.max_tokens_limit} (STUDENT_SERVE_MAX_TOKENS_LIMIT)", param="max_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop=req.stop_strings(), ignore_eos=req.ignore_eos)

    def check_prompt(ids: list[int], param: str) -> list[int]:
        tokenizer = engine().tokenizer
        if not ids:
            if tokenizer.bos_token_id is None:
                raise ApiError(400, f"{param} is empty (no tokens) and the tokenizer has no BOS token to start from",
                               param=param)
            ids = [tokenizer.bos_token_id]
        if len(ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"{param} has {len(ids)} tokens, more than this server's limit of "
                           f"{settings.max_prompt_tokens} (STUDENT_SERVE_MAX_PROMPT_TOKENS)", param=param)
        return ids

    async def answer(request: Request, kind: Literal["chat", "text"], ids: list[int], params: SamplingParams,
                     include_usage: bool, stream: bool) -> Response:
        try:
            generation = engine().submit(ids, params)
        except EngineFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later or raise STUDENT_SERVE_MAX_WAITING_REQUESTS",
                           error_type="server_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        state.metrics.prompt_tokens.inc(len(ids))
        request_id = new_id(kind)
        if stream:
            state.metrics.active_streams.inc()
            return StreamingResponse(sse(generation, kind, request_id, len(ids), include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts: list[str] = []
        try:
            while True:
                event = await generation.next_event(0.5)
                if event is None:
                    if await request.is_disconnected():  # nobody will read the answer: its row leaves the batch
                        return Response(status_code=499)
                    continue
                check_event(event)
                parts.append(event.text)
                if event.finish_reason is not None:
                    return JSONResponse(completion_body(kind, request_id, state.model_id, "".join(parts),
                                                        event.finish_reason, len(ids), event.completion_tokens))
        finally:
            generation.cancel()

    def check_event(event: Event) -> None:
        if event.error is not None:
            raise ApiError(500, event.error, error_type="server_error")

    async def sse(generation: Generation, kind: Literal["chat", "text"], request_id: str, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events; a client that disconnects cancels this generator, and so its request."""
        model = state.model_id
        try:
            if kind == "chat":
                yield _data(chunk_body(kind, request_id, model, None, None, role=True))
            async for event in generation.events():
                if event.error is not None:
                    yield _data(error_body(event.error, "server_error"))
                    break
                if event.text or event.finish_reason is not None:
                    yield _data(chunk_body(kind, request_id, model, event.text, event.finish_reason))
                if event.finish_reason is not None and include_usage:
                    counts = usage(prompt_tokens, event.completion_tokens)
                    yield _data(chunk_body(kind, request_id, model, None, None, usage_counts=counts))
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()
            state.metrics.active_streams.dec()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        params = sampling(req, req.max_completion_tokens or req.max_tokens)
        tokenizer = engine().tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use POST /v1/completions with a prompt",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the template refuses these messages (e.g. role order)
            raise ApiError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None
        ids = check_prompt(tokenizer(rendered, add_special_tokens=False)["input_ids"], "messages")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, "chat", ids, params, include_usage, req.stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        params = sampling(req, req.max_tokens)
        ids = req.prompt_ids()
        if ids is not None:
            vocab = len(engine().tokenizer)
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids must be in [0, {vocab}) (the tokenizer's vocabulary), found "
                               f"{bad[:5]}", param="prompt")
        else:
            ids = engine().tokenizer(req.prompt_text())["input_ids"]
        ids = check_prompt(ids, "prompt")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, "text", ids, params, include_usage, req.stream)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "retnet-distill"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error:
            return JSONResponse(error_body(state.load_error, "server_error"), status_code=500)
        if state.engine is not None and not state.engine.alive:
            return JSONResponse(error_body("the decode loop has stopped", "server_error"), status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.engine is None:
            message = state.load_error or "loading the model"
            return JSONResponse(error_body(message, "server_error", code="not_ready"), status_code=503)
        return JSONResponse({"status": "ready", "model": state.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def run(settings: ServeSettings) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn)."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if set_malloc_mmap_threshold(settings.malloc_mmap_threshold):
        log.info("glibc mmap threshold fixed at %d bytes", settings.malloc_mmap_threshold)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
