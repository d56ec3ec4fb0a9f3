"""Network mode: teacher targets from one or more teacher services over async HTTP (msgpack).

An ``httpx.AsyncClient`` (keep-alive) runs on a background event loop, so requests for the next
batches are in flight while the current step computes (:meth:`NetworkTeacher.prefetch`). Several
URLs share the load round-robin; a URL that fails is skipped for a while. Failed requests are
retried with exponential backoff and jitter (requests are idempotent), then
:class:`TeacherUnavailable` is raised. At start the teacher's tokenizer fingerprint and vocab size
are checked against the training data's.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from concurrent.futures import Future

import httpx
import numpy as np
import torch

from shared.wire import MSGPACK, decode_topk_response, encode_topk_request
from student_trainer.targets import TeacherTargets

_RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class TeacherUnavailable(RuntimeError):
    """No teacher URL answered within the retries; the message lists the last errors."""


class TeacherMismatch(RuntimeError):
    """The teacher service serves another tokenizer or vocabulary than the training data's."""


class NetworkTeacher:
    """Targets from teacher services at ``urls`` (e.g. ``["http://teacher:8000"]``).

    Args:
        urls: one or several teacher services; requests go round-robin to healthy ones.
        k, temperature: what every request asks for.
        tokenizer_sha256, vocab_size: the training data's; a teacher serving others is refused.
        api_key: sent as ``Authorization: Bearer``.
        connect_timeout, read_timeout: seconds.
        retries: attempts per request beyond the first (across URLs).
        backoff: base seconds of the exponential backoff (``backoff * 2**attempt``, capped at 10 s,
            plus jitter).
        deadline_s: keep retrying a request for at least this long (with no fallback teacher,
            a run rides out a teacher restart this way); 0: ``retries`` alone decide.
    """

    def __init__(self, urls: list[str], k: int, temperature: float, tokenizer_sha256: str, vocab_size: int,
                 api_key: str | None = None, connect_timeout: float = 5.0, read_timeout: float = 300.0,
                 retries: int = 4, backoff: float = 0.5, deadline_s: float = 0.0) -> None:
        if not urls:
            raise ValueError("teacher_url is empty: give at least one teacher service URL")
        self.urls = [url.rstrip("/") for url in urls]
        self.k, self.temperature, self.retries, self.backoff = k, temperature, retries, backoff
        self.deadline_s = deadline_s
        self.headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="network-teacher", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._call(self._make_client())
        self._next_url = itertools.cycle(range(len(self.urls)))
        self._down_until = [0.0] * len(self.urls)
        self._prefetched: dict[tuple, Future] = {}
        self.stats = {"requests": 0, "retries": 0, "bytes_received": 0, "latency_s": 0.0}
        info = self._check_identity(tokenizer_sha256, vocab_size)
        self.name = f"network:{info['id']}@{','.join(self.urls)}"
        self.vocab_size, self.tokenizer_sha256 = info["vocab_size"], info["tokenizer_sha256"]

    # -------------------------------------------------------------------------------- plumbing

    async def _make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self._timeout, limits=httpx.Limits(max_keepalive_connections=16))

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _check_identity(self, tokenizer_sha256: str, vocab_size: int) -> dict:
        for url in self.urls:
            try:
                reply = httpx.get(f"{url}/v1/models", headers=self.headers, timeout=self._timeout)
                reply.raise_for_status()
            except httpx.HTTPError as exc:
                raise TeacherUnavailable(f"teacher {url} did not answer GET /v1/models: {exc}") from exc
            info = reply.json()["data"][0]
            if info["tokenizer_sha256"] != tokenizer_sha256 or info["vocab_size"] != vocab_size:
                raise TeacherMismatch(
                    f"teacher {url} serves {info['id']} with tokenizer sha256 {info['tokenizer_sha256'][:12]}... and "
                    f"vocab {info['vocab_size']}, but the training data was tokenized with sha256 "
                    f"{tokenizer_sha256[:12]}... and vocab {vocab_size}; point the trainer at the teacher whose "
                    "tokenizer made the data, or preprocess the data with this teacher's tokenizer"
                )
        return info

    async def _request(self, body: bytes) -> bytes:
        errors: list[str] = []
        first_try = time.monotonic()
        for attempt in itertools.count():
            now = time.monotonic()
            candidates = [next(self._next_url) for _ in self.urls]
            index = next((i for i in candidates if self._down_until[i] <= now), candidates[0])
            url = self.urls[index]
            started = time.perf_counter()
            try:
                reply = await self._client.post(f"{url}/v1/topk", content=body, headers=self.headers)
                if reply.status_code == 200:
                    self.stats["requests"] += 1
                    self.stats["bytes_received"] += len(reply.content)
                    self.stats["latency_s"] += time.perf_counter() - started
                    return reply.content
                if reply.status_code not in _RETRYABLE_STATUS:
                    raise TeacherUnavailable(f"teacher {url} refused the request ({reply.status_code}): {reply.text[:300]}")
                errors.append(f"{url}: HTTP {reply.status_code}")
            except httpx.TransportError as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
            wait = min(10.0, self.backoff * 2**attempt)
            self._down_until[index] = time.monotonic() + wait
            if attempt >= self.retries and time.monotonic() - first_try >= self.deadline_s:
                raise TeacherUnavailable(f"no teacher answered after {attempt + 1} attempts in "
                                         f"{time.monotonic() - first_try:.1f}s: " + "; ".join(errors[-4:]))
            self.stats["retries"] += 1
            await asyncio.sleep(wait * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when some replica answers ``GET /ready`` (used to return to this teacher after a fallback)."""
        for url in self.urls:
            try:
                if httpx.get(f"{url}/ready", timeout=timeout).status_code == 200:
                    return True
            except httpx.HTTPError:
                continue
        return False

    # ----------------------------------------------------------------------------- interface

    def _submit(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> Future:
        ids = input_ids.cpu().numpy()
        sequences = [ids[row, :n].astype(np.int32) for row, n in enumerate(lengths.tolist())]
        body = encode_topk_request(sequences, k=self.k, temperature=self.temperature, fmt="msgpack")
        return asyncio.run_coroutine_threadsafe(self._request(body), self._loop)

    def prefetch(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, split: str = "train") -> None:
        """Start fetching the targets of an upcoming batch; :meth:`targets_for` picks them up."""
        key = (split, tuple(indices.tolist()))
        if key not in self._prefetched:
            self._prefetched[key] = self._submit(input_ids, lengths)

    def targets_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor,
                    split: str = "train") -> TeacherTargets:
        """Targets ``[B, L, k]``; waits only for what a prefetch has not already brought."""
        future = self._prefetched.pop((split, tuple(indices.tolist())), None) or self._submit(input_ids, lengths)
        reply = decode_topk_response(future.result(), "msgpack")
        if reply.lengths != lengths.tolist() or reply.k != self.k:
            raise TeacherUnavailable(f"the teacher answered lengths {reply.lengths} / k {reply.k} for a request of "
                                     f"{lengths.tolist()} / {self.k}")
        return TeacherTargets.from_rows(np.array(reply.indices), np.array(reply.logprobs), np.array(reply.tail_logprob),
                                        reply.lengths, seq_len=input_ids.shape[1], temperature=self.temperature)

    def drop_prefetched(self) -> None:
        """Forget requests in flight (after a failure, their batches are served by a fallback)."""
        for future in self._prefetched.values():
            future.cancel()
        self._prefetched.clear()

    def close(self) -> None:
        for future in self._prefetched.values():
            future.cancel()
        self._prefetched.clear()
        if self._loop.is_running():
            self._call(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
