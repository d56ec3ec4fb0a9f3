"""The FastAPI application: routes, auth, body limits, error mapping, model loading.

The model loads in a background thread after start-up, so ``/health`` answers at once and
``/ready`` turns 200 when the engine can serve. Every malformed body gets a 4xx JSON error and an
unexpected exception a JSON 500; neither closes the keep-alive connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shared.errors import InvalidRequest, MalformedBody, RequestTooLarge, UnsupportedContentType, WireError
from shared.wire import (
    CONTRACT_VERSION,
    MIN_TEMPERATURE,
    PROTOCOL_VERSION,
    TopKResponse,
    decode_topk_request,
    encode_topk_response,
    error_body,
    format_from_content_type,
    max_body_bytes,
    max_score_entries,
    media_type,
    reply_bytes,
    response_format,
)
from teacher_server.batching import DynamicBatcher
from teacher_server.cache_jobs import CacheJobs
from teacher_server.docs import mount_offline_docs
from teacher_server.engines.base import EngineRequest, TopKEngine
from teacher_server.errors import BodyTimeout, ClientGone, NotReady, UnexpectedErrorGuard, Unauthorized, status_for
from teacher_server.metrics import ObserveRequests, ServerMetrics
from teacher_server.settings import TeacherSettings

log = logging.getLogger(__name__)

# Bodies above this are decoded in a worker thread: the event loop keeps answering (/health, other
# requests) meanwhile; smaller ones decode inline, where a thread hop would cost more than the parse.
_INLINE_DECODE_BYTES = 64 * 1024

_TOPK_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["input_ids"],
                    "properties": {
                        "input_ids": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                        "k": {"type": "integer", "minimum": 1},
                        "temperature": {"type": "number", "minimum": MIN_TEMPERATURE, "default": 1.0},
                        "score_ids": {
                            "type": "array",
                            "description": "v1.1: [B][L_i][m] ids whose log-probs to return (score_logprobs)",
                            "items": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                        },
                        "return_logsumexp": {"type": "boolean", "default": False,
                                             "description": "v1.1: also return logsumexp(logits / T) per position"},
                        "target_encoding": {"type": "string", "enum": ["fp16", "coded", "sampled"], "default": "fp16",
                                            "description": "v1.2: 'coded' (msgpack only) replies with one compact, "
                                                           "CRC-checked block 'targets_coded' (shared/wire_coded.py); "
                                                           "'sampled': k ids drawn per position, ids + counts"},
                        "sample_seed": {"type": "integer", "minimum": 0, "default": 0,
                                        "description": "v1.2, with 'sampled': seeds the draws (same body, same ids)"},
                        "mass_cutoff": {"type": "number", "minimum": 0, "exclusiveMaximum": 1,
                                        "description": "v1.2, with 'coded': drop each row's least likely ids while "
                                                       "their mass stays <= this, folded into the tail"},
                    },
                },
                "example": {"input_ids": [[504, 3575, 282, 4649, 314]], "k": 5, "temperature": 1.0},
            },
            "application/msgpack": {
                "schema": {"type": "string", "format": "binary", "description": "the same map, msgpack-encoded"}
            },
        },
    }
}


def build_engine(settings: TeacherSettings) -> TopKEngine:
    """The engine named by the settings (imported lazily: torch is slow to import)."""
    if settings.engine == "vllm":
        from teacher_server.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.model_cache_dir,
            max_k=settings.max_k,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.vllm_max_model_len,
            allow_padded_head=settings.vllm_allow_padded_head,
            trust_remote_code=settings.trust_remote_code,
        )
    import torch

    from teacher_server.engines.hf import HFEngine

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return HFEngine(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache_dir,
        micro_batch_tokens=settings.micro_batch_tokens,
        trust_remote_code=settings.trust_remote_code,
    )


class _ServerState:
    def __init__(self, settings: TeacherSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.engine: TopKEngine | None = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.cache_jobs = CacheJobs(settings.data_root, settings.cache_root, settings.max_k,
                                    busy_retry_s=settings.cache_job_busy_retry_s)

    def ready_batcher(self) -> DynamicBatcher:
        if self.batcher is None:
            why = f"loading the model failed: {self.load_error}" if self.load_error else "the model is still loading"
            raise NotReady(f"{why}; poll GET /ready")
        return self.batcher


def create_app(
    settings: TeacherSettings,
    engine: TopKEngine | None = None,
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Pass ``engine`` to serve an already-loaded engine (tests, direct embedding)."""
    state = _ServerState(settings)

    async def load_and_serve() -> None:
        try:
            state.engine = engine if engine is not None else await asyncio.to_thread(build_engine, settings)
        except Exception as exc:  # a server that cannot load its model says so on /ready and /health
            log.exception("could not load model %s", settings.model)
            state.load_error = f"{type(exc).__name__}: {exc}"
            if on_load_failure is not None:
                on_load_failure()
            return
        batcher = DynamicBatcher(
            state.engine,
            state.metrics,
            max_batch_tokens=settings.batch_max_tokens,
            max_wait_s=settings.batch_max_wait_ms / 1e3,
            max_queued_tokens=settings.max_queued_tokens,
            max_queue_wait_s=settings.max_queue_wait_s,
        )
        batcher.start()
        state.batcher = batcher
        log.info("ready: %s (vocab %d)", state.engine.model_name, state.engine.vocab_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load_and_serve())
        yield
        loader.cancel()
        state.cache_jobs.shutdown()  # jobs stop as 'interrupted' before the batcher they wait on stops
        if state.batcher is not None:
            await state.batcher.stop()

    app = FastAPI(
        title="retnet-distill teacher",
        version=CONTRACT_VERSION,
        description="Top-k teacher log-probabilities over msgpack (fast path) or JSON.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN: mount_offline_docs serves it locally
    )
    app.state.teacher = state
    mount_offline_docs(app)
    # Last added runs first: metrics see the guard's 500 too.
    app.add_middleware(UnexpectedErrorGuard)
    app.add_middleware(ObserveRequests, metrics=state.metrics)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError) -> JSONResponse:
        status = status_for(exc)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if status in (429, 503):
            headers = {"Retry-After": "1"}
        if status == 408:  # the rest of the body may still be on its way: this connection is done
            headers = {"Connection": "close"}
        return JSONResponse(error_body(exc.error_type, exc.message), status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body("http_error", str(exc.detail)), status_code=exc.status_code)

    def check_key(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
            raise Unauthorized("the API key is not valid for this server")

    async def read_body(request: Request, token_limit: int | None = None, fmt: str = "json", score_limit: int = 0) -> bytes:
        """The body, within ``max_body_bytes`` and ``body_read_timeout_s``. With ``token_limit``, also
        within the most bytes a valid request of that many tokens (and ``score_limit`` scored ids) can
        take (refused before reading)."""
        limits = [(settings.max_body_bytes, f"this server's limit of {settings.max_body_bytes} bytes")]
        if token_limit is not None:
            fit = max_body_bytes(fmt, token_limit, score_limit)
            scored = f" and {score_limit} scored ids (max_score_ids per token, within max_reply_bytes)" if score_limit else ""
            limits.append((fit, f"{fit} bytes, the most a {fmt} request of {token_limit} tokens (max_tokens_per_request){scored} "
                                "can take; send fewer tokens per request" + (", compact JSON or msgpack" if fmt == "json" else "")))
        declared = request.headers.get("content-length")
        for limit, why in limits:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise RequestTooLarge(f"body of {declared} bytes exceeds {why}")

        async def receive_all() -> bytes:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                for limit, why in limits:
                    if len(body) > limit:
                        raise RequestTooLarge(f"body exceeds {why}")
            return bytes(body)

        timeout = settings.body_read_timeout_s
        try:  # a half-sent body would otherwise hold this task (and its connection slot) forever
            return await asyncio.wait_for(receive_all(), timeout)
        except TimeoutError as exc:
            raise BodyTimeout(f"the request body did not arrive within {timeout:g} s (body_read_timeout_s); "
                              "send the whole body at once") from exc
        except ClientDisconnect as exc:
            state.metrics.abandoned.inc()
            raise ClientGone("the client disconnected while sending its body") from exc

    def check_reply_size(tokens: int, k: int, vocab_size: int, fmt: str, m: int = 0, logsumexp: bool = False) -> None:
        """Refuse up front a reply over ``max_reply_bytes`` (k=1024 made a 14 KB request a 36 MB reply);
        ``m`` scored ids per position (and a logsumexp) count like top-k entries."""
        limit, size = settings.max_reply_bytes, reply_bytes(tokens, k, vocab_size, fmt, m, logsumexp)
        if size <= limit:
            return
        scores = reply_bytes(tokens, 0, vocab_size, fmt, m, logsumexp) - reply_bytes(tokens, 0, vocab_size, fmt)
        fitting_k = max(1, (limit - scores) // max(1, reply_bytes(tokens, 1, vocab_size, fmt)))
        fitting_tokens = limit // reply_bytes(1, k, vocab_size, fmt, m, logsumexp)
        scored = f" and {m} score_ids" if m else ""
        raise RequestTooLarge(
            f"the {fmt} reply to {tokens} tokens at k={k}{scored} would take about {size} bytes, over this server's "
            f"max_reply_bytes of {limit}; ask for less: a smaller k (at most {fitting_k} for these tokens) "
            + ("or fewer score_ids per position, " if m else "")
            + f"or fewer tokens per request (at most {fitting_tokens} at k={k}{scored})"
            + ("; msgpack replies are several times smaller than JSON" if fmt == "json" else "")
        )

    @app.post("/v1/topk", openapi_extra=_TOPK_OPENAPI, summary="Top-k log-probabilities per position")
    async def topk(request: Request) -> Response:
        """Row t of each sequence is log p(. | x_0..x_t) at the requested temperature, plus the exact tail."""
        check_key(request)
        request_fmt = format_from_content_type(request.headers.get("content-type"))
        max_tokens, max_scores = settings.max_tokens_per_request, settings.max_score_ids
        # Room for scored ids in msgpack bodies only: parsing a JSON body holds the GIL (an 8 MB one
        # ~3 s here), so JSON keeps the v1 body limit and its score_ids must fit in it (curl-sized);
        # trainers send msgpack, which parses a packed tensor in microseconds.
        score_limit = max_score_entries(max_tokens, max_scores, settings.max_reply_bytes) if request_fmt == "msgpack" else 0
        body = await read_body(request, max_tokens, request_fmt, score_limit)
        batcher = state.ready_batcher()
        engine = batcher.engine

        def decode():
            decoded = decode_topk_request(body, request_fmt, max_tokens=max_tokens, max_score_ids=max_scores)
            decoded.validate(engine.vocab_size, settings.max_k, max_tokens, engine.max_sequence_length, max_scores)
            return decoded

        req = decode() if len(body) <= _INLINE_DECODE_BYTES else await asyncio.to_thread(decode)
        k = req.k if req.k is not None else min(settings.default_k, engine.vocab_size)
        fmt = response_format(request.headers.get("accept"), request_fmt)
        if req.target_encoding != "fp16" and fmt != "msgpack":
            raise InvalidRequest(f"target_encoding {req.target_encoding!r} replies are binary: accept application/msgpack")
        check_reply_size(req.num_tokens, k, engine.vocab_size, fmt, req.num_score_ids, req.return_logsumexp)
        sampled = req.target_encoding == "sampled"
        if sampled and not getattr(engine, "supports_sampling", True):
            raise InvalidRequest(f"this teacher's {settings.engine} engine cannot draw sampled targets (wire v1.2 "
                                 "'sampled'); ask for 'fp16' or 'coded', or use a teacher with TEACHER_ENGINE=hf")
        work = EngineRequest(req.sequences, k, req.temperature, req.score_ids, req.return_logsumexp,
                             sample_n=k if sampled else None, sample_seed=req.sample_seed)
        if hasattr(engine, "check_request"):  # an engine's own limits (vLLM: temperature 1 only) give 422, not 500
            engine.check_request(k, req.temperature, scores=work.wants_scores)
        if work.wants_scores and not getattr(engine, "supports_scoring", False):
            raise InvalidRequest(f"this teacher's {settings.engine} engine cannot serve score_ids or return_logsumexp "
                                 "(wire v1.1); leave them out, or use a teacher with TEACHER_ENGINE=hf")
        rows, timing = await batcher.submit(work, request.is_disconnected)
        response = TopKResponse(
            model=engine.model_name,
            tokenizer_sha256=engine.tokenizer_sha256,
            vocab_size=engine.vocab_size,
            k=k,
            temperature=req.temperature,
            lengths=[len(s) for s in req.sequences],
            indices=rows.indices,
            logprobs=rows.logprobs,
            tail_logprob=rows.tail_logprob,
            timing={"queue_ms": round(timing.queue_ms, 3), "compute_ms": round(timing.compute_ms, 3)},
            weights_fingerprint=engine.weights_fingerprint,
            score_logprobs=rows.score_logprobs if req.score_ids is not None else None,
            logsumexp=rows.logsumexp if req.return_logsumexp else None,
            target_encoding=req.target_encoding,
            mass_cutoff=req.mass_cutoff,
        )
        if fmt == "json" or req.target_encoding != "fp16":  # JSON or coding a big reply takes a while: keep the loop free
            payload = await asyncio.to_thread(encode_topk_response, response, fmt)
        else:
            payload = encode_topk_response(response, fmt)
        return Response(payload, media_type=media_type(fmt))

    @app.get("/v1/models", summary="The served teacher and this server's limits")
    async def models(request: Request) -> dict:
        check_key(request)
        engine = state.ready_batcher().engine
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "engine": settings.engine,
                    "device": engine.device,
                    "vocab_size": engine.vocab_size,
                    "tokenizer_sha256": engine.tokenizer_sha256,
                    "weights_fingerprint": engine.weights_fingerprint,
                    "max_sequence_length": engine.max_sequence_length,
                    "protocol": PROTOCOL_VERSION,
                    "contract_version": CONTRACT_VERSION,
                    "score_ids": bool(getattr(engine, "supports_scoring", False)) and settings.max_score_ids > 0,
                    "max_score_ids": settings.max_score_ids,
                    "default_k": settings.default_k,
                    "max_k": settings.max_k,
                    "max_tokens_per_request": settings.max_tokens_per_request,
                    "max_body_bytes": settings.max_body_bytes,
                    "max_reply_bytes": settings.max_reply_bytes,
                    "min_temperature": MIN_TEMPERATURE,
                    "max_queue_wait_s": settings.max_queue_wait_s,
                }
            ],
        }

    async def json_body(request: Request) -> object:
        if format_from_content_type(request.headers.get("content-type")) != "json":
            raise UnsupportedContentType("cache jobs take application/json")
        try:
            return json.loads(await read_body(request))
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply to parse
            raise MalformedBody(f"body is not valid json: {exc}") from exc

    @app.post("/v1/cache/jobs", status_code=202, summary="Start a cache-writer job (resumes an existing output)")
    async def create_cache_job(request: Request) -> JSONResponse:
        """Body: {dataset, output, split, k, temperature, shard_size, target_type, q8_step}; names are
        resolved inside TEACHER_DATA_ROOT and TEACHER_CACHE_ROOT."""
        check_key(request)
        state.ready_batcher()  # 503 while the model loads
        job = state.cache_jobs.create(await json_body(request), state.ready_batcher)
        return JSONResponse(job, status_code=202)

    @app.get("/v1/cache/jobs", summary="All cache jobs")
    async def list_cache_jobs(request: Request) -> dict:
        check_key(request)
        return {"jobs": [state.cache_jobs.public(job) for job in state.cache_jobs.jobs.values()]}

    @app.get("/v1/cache/jobs/{job_id}", summary="A cache job's state and progress")
    async def get_cache_job(job_id: str, request: Request) -> dict:
        check_key(request)
        return state.cache_jobs.public(state.cache_jobs.get_job(job_id))

    @app.delete("/v1/cache/jobs/{job_id}", summary="Cancel a cache job (the shards written stay valid)")
    async def cancel_cache_job(job_id: str, request: Request) -> dict:
        check_key(request)
        return state.cache_jobs.cancel(job_id)

    @app.post("/v1/cache/jobs/{job_id}/resume", status_code=202, summary="Continue an interrupted or cancelled job")
    async def resume_cache_job(job_id: str, request: Request) -> JSONResponse:
        check_key(request)
        return JSONResponse(state.cache_jobs.resume(job_id, state.ready_batcher), status_code=202)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> JSONResponse:
        if state.load_error:
            return JSONResponse(error_body("load_failed", state.load_error), status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", summary="Readiness: the model is loaded and the batcher runs")
    async def ready() -> JSONResponse:
        batcher = state.ready_batcher()
        return JSONResponse({"status": "ready", "model": batcher.engine.model_name})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
