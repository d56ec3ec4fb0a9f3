"""Network mode: teacher targets from one or more teacher services over async HTTP (msgpack).

An ``httpx.AsyncClient`` (keep-alive) runs on a background event loop, so requests for the next
batches are in flight while the current step computes (:meth:`NetworkTeacher.prefetch`). Several
URLs share the load: each request goes to the healthy replica with the fewest requests in flight
(ties round-robin), and a URL that fails is skipped for a while. Failed requests (transport errors,
5xx, 408/429, a garbled reply) are retried with exponential backoff and jitter (requests are
idempotent), then :class:`TeacherUnavailable` is raised, which a fallback chain catches. Any other
4xx is a configuration error (:class:`TeacherRejected`: bad key, a limit too small) and stops the
run with the server's message. At start every replica's ``/v1/models`` is checked (tokenizer,
vocab, served model, weights fingerprint, limits), and so is every reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from shared.wire import MSGPACK, TopKResponse, decode_topk_response, encode_topk_request
from student_trainer.teachers.targets import TeacherScores, TeacherTargets, packed_score_ids, unpadded_rows

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 429}  # and every 5xx: the service is busy, restarting or broken, not misconfigured


class TeacherError(RuntimeError):
    """A teacher source cannot give the targets this run asked for."""


class TeacherUnavailable(TeacherError):
    """No teacher URL answered within the retries; the message lists the last errors (a fallback may serve)."""


class TeacherMismatch(TeacherError):
    """A teacher serves another tokenizer, vocabulary, model or weights than the run's (no fallback helps)."""


class TeacherRejected(TeacherError):
    """A teacher refused a request as invalid (4xx): the configuration is wrong, retrying cannot help."""


def refuse_or_warn(message: str, allow: bool) -> None:
    """Another teacher than the run's: :class:`TeacherMismatch`, or a warning when the user allowed it
    (``allow_teacher_mismatch``)."""
    if not allow:
        raise TeacherMismatch(message + " (or set allow_teacher_mismatch=true if you are sure they are the same)")
    log.warning("%s (allowed by allow_teacher_mismatch)", message)


def same_model(a: str, b: str) -> bool:
    """Whether two model names denote the same model: a server names a local folder by its last
    component (``/models/Llama-3.2-1B`` is served as ``Llama-3.2-1B``), a GGUF file by its stem."""
    def short(name: str) -> str:
        path = Path(name)
        return path.stem if path.suffix == ".gguf" else path.name
    return a == b or short(a) == short(b)


@dataclass(frozen=True)
class TeacherIdentity:
    """What makes two teachers give the same targets (besides k and T, which every request names)."""

    model: str
    weights_fingerprint: str  # "" when a server does not publish it
    tokenizer_sha256: str
    vocab_size: int

    @classmethod
    def from_models_entry(cls, info: dict) -> "TeacherIdentity":
        """From an entry of ``GET /v1/models`` (servers before the fingerprint send none)."""
        return cls(str(info["id"]), str(info.get("weights_fingerprint") or ""), str(info["tokenizer_sha256"]),
                   int(info["vocab_size"]))

    def differences(self, other: "TeacherIdentity") -> list[str]:
        """Human-readable differences from ``other`` (empty: the same teacher as far as both can tell);
        an empty ``model`` (the run names none) or fingerprint on either side is not compared."""
        found = []
        if self.model and not same_model(self.model, other.model):
            found.append(f"model {other.model!r} instead of {self.model!r}")
        if self.weights_fingerprint and other.weights_fingerprint and self.weights_fingerprint != other.weights_fingerprint:
            found.append(f"weights fingerprint {other.weights_fingerprint[:16]}... instead of {self.weights_fingerprint[:16]}...")
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            found.append(f"tokenizer sha256 {other.tokenizer_sha256[:12]}... instead of {self.tokenizer_sha256[:12]}...")
        if self.vocab_size != other.vocab_size:
            found.append(f"vocab {other.vocab_size} instead of {self.vocab_size}")
        return found


def server_message(reply: httpx.Response) -> str:
    """The ``error.message`` of a JSON error body, else the start of the body."""
    try:
        return str(reply.json()["error"]["message"])[:500]
    except Exception:  # noqa: BLE001 - any body that is not our JSON error: show it as text
        return reply.text[:300]


class NetworkTeacher:
    """Targets from teacher services at ``urls`` (e.g. ``["http://teacher:8000"]``).

    Args:
        urls: one or several teacher services; requests spread over the healthy ones.
        k, temperature: what every request asks for.
        tokenizer_sha256, vocab_size: the training data's; a teacher serving others is refused.
        api_key: sent as ``Authorization: Bearer``.
        connect_timeout, read_timeout: seconds.
        retries: attempts per request beyond the first (across URLs).
        backoff: base seconds of the exponential backoff (``backoff * 2**attempt``, capped at 10 s,
            plus jitter).
        deadline_s: keep retrying a request for at least this long (with no fallback teacher,
            a run rides out a teacher restart this way); 0: ``retries`` alone decide.
        teacher_model: the run's teacher; a service serving another model is refused.
        weights_fingerprint: the expected weights fingerprint (None: the first replica's; every
            other replica and every reply must match it).
        allow_mismatch: log a warning instead of refusing another model or other weights.
        max_sequence_length, max_request_tokens: the longest row and the most tokens one request of
            this run sends; a service whose limits are smaller is refused at start.
        target_encoding: ``"fp16"`` (wire v1 tensors), ``"coded"`` (wire v1.2: one CRC-checked codec block
            per reply, decoded into the same targets; a corrupt block is a failed reply, retried) or
            ``"sampled"`` (``k`` ids drawn per position from the teacher's distribution, seeded by the batch's
            ids, so a retry or a resumed run draws the same).
        mass_cutoff: with ``"coded"``, the server drops each row's least likely ids up to this mass (into the tail).
    """

    def __init__(self, urls: list[str], k: int, temperature: float, tokenizer_sha256: str, vocab_size: int,
                 api_key: str | None = None, connect_timeout: float = 5.0, read_timeout: float = 300.0,
                 retries: int = 4, backoff: float = 0.5, deadline_s: float = 0.0, teacher_model: str | None = None,
                 weights_fingerprint: str | None = None, allow_mismatch: bool = False,
                 max_sequence_length: int | None = None, max_request_tokens: int | None = None,
                 target_encoding: str = "fp16", mass_cutoff: float = 0.0) -> None:
        if not urls:
            raise ValueError("teacher_url is empty: give at least one teacher service URL")
        self.urls = [url.rstrip("/") for url in urls]
        for url in self.urls:
            if httpx.URL(url).scheme not in ("http", "https") or not httpx.URL(url).host:
                raise ValueError(f"teacher_url must be http(s)://HOST:PORT, found {url!r}")
        self.k, self.temperature, self.retries, self.backoff = k, temperature, retries, backoff
        if target_encoding not in ("fp16", "coded", "sampled"):
            raise ValueError(f"target_encoding must be 'fp16', 'coded' or 'sampled', found {target_encoding!r}")
        # v1 requests stay byte for byte v1: the v1.2 fields are sent only when asked for
        self.target_encoding = target_encoding
        self._encoding = {} if target_encoding == "fp16" else {
            "target_encoding": target_encoding, **({"mass_cutoff": float(mass_cutoff)} if mass_cutoff else {})}
        self.deadline_s, self.allow_mismatch = deadline_s, allow_mismatch
        self.headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="network-teacher", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._call(self._make_client())
        self._turn = itertools.count()  # round-robin among equally loaded replicas
        self._down_until = [0.0] * len(self.urls)
        self._in_flight = [0] * len(self.urls)  # touched only on the event loop's thread
        self.requests_per_url = [0] * len(self.urls)
        self._prefetched: dict[tuple, Future] = {}
        self._warned: set[str] = set()
        self.stats = {"requests": 0, "retries": 0, "bytes_received": 0, "latency_s": 0.0}
        self._cannot_score: set[str] = set()
        self.max_score_ids = 1 << 30  # the fewest ids per position any replica scores (GET /v1/models)
        expected = TeacherIdentity(teacher_model or "", weights_fingerprint or "", tokenizer_sha256, vocab_size)
        self.identity = self._check_services(expected, max_sequence_length, max_request_tokens)
        self.name = f"network:{self.identity.model}@{','.join(self.urls)}"
        self.vocab_size, self.tokenizer_sha256 = vocab_size, tokenizer_sha256
        self.weights_fingerprint = self.identity.weights_fingerprint

    # -------------------------------------------------------------------------------- plumbing

    async def _make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self._timeout, limits=httpx.Limits(max_keepalive_connections=16))

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _mismatch(self, where: str, differences: list[str], fix: str) -> None:
        message = f"{where} serves {'; '.join(differences)}. {fix}"
        if self.allow_mismatch and message in self._warned:
            return  # warned once per distinct mismatch, not once per reply
        self._warned.add(message)
        refuse_or_warn(message, self.allow_mismatch)

    def _models(self, url: str) -> dict:
        """``GET /v1/models`` of one replica, its first entry; 401/403 and other 4xx are configuration errors."""
        try:
            reply = httpx.get(f"{url}/v1/models", headers=self.headers, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise TeacherUnavailable(f"teacher {url} did not answer GET /v1/models: {exc}") from exc
        if reply.status_code in (401, 403):
            raise TeacherRejected(f"teacher {url} answered {reply.status_code} to GET /v1/models: bad or missing key; "
                                  "set TEACHER_API_KEY to the service's key")
        if reply.status_code != 200:
            error = TeacherUnavailable if reply.status_code >= 500 or reply.status_code in _RETRYABLE_STATUS else TeacherRejected
            raise error(f"teacher {url} answered {reply.status_code} to GET /v1/models: {server_message(reply)}")
        try:
            info = reply.json()["data"][0]
            info["id"], info["vocab_size"], info["tokenizer_sha256"]  # noqa: B018 - required keys
        except Exception as exc:  # noqa: BLE001 - whatever the body is, it is not a teacher's /v1/models
            raise TeacherUnavailable(f"teacher {url} answered GET /v1/models with something that is not a model "
                                     f"list: {reply.text[:200]!r}") from exc
        return info

    def _check_services(self, expected: TeacherIdentity, max_sequence_length: int | None,
                        max_request_tokens: int | None) -> TeacherIdentity:
        """Check every replica against the data, the run's teacher and each other; returns the identity."""
        identity: TeacherIdentity | None = None
        unreachable: list[str] = []
        for index, url in enumerate(self.urls):
            try:
                info = self._models(url)
            except TeacherUnavailable as exc:  # a replica down at start is skipped; its replies are checked later
                unreachable.append(str(exc))
                self._down_until[index] = time.monotonic() + 10.0
                continue
            served = TeacherIdentity.from_models_entry(info)
            if (served.tokenizer_sha256, served.vocab_size) != (expected.tokenizer_sha256, expected.vocab_size):
                raise TeacherMismatch(
                    f"teacher {url} serves {served.model} with tokenizer sha256 {served.tokenizer_sha256[:12]}... and "
                    f"vocab {served.vocab_size}, but the training data was tokenized with sha256 "
                    f"{expected.tokenizer_sha256[:12]}... and vocab {expected.vocab_size}; point the trainer at the "
                    "teacher whose tokenizer made the data, or preprocess the data with this teacher's tokenizer"
                )
            self._check_limits(url, info, max_sequence_length, max_request_tokens)
            if not info.get("score_ids"):  # wire v1.1; scores_for refuses while any replica lacks it
                self._cannot_score.add(url)
            self.max_score_ids = min(self.max_score_ids, int(info.get("max_score_ids") or 0))
            differences = (identity or expected).differences(served)
            if differences:
                fix = ("every replica must serve the same teacher" if identity else
                       "set teacher_model (and teacher_fingerprint) to the served teacher, or point teacher_url at "
                       "the run's teacher")
                self._mismatch(f"teacher {url}", differences, fix)
            identity = identity or served
        if identity is None:
            raise TeacherUnavailable("; ".join(unreachable))
        for error in unreachable:
            log.warning("%s; using the other replicas until it answers", error)
        return identity

    def _check_limits(self, url: str, info: dict, max_sequence_length: int | None, max_request_tokens: int | None) -> None:
        problems = []
        if info.get("max_k") is not None and self.k > int(info["max_k"]):
            problems.append(f"teacher_topk={self.k} but the service allows max_k={info['max_k']} "
                            "(lower teacher_topk or raise TEACHER_MAX_K)")
        limit = info.get("max_sequence_length")
        if limit is not None and max_sequence_length is not None and max_sequence_length > int(limit):
            problems.append(f"max_seq_length={max_sequence_length} but the teacher's model takes at most {limit} tokens")
        limit = info.get("max_tokens_per_request")
        if limit is not None and max_request_tokens is not None and max_request_tokens > int(limit):
            problems.append(f"a batch sends up to {max_request_tokens} tokens but the service takes at most {limit} per "
                            "request (lower batch_size or max_seq_length, or raise TEACHER_MAX_TOKENS_PER_REQUEST)")
        if problems:
            raise TeacherRejected(f"teacher {url}: " + "; ".join(problems))

    def _check_reply(self, url: str, reply: TopKResponse, lengths: list[int], temperature: float) -> None:
        if reply.lengths != lengths or reply.k != self.k:
            raise ValueError(f"lengths {reply.lengths} / k {reply.k} for a request of {lengths} / {self.k}")
        if abs(reply.temperature - temperature) > 1e-6 * max(1.0, temperature):
            raise TeacherMismatch(f"teacher {url} answered at temperature {reply.temperature}, the run asked for "
                                  f"{temperature}")
        served = TeacherIdentity(reply.model, reply.weights_fingerprint, reply.tokenizer_sha256, reply.vocab_size)
        differences = self.identity.differences(served)
        if differences:  # behind a load balancer, any replica may answer: each reply is checked
            self._mismatch(f"a reply from {url}", differences, "every replica behind the URL must serve the same teacher")

    def _pick(self) -> int:
        """The replica for the next attempt: the healthy one with the fewest requests in flight, ties
        taken in turn; when all are marked down, the one that comes back first."""
        now, start = time.monotonic(), next(self._turn)
        healthy = [i for i, until in enumerate(self._down_until) if until <= now]
        if not healthy:
            return min(range(len(self.urls)), key=lambda i: self._down_until[i])
        return min(healthy, key=lambda i: (self._in_flight[i], (i - start) % len(self.urls)))

    async def _request(self, body: bytes, lengths: list[int], temperature: float, scored: int = 0) -> TopKResponse:
        errors: list[str] = []
        first_try = time.monotonic()
        for attempt in itertools.count():
            index = self._pick()
            url = self.urls[index]
            started = time.perf_counter()
            self._in_flight[index] += 1
            try:
                reply = await self._client.post(f"{url}/v1/topk", content=body, headers=self.headers)
                if reply.status_code == 200:
                    decoded = decode_topk_response(reply.content, "msgpack")
                    self._check_reply(url, decoded, lengths, temperature)
                    if scored and (decoded.score_logprobs is None or decoded.score_logprobs.shape != (sum(lengths), scored)
                                   or decoded.logsumexp is None):
                        raise ValueError(f"a reply without the {scored} score_logprobs per position it was asked for")
                    self.stats["requests"] += 1
                    self.requests_per_url[index] += 1
                    self.stats["bytes_received"] += len(reply.content)
                    self.stats["latency_s"] += time.perf_counter() - started
                    return decoded
                if reply.status_code < 500 and reply.status_code not in _RETRYABLE_STATUS:
                    raise TeacherRejected(f"teacher {url} refused the request ({reply.status_code}): {server_message(reply)}")
                errors.append(f"{url}: HTTP {reply.status_code} {server_message(reply)[:120]}")
            except TeacherError:
                raise
            except httpx.HTTPError as exc:  # transport, protocol and decoding errors alike: try again
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
            except Exception as exc:  # noqa: BLE001 - a garbled 200 reply: a failed attempt, not a crash
                errors.append(f"{url}: garbled reply ({type(exc).__name__}: {str(exc)[:120]})")
            finally:
                self._in_flight[index] -= 1
            wait = min(10.0, self.backoff * 2**attempt)
            self._down_until[index] = time.monotonic() + wait
            if attempt >= self.retries and time.monotonic() - first_try >= self.deadline_s:
                raise TeacherUnavailable(f"no teacher answered after {attempt + 1} attempts in "
                                         f"{time.monotonic() - first_try:.1f}s: " + "; ".join(errors[-4:]))
            self.stats["retries"] += 1
            await asyncio.sleep(wait * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when some replica answers ``GET /v1/models`` with this key and the same teacher (used to
        return to this teacher after a fallback; ``/ready`` alone would not check the key)."""
        for url in self.urls:
            try:
                reply = httpx.get(f"{url}/v1/models", headers=self.headers, timeout=timeout)
                if reply.status_code != 200:
                    continue
                served = TeacherIdentity.from_models_entry(reply.json()["data"][0])
            except Exception:  # noqa: BLE001 - not answering properly is not healthy
                continue
            if not self.identity.differences(served) or self.allow_mismatch:
                return True
            log.warning("teacher %s is back but serves another teacher (%s): staying on the fallback", url,
                        "; ".join(self.identity.differences(served)))
        return False

    # ----------------------------------------------------------------------------- interface

    def _submit(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> Future:
        rows = unpadded_rows(input_ids, lengths, np.int32)
        seed = {"sample_seed": zlib.crc32(b"".join(row.tobytes() for row in rows))} if self.target_encoding == "sampled" else {}
        body = encode_topk_request(rows, k=self.k, temperature=self.temperature, fmt="msgpack", **self._encoding, **seed)
        return asyncio.run_coroutine_threadsafe(self._request(body, lengths.tolist(), self.temperature), self._loop)

    def prefetch(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, split: str = "train") -> None:
        """Start fetching the targets of an upcoming batch; :meth:`targets_for` picks them up."""
        key = (split, tuple(indices.tolist()))
        if key not in self._prefetched:
            self._prefetched[key] = self._submit(input_ids, lengths)

    def targets_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor,
                    split: str = "train") -> TeacherTargets:
        """Targets ``[B, L, k]``; waits only for what a prefetch has not already brought."""
        future = self._prefetched.pop((split, tuple(indices.tolist())), None) or self._submit(input_ids, lengths)
        return self._targets(future.result(), input_ids.shape[1])

    def _targets(self, reply: TopKResponse, seq_len: int) -> TeacherTargets:
        return TeacherTargets.from_rows(np.array(reply.indices), np.array(reply.logprobs), np.array(reply.tail_logprob),
                                        reply.lengths, seq_len=seq_len, temperature=reply.temperature)

    def scores_for(self, input_ids: torch.Tensor, lengths: torch.Tensor, score_ids: torch.Tensor,
                   temperature: float | None = None) -> TeacherScores:
        """Targets ``[B, L, k]`` and the exact log-probs of ``score_ids [B, L, m]`` at every position, in
        one request (wire v1.1 ``score_ids`` + ``return_logsumexp``; retried and checked like any).
        ``temperature``: the teacher's for this request (None: the run's)."""
        temperature = self.temperature if temperature is None else temperature
        if self._cannot_score:
            raise TeacherRejected(f"teacher {', '.join(sorted(self._cannot_score))} does not score ids (wire v1.1 "
                                  "score_ids; its GET /v1/models says score_ids: false): serve the teacher with "
                                  "TEACHER_ENGINE=hf from this version, and TEACHER_MAX_SCORE_IDS > 0")
        packed = packed_score_ids(score_ids, lengths.tolist())
        body = encode_topk_request(unpadded_rows(input_ids, lengths, np.int32), k=self.k, temperature=temperature,
                                   fmt="msgpack", score_ids=packed, return_logsumexp=True)
        reply = asyncio.run_coroutine_threadsafe(self._request(body, lengths.tolist(), temperature, packed.shape[1]),
                                                 self._loop).result()
        return TeacherScores.from_rows(self._targets(reply, input_ids.shape[1]), score_ids,
                                       np.array(reply.score_logprobs), np.array(reply.logsumexp), reply.lengths)

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
