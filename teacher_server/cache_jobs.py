"""Cache-writer jobs of the teacher service: ``POST/GET/DELETE /v1/cache/jobs``.

A job fills a teacher cache for one split of a shard set with :func:`fill_cache`, scoring through
the dynamic batcher one small request at a time, so ``/v1/topk`` clients keep being served in
between. Names resolve strictly inside ``TEACHER_DATA_ROOT`` (datasets) and ``TEACHER_CACHE_ROOT``
(outputs), once when the job is posted and again when the job opens its files (a symlink swapped
in between is caught); manifests, lock files and the shards the job writes are opened without
following symlinks. Each job's state is a JSON file under ``CACHE_ROOT/.jobs/``: after a restart,
jobs that were running show as ``interrupted``; a damaged state file is set aside as
``<name>.damaged`` (with a logged warning) so the server still starts.

Every way a job can stop ends in a final state: ``done``, ``cancelled`` or ``failed`` with a short
reason (no traceback, no absolute server path). A full queue (429 from the batcher) is not a
failure: the job retries with backoff for up to ``busy_retry_s`` seconds first.
``POST /v1/cache/jobs/{id}/resume`` continues a failed, cancelled or interrupted job at the first
missing shard; ``DELETE`` cancels in any state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.cache_format import TARGET_TYPES, CacheError
from shared.files import atomic_write
from shared.errors import InvalidRequest, WireError
from shared.token_shards import FORMAT_NAME as SHARDS_FORMAT
from shared.token_shards import FORMAT_VERSION as SHARDS_VERSION
from shared.token_shards import MANIFEST as SHARDS_MANIFEST
from shared.token_shards import ShardError
from teacher_server.batching import DynamicBatcher
from teacher_server.engines.base import EngineRequest
from teacher_server.engines.cache_fill import FillCancelled, cache_spec, fill_cache
from teacher_server.errors import NotFound, Overloaded

log = logging.getLogger(__name__)
_FIELDS = {"dataset", "output", "split", "k", "temperature", "shard_size", "target_type", "q8_step",
           "code_step", "code_knee", "mass_cutoff"}
# topk_coded's grid and cutoff (shared.target_codec): name -> (check, what it must be)
_CODE_FIELDS = {"code_step": (lambda v: 0 < v <= 1, "a number in (0, 1] nats"),
                "code_knee": (lambda v: 0 <= v <= 1e6, "a number >= 0 nats (0 = a uniform grid)"),
                "mass_cutoff": (lambda v: 0 <= v < 1, "a number in [0, 1) (0 = no cutoff)")}
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
# Names are folder names, not arbitrary strings: a name component longer than the usual file-system
# limit or a whole name longer than this can only fail later, with an OS error; refuse it up front.
_MAX_NAME_CHARS, _MAX_COMPONENT_BYTES = 512, 255
_POLL_S = 0.25  # how often a job waiting on the batcher checks for a cancel
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.05, 2.0
_INTERRUPTED = "the server stopped; POST .../resume to continue"


class JobFailed(RuntimeError):
    """A job cannot go on; the message is the job's public ``error`` (short, no server paths)."""


def resolve_inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` if it stays inside ``root`` (no absolute paths, no ``..``, no symlink escapes).

    Called when a job is posted and again when it opens its files, so a symlink swapped in later
    is caught. Messages name the request's own ``name``, never the server's absolute root.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"'{what}' must be a non-empty relative name, found {name!r:.80}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InvalidRequest(f"'{what}' must be a plain folder name, found control characters (such as a null byte) "
                             f"in {name[:80]!r}")
    relative = Path(name)
    if len(name) > _MAX_NAME_CHARS or any(len(part.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT_BYTES
                                          for part in relative.parts):
        raise InvalidRequest(f"'{what}' is too long: at most {_MAX_NAME_CHARS} characters and {_MAX_COMPONENT_BYTES} "
                             f"bytes per folder name, found {len(name)} characters; choose a shorter name")
    if relative.is_absolute() or ".." in relative.parts:
        raise InvalidRequest(f"'{what}' must be a name inside the server's root, not {name!r} (no absolute paths or '..')")
    root = root.resolve()
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unreadable folder
        raise InvalidRequest(f"'{what}' {name!r} cannot be resolved (a symlink loop or an unreadable folder)") from None
    if resolved != root and root not in resolved.parents:
        raise InvalidRequest(f"'{what}' {name!r} resolves outside the server's root (a symlink escape); refused")
    return resolved


def read_json_nofollow(path: Path) -> Any:
    """Parse the JSON file at ``path`` without following a symlink there (``O_NOFOLLOW``).

    Raises:
        OSError: missing, unreadable, or a symlink (``ELOOP``).
        ValueError: not valid UTF-8 JSON (also for JSON nested too deep to parse).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read()
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def check_dataset(folder: Path, split: str | None, name: str) -> dict[str, Any]:
    """The dataset manifest of ``folder``, read without following symlinks, with the shard files of
    ``split`` checked to be regular files (no symlinks) in ``folder``. Raises :class:`InvalidRequest`."""
    where = f"'dataset' {name!r}"
    path = folder / SHARDS_MANIFEST
    if os.path.islink(path):
        raise InvalidRequest(f"{where}: {SHARDS_MANIFEST} is a symlink; the server reads only regular files in "
                             "TEACHER_DATA_ROOT (copy the manifest in instead of linking it)")
    try:
        manifest = read_json_nofollow(path)
    except FileNotFoundError:
        raise InvalidRequest(f"{where}: {SHARDS_MANIFEST} not found; expected a shard folder written by "
                             "`retnet-distill preprocess`") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise InvalidRequest(f"{where}: cannot read {SHARDS_MANIFEST} ({reason}); write the shard set again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDS_FORMAT or \
            manifest.get("version") != SHARDS_VERSION or not isinstance(manifest.get("splits"), dict):
        raise InvalidRequest(f"{where}: {SHARDS_MANIFEST} is not a {SHARDS_FORMAT!r} v{SHARDS_VERSION} manifest")
    if split is None or split not in manifest["splits"]:
        return manifest
    try:
        files = [f for record in manifest["splits"][split]["shards"] for f in record["files"].values()]
    except (KeyError, TypeError, AttributeError):
        raise InvalidRequest(f"{where}: the manifest's split {split!r} lists no valid shard records") from None
    for file_name in files:
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise InvalidRequest(f"{where}: the manifest lists {str(file_name)[:80]!r}, expected a file name in the folder")
        try:
            mode = os.lstat(folder / file_name).st_mode
        except OSError:
            raise InvalidRequest(f"{where}: shard file {file_name} is missing") from None
        if not stat.S_ISREG(mode):
            raise InvalidRequest(f"{where}: shard file {file_name} is not a regular file (a symlink?); the server "
                                 "reads only regular files in TEACHER_DATA_ROOT")
    return manifest


class CacheJobs:
    """The job table: create, run (one at a time, in a worker thread), report, cancel, resume.

    Args:
        data_root, cache_root: the folders dataset and output names resolve in.
        max_k: the largest k a job may ask for.
        busy_retry_s: how long a job keeps retrying while the batcher's queue is full (429) before
            it fails; the wait between tries doubles from 50 ms up to 2 s.
    """

    def __init__(self, data_root: str, cache_root: str, max_k: int, busy_retry_s: float = 60.0) -> None:
        self.data_root, self.cache_root = Path(data_root).expanduser(), Path(cache_root).expanduser()
        self.max_k = max_k
        self.busy_retry_s = busy_retry_s
        self.jobs_dir = self.cache_root / ".jobs"
        self.jobs: dict[str, dict[str, Any]] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._lock = threading.Lock()
        self._run_lock = asyncio.Lock()
        self._closing = False  # set by shutdown(): jobs that stop now are interrupted, not cancelled or failed
        if self.jobs_dir.is_dir():  # jobs of an earlier server process
            for path in sorted(self.jobs_dir.glob("*.json")):
                job = self._load(path)
                if job is None:
                    continue
                if job["state"] in ("queued", "running"):
                    job["state"], job["error"] = "interrupted", _INTERRUPTED
                self.jobs[job["id"]] = job

    def _load(self, path: Path) -> dict[str, Any] | None:
        """One saved job, or None after setting a damaged file aside as ``<name>.damaged``.

        A truncated or hand-edited file must not keep the server (and every other job) down.
        """
        try:
            job = read_json_nofollow(path)
            if not (isinstance(job, dict) and job.get("id") == path.stem and job.get("state") in STATES
                    and all(isinstance(job.get(key), str) for key in ("dataset", "output", "split"))):
                raise ValueError("not a cache job record")
            return job
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc).split(":")[0]
            aside = path.with_name(path.name + ".damaged")
            try:
                os.replace(path, aside)
                moved = f"moved aside to {aside.name}"
            except OSError as move_error:
                moved = f"could not move it aside ({move_error.strerror})"
            log.warning("cache job file .jobs/%s is damaged (%s); skipped it and %s. The other jobs are listed; "
                        "delete it or restore it from a backup", path.name, reason, moved)
            return None

    def _save(self, job: dict[str, Any]) -> None:
        with self._lock:
            job["updated"] = time.time()
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.jobs_dir / f"{job['id']}.json", json.dumps(job, indent=2).encode())

    def _resolve_output(self, name: Any) -> Path:
        output = resolve_inside(self.cache_root, name, "output")
        if output == self.cache_root.resolve() or self.jobs_dir.resolve() in (output, *output.parents):
            raise InvalidRequest("'output' must name a folder inside the cache root, not the root or .jobs")
        return output

    def _validate(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object with dataset, output, k, temperature, shard_size")
        unknown = set(body) - _FIELDS
        if unknown:
            raise InvalidRequest(f"unknown field(s) {sorted(map(str, unknown))[:10]}; expected {sorted(_FIELDS)}")
        split = body.get("split", "train")
        if not isinstance(split, str) or len(split) > _MAX_NAME_CHARS:
            raise InvalidRequest(f"'split' must be a split name such as 'train' or 'val', found {split!r:.80}")
        data = resolve_inside(self.data_root, body.get("dataset"), "dataset")
        self._resolve_output(body.get("output"))
        manifest = check_dataset(data, split, body["dataset"])
        if split not in manifest["splits"]:
            raise InvalidRequest(f"'dataset' {body['dataset']!r} has no split {split!r}; it has {sorted(manifest['splits'])}")
        k, shard_size = body.get("k", 64), body.get("shard_size", 256)
        temperature, target_type = body.get("temperature", 1.0), body.get("target_type", "topk_fp16")
        q8_step = body.get("q8_step", 1 / 16)
        if type(k) is not int or not 1 <= k <= self.max_k:
            raise InvalidRequest(f"k must be an integer in [1, {self.max_k}], found {k!r:.80}")
        if type(shard_size) is not int or shard_size < 1:
            raise InvalidRequest(f"shard_size must be a positive integer, found {shard_size!r:.80}")
        for name, value in (("temperature", temperature), ("q8_step", q8_step)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidRequest(f"{name} must be a finite number > 0, found {value!r:.80}")
        if target_type not in TARGET_TYPES:
            raise InvalidRequest(f"target_type must be one of {list(TARGET_TYPES)}, found {target_type!r:.80}")
        if target_type == "sampled" and k > 255:
            raise InvalidRequest(f"target_type 'sampled' draws k ids a position, at most 255, found k={k}")
        code = {}
        for name, (ok, what) in _CODE_FIELDS.items():
            value = body.get(name)
            if value is not None and target_type != "topk_coded":
                raise InvalidRequest(f"{name} applies to target_type 'topk_coded' only, found it with {target_type!r}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not ok(value)):
                raise InvalidRequest(f"{name} must be {what}, found {value!r:.80}")
            code[name] = None if value is None else float(value)
        return {"dataset": body["dataset"], "output": body["output"], "split": split, "k": k,
                "temperature": float(temperature), "shard_size": shard_size, "target_type": target_type,
                "q8_step": float(q8_step), **code}

    def create(self, body: Any, batcher_getter: Callable[[], DynamicBatcher]) -> dict[str, Any]:
        try:
            params = self._validate(body)
        except RecursionError:  # a body nested too deeply to walk
            raise InvalidRequest("the body is nested too deeply; send a flat JSON object") from None
        job = {"id": uuid.uuid4().hex[:12], "state": "queued", "created": time.time(), "error": None,
               "shards_done": 0, "shards_total": 0, "tokens_done": 0, "tokens_per_second": 0.0, "busy_retries": 0,
               **params}
        self.jobs[job["id"]] = job
        self._save(job)
        self._start(job, batcher_getter)
        return self.public(job)

    def resume(self, job_id: str, batcher_getter: Callable[[], DynamicBatcher]) -> dict[str, Any]:
        """Continue a failed, cancelled or interrupted job at its first missing shard (no-op otherwise).

        Raises ``NotReady`` (503) while the engine is not ready, leaving the job as it was.
        """
        job = self.get_job(job_id)
        if job["state"] == "done" or (job["state"] in ("queued", "running") and self._is_live(job_id)):
            return self.public(job)
        batcher_getter()  # 503 now rather than a job that fails at once
        job.update(state="queued", error=None)
        self._save(job)
        self._start(job, batcher_getter)
        return self.public(job)

    def _is_live(self, job_id: str) -> bool:
        task = self._tasks.get(job_id)
        return task is not None and not task.done()

    def _start(self, job: dict[str, Any], batcher_getter: Callable[[], DynamicBatcher]) -> None:
        self._cancel[job["id"]] = threading.Event()
        self._tasks[job["id"]] = asyncio.get_running_loop().create_task(self._run(job, batcher_getter))

    async def _run(self, job: dict[str, Any], batcher_getter: Callable[[], DynamicBatcher]) -> None:
        cancel = self._cancel[job["id"]]
        async with self._run_lock:  # one job at a time: jobs share the engine with /v1/topk
            if cancel.is_set():
                if self._cancel.get(job["id"]) is cancel and not self._closing:  # not resumed since the cancel
                    job.update(state="cancelled", error=None)
                    self._save(job)
                return
            job["state"] = "running"
            job.setdefault("busy_retries", 0)  # jobs saved by older servers: add the key before the worker counts
            self._save(job)
            try:
                batcher = batcher_getter()
                await asyncio.to_thread(self._work, job, batcher, asyncio.get_running_loop(), cancel)
                job.update(state="done", error=None)
            except FillCancelled:
                job.update(state="cancelled", error=None)
            except Exception as exc:  # every failure ends the job, with a reason a client may read
                reason = self._reason(exc)
                known = isinstance(exc, (JobFailed, WireError, CacheError, ShardError, OSError))
                log.warning("cache job %s failed: %s", job["id"], reason, exc_info=not known)
                job.update(state="failed", error=reason)
            if self._closing:  # stopped by the shutdown (a cancel, or NotReady from the stopped batcher)
                job.update(state="interrupted", error=_INTERRUPTED)
            self._save(job)

    def shutdown(self) -> None:
        """The server is stopping: every queued or running job stops at its next request and is
        saved as ``interrupted`` (resumable after the restart). Call before stopping the batcher,
        so that no job waits on a batcher that no longer runs."""
        self._closing = True
        for job_id, event in self._cancel.items():
            event.set()
            job = self.jobs[job_id]
            if job["state"] in ("queued", "running"):
                job.update(state="interrupted", error=_INTERRUPTED)
                self._save(job)

    def _work(self, job: dict[str, Any], batcher: DynamicBatcher, loop: asyncio.AbstractEventLoop,
              cancel: threading.Event) -> None:
        """Fill the job's cache (in a worker thread). Names are resolved and checked again here, at
        open time: the folders may have been swapped for symlinks since the job was posted."""
        data = resolve_inside(self.data_root, job["dataset"], "dataset")
        output = self._resolve_output(job["output"])
        data_fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._fill(job, batcher, loop, cancel, self._opened_dataset(data_fd, data, job["dataset"]), output)
        finally:
            os.close(data_fd)

    def _opened_dataset(self, fd: int, data: Path, name: str) -> Path:
        """Where to read the dataset folder held open as ``fd``: ``/proc/self/fd/N`` (Linux), so the
        reads stay in the folder opened here even if its path is swapped later, after checking that
        this folder itself lies inside the data root (no swap can slip in between)."""
        proc = Path(f"/proc/self/fd/{fd}")
        at = proc if proc.is_dir() else data
        root, real = self.data_root.resolve(), Path(os.path.realpath(at))
        if real != root and root not in real.parents:
            raise InvalidRequest(f"'dataset' {name!r} resolves outside the server's root (a symlink escape); refused")
        return at

    def _fill(self, job: dict[str, Any], batcher: DynamicBatcher, loop: asyncio.AbstractEventLoop,
              cancel: threading.Event, data: Path, output: Path) -> None:
        check_dataset(data, job["split"], job["dataset"])
        spec = cache_spec(batcher.engine, data, job["split"], job["k"], job["temperature"], job["shard_size"],
                          job["target_type"], job["q8_step"], job.get("code_step"), job.get("code_knee"),
                          job.get("mass_cutoff"))
        job["shards_total"] = spec.num_shards
        # A request must fit the batcher's queue on its own, or it would get 429 forever.
        per_request = min(16, batcher.max_queued_tokens // spec.max_seq_length)
        if per_request < 1:
            raise JobFailed(f"a dataset row holds up to {spec.max_seq_length} tokens but the server queues at most "
                            f"{batcher.max_queued_tokens}; raise TEACHER_MAX_QUEUED_TOKENS")

        def score(request: EngineRequest):
            return self._score(job, batcher, loop, request, cancel)

        def progress(p) -> None:
            job.update(shards_done=p.shards_done, shards_total=p.shards_total, tokens_done=p.tokens_done,
                       tokens_per_second=round(p.tokens_per_second, 1))
            self._save(job)

        fill_cache(score, spec, data, output, sequences_per_request=per_request, progress=progress, cancel=cancel,
                   confine_to=self.cache_root)

    def _score(self, job: dict[str, Any], batcher: DynamicBatcher, loop: asyncio.AbstractEventLoop,
               request: EngineRequest, cancel: threading.Event):
        """One request through the batcher; retries a full queue with backoff for ``busy_retry_s``."""
        deadline, backoff = None, _FIRST_BACKOFF_S
        while True:
            future = asyncio.run_coroutine_threadsafe(batcher.submit(request), loop)
            try:
                while True:  # wait in short slices so that a cancel is seen even while the engine is busy
                    try:
                        return future.result(timeout=_POLL_S)[0]
                    except concurrent.futures.TimeoutError:
                        if cancel.is_set():
                            future.cancel()
                            raise FillCancelled("cancelled while waiting for the engine") from None
            except Overloaded:
                now = time.monotonic()
                deadline = now + self.busy_retry_s if deadline is None else deadline
                if now >= deadline:
                    raise JobFailed(f"the teacher's queue stayed full (429) through {self.busy_retry_s:g} s of "
                                    "retries; POST .../resume when it is less busy, or raise "
                                    "TEACHER_CACHE_JOB_BUSY_RETRY_S or TEACHER_MAX_QUEUED_TOKENS") from None
                job["busy_retries"] = job.get("busy_retries", 0) + 1  # shown in the job's state
                if cancel.wait(min(backoff, deadline - now)):
                    raise FillCancelled("cancelled while the queue was full") from None
                backoff = min(2 * backoff, _MAX_BACKOFF_S)

    def _reason(self, exc: BaseException) -> str:
        """A short public reason for ``exc``: domain messages with the server's roots replaced by the
        setting names, OS errors by their strerror, anything else by its type (details in the log)."""
        if isinstance(exc, WireError):
            text = exc.message
        elif isinstance(exc, (JobFailed, CacheError, ShardError, ValueError)):
            text = str(exc)
        elif isinstance(exc, OSError):
            name = Path(exc.filename).name if isinstance(exc.filename, str) else None
            text = f"file error: {exc.strerror or type(exc).__name__}" + (f" ({name})" if name else "")
        else:
            text = f"an unexpected {type(exc).__name__}; see the server log for this job"
        for root, setting in ((self.cache_root, "TEACHER_CACHE_ROOT"), (self.data_root, "TEACHER_DATA_ROOT")):
            for form in {str(root.resolve()), str(root.absolute())}:
                text = text.replace(form, setting)
        # Any absolute path left (a file outside the roots, a model folder) is cut to its last part.
        text = re.sub(r"(?<![\w.~])(/[^\s'\",:;()\[\]]+)+", lambda m: "<path>/" + Path(m.group(0)).name, text)
        text = text.split("\n")[0]
        return text if len(text) <= 500 else text[:497] + "..."

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel in any state: a running job stops at its next request (its shards stay valid), a
        queued, failed or interrupted one becomes ``cancelled`` now; a done job stays done."""
        job = self.get_job(job_id)
        if job_id in self._cancel:
            self._cancel[job_id].set()
        if job["state"] == "running" and self._is_live(job_id):
            return self.public(job)  # the worker sets ``cancelled`` when it stops
        if job["state"] != "done":
            job.update(state="cancelled", error=None)
            self._save(job)
        return self.public(job)

    def get_job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise NotFound(f"no cache job {job_id[:40]!r}")
        return self.jobs[job_id]

    @staticmethod
    def public(job: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in job.items() if not key.startswith("_")}
