"""Dynamic batching: concurrent requests share one engine pass, up to a token budget and a short wait.

Requests are validated before they get here, so a bad request never reaches a batch. If a batch
still fails in the engine, each of its requests is retried alone, so only the culprit fails.

Queued work is dropped, never computed, when its client disconnects (abandoned work used to delay
every later request: 8 abandoned 1,024-token requests cost the next one 32 s) or when it has waited
longer than ``max_queue_wait_s`` (answered 503 with Retry-After: a client that waited that long has
likely timed out already, and computing it late only delays the requests behind it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from teacher_server.engines.base import EngineRequest, TopKEngine
from teacher_server.engines.topk_math import TopKRows
from teacher_server.errors import ClientGone, EngineFailure, NotReady, Overloaded, QueueTimeout
from teacher_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# How often a waiting request checks that its client is still there and its wait not over: a
# disconnect costs at most this much queue time, and 10 checks a second per waiter cost nothing.
POLL_S = 0.1


@dataclass
class _Pending:
    request: EngineRequest
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    queued: bool = True  # still in the queue (False once taken into a batch or dropped)


@dataclass
class BatchTiming:
    queue_ms: float
    compute_ms: float


class DynamicBatcher:
    """Coalesces ``submit`` calls into engine passes of at most ``max_batch_tokens`` tokens.

    The first request of a batch waits at most ``max_wait_s`` for company; while the engine is
    busy, newcomers queue and go into the next pass. The engine runs in one worker thread, so
    the event loop keeps answering (health checks, metrics, decoding) during a pass.
    """

    def __init__(
        self,
        engine: TopKEngine,
        metrics: ServerMetrics,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queued_tokens: int,
        max_queue_wait_s: float = float("inf"),
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queued_tokens = max_queued_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self._pending: collections.deque[_Pending] = collections.deque()
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task | None = None
        self._in_flight: list[_Pending] = []  # the batch in the engine now

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Stop taking batches; requests still waiting (or cut off mid-pass) get 503."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for item in [*self._in_flight, *self._pending]:
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down; retry on another replica"))
        self._pending.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)  # the running pass ends off the event loop

    async def submit(
        self, request: EngineRequest, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> tuple[TopKRows, BatchTiming]:
        """Queue ``request`` and wait for its rows.

        ``is_disconnected`` (e.g. Starlette's ``request.is_disconnected``) is polled while the request
        waits; once it says yes, the request leaves the queue uncomputed.

        Raises:
            Overloaded: the queue already holds ``max_queued_tokens`` tokens.
            QueueTimeout: still queued after ``max_queue_wait_s``.
            ClientGone: the client disconnected while queued.
        """
        if self._queued_tokens + request.num_tokens > self.max_queued_tokens:
            raise Overloaded(
                f"{self._queued_tokens} tokens are already waiting (limit {self.max_queued_tokens}); retry shortly"
            )
        item = _Pending(request, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._queued_tokens += request.num_tokens
        self._update_queue_gauges()
        self._arrived.set()
        try:
            while True:
                done, _ = await asyncio.wait({item.future}, timeout=POLL_S)
                if done:
                    return item.future.result()
                if not item.queued:
                    continue  # in the engine now: the work is being done, so the answer is awaited
                if is_disconnected is not None and await is_disconnected():
                    self._drop(item)
                    self.metrics.abandoned.inc()
                    raise ClientGone("the client disconnected; its request was dropped uncomputed")
                waited = time.perf_counter() - item.enqueued
                if waited > self.max_queue_wait_s:
                    self._drop(item)
                    self.metrics.expired.inc()
                    raise QueueTimeout(
                        f"queued {waited:.1f} s, longer than this server's max_queue_wait_s of {self.max_queue_wait_s:g} s, "
                        "so it was not computed; the server is overloaded: retry after a pause, or send smaller requests"
                    )
        except asyncio.CancelledError:  # the awaiting task was cancelled: nobody wants the answer
            if item.queued:
                self._drop(item)
                self.metrics.abandoned.inc()
            item.future.cancel()
            raise

    def _drop(self, item: _Pending) -> None:
        """Take a still-queued item out of the queue (its future is left to the caller)."""
        self._pending.remove(item)
        item.queued = False
        self._queued_tokens -= item.request.num_tokens
        self._update_queue_gauges()

    def _update_queue_gauges(self) -> None:
        self.metrics.queue_requests.set(len(self._pending))
        self.metrics.queue_tokens.set(self._queued_tokens)

    async def _next_batch(self) -> list[_Pending]:
        while True:  # items can leave the queue while the batch waits for company: start over then
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending[0]
            deadline = first.enqueued + self.max_wait_s
            while self._queued_tokens < self.max_batch_tokens and (left := deadline - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=min(left, POLL_S))
                except TimeoutError:
                    pass
                if not self._pending or self._pending[0] is not first:
                    break
            if self._pending and self._pending[0] is first:
                break
        batch = [self._pending.popleft()]
        tokens = batch[0].request.num_tokens
        while self._pending and tokens + self._pending[0].request.num_tokens <= self.max_batch_tokens:
            batch.append(self._pending.popleft())
            tokens += batch[-1].request.num_tokens
        for item in batch:
            item.queued = False
        self._queued_tokens -= tokens
        self._update_queue_gauges()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [p for p in batch if not p.future.done()]  # clients that went away are dropped
            if not live:
                continue
            started = time.perf_counter()
            self._in_flight = live
            try:
                results = await loop.run_in_executor(self._executor, self.engine.topk, [p.request for p in live])
            except Exception:
                log.exception("engine failed on a batch of %d requests; retrying them one by one", len(live))
                results = [await self._run_alone(loop, p) for p in live]
            seconds = time.perf_counter() - started
            self.metrics.observe_batch(len(live), sum(p.request.num_tokens for p in live), seconds)
            for item, rows in zip(live, results):
                if item.future.done() or rows is None:
                    continue
                timing = BatchTiming(queue_ms=(started - item.enqueued) * 1e3, compute_ms=seconds * 1e3)
                item.future.set_result((rows, timing))
            self._in_flight = []

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, item: _Pending) -> TopKRows | None:
        try:
            return (await loop.run_in_executor(self._executor, self.engine.topk, [item.request]))[0]
        except Exception as exc:  # the kind of failure goes back to this client; its text (paths, internals) to the log
            log.exception("engine failed on one request")
            if not item.future.done():
                item.future.set_exception(EngineFailure(
                    f"the engine failed on this request ({type(exc).__name__}; the server's log has the details); "
                    "other requests are served"))
            return None
