"""Cache-writer jobs of the teacher service: ``POST/GET/DELETE /v1/cache/jobs``.

A job fills a teacher cache for one split of a shard set with :func:`fill_cache`, scoring through
the dynamic batcher one small request at a time, so ``/v1/topk`` clients keep being served in
between. Names resolve strictly inside ``TEACHER_DATA_ROOT`` (datasets) and ``TEACHER_CACHE_ROOT``
(outputs). Each job's state is a JSON file under ``CACHE_ROOT/.jobs/``: after a restart, jobs that
were running show as ``interrupted`` and ``POST /v1/cache/jobs/{id}/resume`` continues them at
the first missing shard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shared.cache_format import TARGET_TYPES, CacheError, atomic_write
from shared.errors import InvalidRequest
from shared.token_shards import ShardError, read_manifest
from teacher_server.engines.base import EngineRequest
from teacher_server.engines.cache_fill import FillCancelled, cache_spec, fill_cache
from teacher_server.errors import NotFound

log = logging.getLogger(__name__)
_FIELDS = {"dataset", "output", "split", "k", "temperature", "shard_size", "target_type", "q8_step"}


def resolve_inside(root: Path, name: Any, what: str) -> Path:
    """``root / name`` if it stays inside ``root`` (no absolute paths, no ``..``, no symlink escapes)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"'{what}' must be a non-empty relative name, found {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise InvalidRequest(f"'{what}' must be a name inside the server's root, not {name!r} (no absolute paths or '..')")
    root = root.resolve()
    resolved = (root / relative).resolve()
    if resolved != root and root not in resolved.parents:
        raise InvalidRequest(f"'{what}' {name!r} resolves outside the server's root (a symlink escape); refused")
    return resolved


class CacheJobs:
    """The job table: create, run (one at a time, in a worker thread), report, cancel, resume."""

    def __init__(self, data_root: str, cache_root: str, max_k: int) -> None:
        self.data_root, self.cache_root = Path(data_root).expanduser(), Path(cache_root).expanduser()
        self.max_k = max_k
        self.jobs_dir = self.cache_root / ".jobs"
        self.jobs: dict[str, dict[str, Any]] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._run_lock = asyncio.Lock()
        if self.jobs_dir.is_dir():  # jobs of an earlier server process
            for path in sorted(self.jobs_dir.glob("*.json")):
                job = json.loads(path.read_text())
                if job["state"] in ("queued", "running"):
                    job["state"], job["error"] = "interrupted", "the server stopped; POST .../resume to continue"
                self.jobs[job["id"]] = job

    def _save(self, job: dict[str, Any]) -> None:
        with self._lock:
            job["updated"] = time.time()
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.jobs_dir / f"{job['id']}.json", json.dumps(job, indent=2).encode())

    def _validate(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object with dataset, output, k, temperature, shard_size")
        unknown = set(body) - _FIELDS
        if unknown:
            raise InvalidRequest(f"unknown field(s) {sorted(unknown)}; expected {sorted(_FIELDS)}")
        data = resolve_inside(self.data_root, body.get("dataset"), "dataset")
        output = resolve_inside(self.cache_root, body.get("output"), "output")
        if output == self.cache_root.resolve() or self.jobs_dir.resolve() in (output, *output.parents):
            raise InvalidRequest("'output' must name a folder inside the cache root, not the root or .jobs")
        try:
            manifest = read_manifest(data)
        except ShardError as exc:
            raise InvalidRequest(f"'dataset' {body['dataset']!r}: {exc}") from exc
        split = body.get("split", "train")
        if split not in manifest["splits"]:
            raise InvalidRequest(f"'dataset' {body['dataset']!r} has no split {split!r}; it has {sorted(manifest['splits'])}")
        k, shard_size = body.get("k", 64), body.get("shard_size", 256)
        temperature, target_type = body.get("temperature", 1.0), body.get("target_type", "topk_fp16")
        q8_step = body.get("q8_step", 1 / 16)
        if type(k) is not int or not 1 <= k <= self.max_k:
            raise InvalidRequest(f"k must be an integer in [1, {self.max_k}], found {k!r}")
        if type(shard_size) is not int or shard_size < 1:
            raise InvalidRequest(f"shard_size must be a positive integer, found {shard_size!r}")
        for name, value in (("temperature", temperature), ("q8_step", q8_step)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidRequest(f"{name} must be a finite number > 0, found {value!r}")
        if target_type not in TARGET_TYPES:
            raise InvalidRequest(f"target_type must be one of {list(TARGET_TYPES)}, found {target_type!r}")
        return {"dataset": body["dataset"], "output": body["output"], "split": split, "k": k,
                "temperature": float(temperature), "shard_size": shard_size, "target_type": target_type,
                "q8_step": float(q8_step), "_data": str(data), "_output": str(output)}

    def create(self, body: Any, batcher_getter) -> dict[str, Any]:
        params = self._validate(body)
        job = {"id": uuid.uuid4().hex[:12], "state": "queued", "created": time.time(), "error": None,
               "shards_done": 0, "shards_total": 0, "tokens_done": 0, "tokens_per_second": 0.0, **params}
        self.jobs[job["id"]] = job
        self._save(job)
        self._start(job, batcher_getter)
        return self.public(job)

    def resume(self, job_id: str, batcher_getter) -> dict[str, Any]:
        job = self.get_job(job_id)
        if job["state"] in ("queued", "running", "done"):
            return self.public(job)
        job.update(state="queued", error=None)
        self._save(job)
        self._start(job, batcher_getter)
        return self.public(job)

    def _start(self, job: dict[str, Any], batcher_getter) -> None:
        self._cancel[job["id"]] = threading.Event()
        asyncio.get_running_loop().create_task(self._run(job, batcher_getter))

    async def _run(self, job: dict[str, Any], batcher_getter) -> None:
        async with self._run_lock:  # one job at a time: jobs share the engine with /v1/topk
            if self._cancel[job["id"]].is_set():
                return
            loop = asyncio.get_running_loop()
            job["state"] = "running"
            self._save(job)
            try:
                batcher = batcher_getter()

                def score(request: EngineRequest):
                    return asyncio.run_coroutine_threadsafe(batcher.submit(request), loop).result()[0]

                def progress(p) -> None:
                    job.update(shards_done=p.shards_done, shards_total=p.shards_total, tokens_done=p.tokens_done,
                               tokens_per_second=round(p.tokens_per_second, 1))
                    self._save(job)

                def work() -> None:
                    spec = cache_spec(batcher.engine, job["_data"], job["split"], job["k"], job["temperature"],
                                      job["shard_size"], job["target_type"], job["q8_step"])
                    job["shards_total"] = spec.num_shards
                    fill_cache(score, spec, job["_data"], job["_output"], progress=progress,
                               cancel=self._cancel[job["id"]])

                await asyncio.to_thread(work)
                job["state"] = "done"
            except FillCancelled:
                job["state"] = "cancelled"
            except (CacheError, ValueError, OSError, RuntimeError) as exc:
                log.exception("cache job %s failed", job["id"])
                job.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            self._save(job)

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get_job(job_id)
        if job["state"] in ("queued", "running"):
            self._cancel[job_id].set()
            if job["state"] == "queued":
                job["state"] = "cancelled"
                self._save(job)
        return self.public(job)

    def get_job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise NotFound(f"no cache job {job_id!r}")
        return self.jobs[job_id]

    @staticmethod
    def public(job: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in job.items() if not key.startswith("_")}
