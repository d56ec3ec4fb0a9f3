"""Cached mode end to end: the writer CLI and the server route, kill -9 and resume, parity, training."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from shared.cache_format import CacheCorrupted, CacheMismatch
from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
from student_trainer.teachers import CachedTeacher, DirectTeacher
from student_trainer.training.recipe import Batch, train
from tests.conftest import REPO_ROOT, start_server
from tests.test_train import step_losses, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "student_trainer", "cache", *args]


def write_cache(tiny_model_dir, data: Path, output: Path, *extra: str) -> None:
    subprocess.run(cache_cli("--data", str(data), "--output", str(output), "--teacher", str(tiny_model_dir),
                             "--k", "16", "--shard-size", "64", *extra), check=True, cwd=REPO_ROOT, capture_output=True)


@pytest.fixture(scope="module")
def reference_cache(roots, tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted in-process cache of both splits."""
    output = tmp_path_factory.mktemp("reference") / "cache"
    write_cache(tiny_model_dir, roots[0] / "docs", output)
    return output


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("shard-*.safetensors"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def shards_listed(folder: Path) -> int:
    try:
        return len(json.loads((folder / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_kill_9_of_the_cli_writer_resumes_to_the_same_cache(roots, reference_cache, tiny_model_dir, tmp_path) -> None:
    output = tmp_path / "cache"
    cmd = cache_cli("--data", str(roots[0] / "docs"), "--output", str(output), "--teacher", str(tiny_model_dir),
                    "--k", "16", "--shard-size", "64", "--splits", "train")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: shards_listed(output / "train") >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = json.loads((reference_cache / "train" / "manifest.json").read_text())["shards"]
    assert 2 <= shards_listed(output / "train") < len(total), "the writer was not killed halfway"
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True)
    same_files(output / "train", reference_cache / "train")


def test_route_writes_the_same_cache_and_survives_kill_9_of_the_server(roots, reference_cache, tiny_model_dir) -> None:
    data_root, cache_root = roots
    env = {"TEACHER_DATA_ROOT": str(data_root), "TEACHER_CACHE_ROOT": str(cache_root), "TEACHER_API_KEY": "k"}
    headers = {"Authorization": "Bearer k"}
    server = start_server(str(tiny_model_dir), cache_root.parent, env=env)
    try:
        body = {"dataset": "docs", "output": "via-route/train", "split": "train", "k": 16, "shard_size": 64}
        job = httpx.post(server.url + "/v1/cache/jobs", json=body, headers=headers).json()
        assert job["state"] in ("queued", "running"), job
        wait_for(lambda: shards_listed(cache_root / "via-route" / "train") >= 2)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        server.stop()
    server = start_server(str(tiny_model_dir), cache_root.parent, env=env)
    try:
        state = httpx.get(f"{server.url}/v1/cache/jobs/{job['id']}", headers=headers).json()
        assert state["state"] == "interrupted"
        httpx.post(f"{server.url}/v1/cache/jobs/{job['id']}/resume", headers=headers).raise_for_status()
        wait_for(lambda: httpx.get(f"{server.url}/v1/cache/jobs/{job['id']}", headers=headers).json()["state"] == "done")
        # /v1/topk keeps answering while jobs exist
        assert httpx.post(server.url + "/v1/topk", json={"input_ids": [[1, 2, 3]], "k": 2}, headers=headers).status_code == 200
        # the CLI drives the same route for the val split
        subprocess.run(cache_cli("--teacher-url", server.url, "--api-key", "k", "--data", "docs", "--output", "via-route",
                                 "--splits", "val", "--k", "16", "--shard-size", "64"), check=True, cwd=REPO_ROOT,
                       capture_output=True)
    finally:
        assert server.stop() == 0
    same_files(cache_root / "via-route" / "train", reference_cache / "train")
    same_files(cache_root / "via-route" / "val", reference_cache / "val")


def test_route_refuses_names_outside_its_roots(roots, tiny_model_dir, tmp_path) -> None:
    data_root, cache_root = roots
    (data_root / "escape").symlink_to(tmp_path)
    server = start_server(str(tiny_model_dir), tmp_path, env={"TEACHER_DATA_ROOT": str(data_root),
                                                              "TEACHER_CACHE_ROOT": str(cache_root)})
    try:
        for dataset, output, words in [
            ("/abs/path", "x", "no absolute paths"), ("../outside", "x", "no absolute paths or '..'"),
            ("escape", "x", "symlink escape"), ("missing", "x", "not found"), ("docs", "../x", "no absolute paths"),
            ("docs", "", "non-empty relative name"), ("docs", "x", "k must be an integer"),
        ]:
            body = {"dataset": dataset, "output": output, **({"k": 0} if words.startswith("k ") else {})}
            reply = httpx.post(server.url + "/v1/cache/jobs", json=body)
            assert reply.status_code == 422 and words in reply.json()["error"]["message"], (dataset, output, reply.text)
        assert httpx.get(server.url + "/v1/cache/jobs/nope").status_code == 404
        assert httpx.post(server.url + "/v1/cache/jobs", content=b"k=1", headers={"Content-Type": "text/plain"}).status_code == 415
    finally:
        server.stop()
        (data_root / "escape").unlink()
    assert not (cache_root.parent / "x").exists() and not (cache_root / "x").exists()


def test_cached_targets_equal_direct_targets(roots, reference_cache, tiny_engine) -> None:
    data = roots[0] / "docs"
    dataset = PretokenizedShardDataset(data, "train")
    cached = CachedTeacher(reference_cache, read_manifest(data), k=16, temperature=1.0, verify=True)
    direct = DirectTeacher(tiny_engine, k=16, temperature=1.0)
    batch = Batch.from_rows([dataset[i] for i in (3, 70, 200, 5)])
    a = cached.targets_for(batch.input_ids, batch.lengths, batch.indices)
    b = direct.targets_for(batch.input_ids, batch.lengths, batch.indices)
    torch.testing.assert_close(a.indices, b.indices)
    torch.testing.assert_close(a.logprobs, b.logprobs.half().float())  # the cache stores fp16
    torch.testing.assert_close(a.tail_logprob, b.tail_logprob)


def test_cached_run_tracks_the_direct_run(roots, reference_cache, tiny_engine, tmp_path) -> None:
    data = roots[0] / "docs"
    direct = train(tiny_config(tmp_path / "direct", data, max_steps=6, eval_every=6, save_every=6),
                   teacher=DirectTeacher(tiny_engine, k=16, temperature=1.0))
    cached = train(tiny_config(tmp_path / "cached", data, max_steps=6, eval_every=6, save_every=6, teacher_mode="cached",
                               teacher_cache=str(reference_cache), teacher_model=tiny_engine.model_name))
    a, b = step_losses(tmp_path / "direct"), step_losses(tmp_path / "cached")
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=2e-3), step
    assert cached["metrics"]["eval/kl"] == pytest.approx(direct["metrics"]["eval/kl"], rel=5e-3)


def test_a_flipped_byte_is_reported_and_nothing_trains_on_it(roots, reference_cache, tmp_path, tiny_model_dir) -> None:
    """The shard's sha256 is checked before its first row is used (not the whole cache at start):
    the run stops there, and no step trained on a row of the damaged shard."""
    broken = tmp_path / "broken"
    shutil.copytree(reference_cache, broken)
    victim = broken / "train" / "shard-00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheCorrupted, match=r"shard-00001\.safetensors.*sha256"):
        train(tiny_config(tmp_path / "run", roots[0] / "docs", teacher_mode="cached", teacher_cache=str(broken),
                          teacher_model=str(tiny_model_dir), max_steps=200, eval_every=200, save_every=200))
    manifest = json.loads((broken / "train" / "manifest.json").read_text())
    record = next(r for r in manifest["shards"] if r["file"] == victim.name)
    damaged = set(range(record["first"], record["first"] + record["count"]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for line in lines for row in line.get("data/rows", [])]
    assert not damaged & set(trained)


def test_a_cache_for_other_settings_is_refused(roots, reference_cache, tmp_path) -> None:
    manifest = read_manifest(roots[0] / "docs")
    with pytest.raises(CacheMismatch, match="cache was made for k=16, this run asks for k=32"):
        CachedTeacher(reference_cache, manifest, k=32, temperature=1.0)
    with pytest.raises(CacheMismatch, match="temperature"):
        CachedTeacher(reference_cache, manifest, k=16, temperature=2.0)
    with pytest.raises(CacheMismatch, match="teacher_model"):
        CachedTeacher(reference_cache, manifest, k=16, temperature=1.0, teacher_model="another-teacher")
    with pytest.raises(CacheMismatch, match="dataset_fingerprint"):
        CachedTeacher(reference_cache, {**manifest, "fingerprint": "other"}, k=16, temperature=1.0)
    with pytest.raises(CacheMismatch, match="tokenizer_sha256"):
        CachedTeacher(reference_cache, {**manifest, "tokenizer_sha256": "0" * 64}, k=16, temperature=1.0)


def test_a_job_can_be_cancelled_and_resumed_and_its_state_persists(roots, tiny_engine) -> None:
    import asyncio

    from teacher_server.batching import DynamicBatcher
    from teacher_server.cache_jobs import CacheJobs
    from teacher_server.metrics import ServerMetrics

    data_root, cache_root = roots

    async def scenario() -> str:
        batcher = DynamicBatcher(tiny_engine, ServerMetrics(), max_batch_tokens=4096, max_wait_s=0.001,
                                 max_queued_tokens=10**6)
        batcher.start()
        jobs = CacheJobs(str(data_root), str(cache_root), max_k=32)
        job = jobs.create({"dataset": "docs", "output": "cancel-me", "k": 4, "shard_size": 16}, lambda: batcher)
        while shards_listed(cache_root / "cancel-me") < 2:
            await asyncio.sleep(0.005)
        assert jobs.cancel(job["id"])["state"] == "running"
        while jobs.get_job(job["id"])["state"] == "running":
            await asyncio.sleep(0.005)
        assert jobs.get_job(job["id"])["state"] == "cancelled"
        assert not json.loads((cache_root / "cancel-me" / "manifest.json").read_text())["complete"]
        jobs.resume(job["id"], lambda: batcher)
        while jobs.get_job(job["id"])["state"] in ("queued", "running"):
            await asyncio.sleep(0.01)
        await batcher.stop()
        return job["id"]

    job_id = asyncio.run(scenario())
    restarted = CacheJobs(str(data_root), str(cache_root), max_k=32)  # a new server process reads the table
    state = restarted.get_job(job_id)
    assert state["state"] == "done" and state["shards_done"] == state["shards_total"] > 2
    assert json.loads((cache_root / "cancel-me" / "manifest.json").read_text())["complete"]
