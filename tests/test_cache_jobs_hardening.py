"""Cache jobs against a live server: every failure ends the job (then resume completes it), a flood
of /v1/topk clients, path confinement at open time, damaged job files, hostile request bodies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from shared.cache_reader import CacheReader
from tests.conftest import REPO_ROOT, start_server

FINAL = ("done", "failed", "cancelled", "interrupted")
# A hang guard only (2 busy cores), no test asserts on time; lower it to see a stuck job fail sooner.
JOB_TIMEOUT_S = float(os.environ.get("CACHE_JOB_TEST_TIMEOUT_S", "300"))


def wait_job(url: str, job_id: str, states=FINAL, timeout: float = JOB_TIMEOUT_S) -> dict:
    """Poll until the job is in one of ``states``; a job stuck elsewhere fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/v1/cache/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['state']!r}: {job}"
        time.sleep(0.05)


def post_job(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/cache/jobs", json=body)


def same_shards(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("shard-*.safetensors"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def clean_message(text: str, *paths: Path) -> None:
    """A public error: short, no traceback, no absolute server path."""
    assert text and len(text) <= 500 and "Traceback" not in text, text
    for path in paths:
        assert str(path) not in text and str(path.resolve()) not in text, text
    assert "/tmp/" not in text, text


@pytest.fixture(scope="module")
def hroots(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, cache root, a folder outside both). The data root holds ``tiny``: 96 train rows of
    32 tokens in 3 dataset shards, and ``long``: ~2000 rows (a job that runs long enough to queue
    others behind it)."""
    from pydoc_data.topics import topics

    from student_trainer.data.preprocess import PreprocessConfig, preprocess

    base = tmp_path_factory.mktemp("hardening")
    data_root, cache_root, outside = base / "data", base / "cache", base / "outside"
    for folder in (data_root, cache_root, outside):
        folder.mkdir()
    text = "\n\n".join(topics[key] for key in sorted(topics))
    for name, chars, rows in (("tiny", 14_000, 32), ("long", 200_000, 512)):
        source = base / f"{name}.txt"
        source.write_text(text[:chars])
        preprocess(PreprocessConfig(inputs=[str(source)], output=str(data_root / name), tokenizer=str(tiny_model_dir),
                                    max_seq_length=32, rows_per_shard=rows, progress=False,
                                    corpus_dir=str(base / "corpora")))
    manifest = json.loads((data_root / "tiny" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] >= 80 and len(manifest["splits"]["train"]["shards"]) >= 3
    return data_root, cache_root, outside


@pytest.fixture(scope="module")
def server(hroots, tiny_model_dir):
    data_root, cache_root, _ = hroots
    teacher = start_server(str(tiny_model_dir), cache_root.parent / "logs-main",
                           env={"TEACHER_DATA_ROOT": str(data_root), "TEACHER_CACHE_ROOT": str(cache_root),
                                "TEACHER_TORCH_THREADS": "1"})
    yield teacher
    teacher.stop()


@pytest.fixture(scope="module")
def reference(server, hroots) -> Path:
    """An undisturbed route-written cache of ``tiny`` (k=4, 16 rows a shard)."""
    reply = post_job(server.url, dataset="tiny", output="reference", k=4, shard_size=16)
    assert reply.status_code == 202, reply.text
    assert wait_job(server.url, reply.json()["id"])["state"] == "done"
    return hroots[1] / "reference"


# ------------------------------------------------------------------------- item 9: failures end jobs


def test_an_engine_failure_fails_the_job_with_a_reason_and_resume_completes_it(server, hroots, reference) -> None:
    data_root, cache_root, _ = hroots
    broken = data_root / "tiny-broken"
    shutil.copytree(data_root / "tiny", broken)
    victim = broken / "train-00002.tokens.npy"  # rows 64..95: cache shard 4 onwards
    good = victim.read_bytes()
    tokens = np.load(victim)
    tokens[0, 0] = 50_000  # no such id: the engine fails on this request
    np.save(victim, tokens)

    job = post_job(server.url, dataset="tiny-broken", output="after-failure", k=4, shard_size=16).json()
    failed = wait_job(server.url, job["id"])
    assert failed["state"] == "failed", failed
    assert "engine failed" in failed["error"], failed
    clean_message(failed["error"], data_root, cache_root)
    assert failed["shards_done"] == 4  # the shards before the bad row stay written

    # The CLI driving the route stops with the reason instead of polling forever.
    cli = subprocess.run([sys.executable, "-m", "student_trainer", "cache", "--teacher-url", server.url, "--data",
                          "tiny-broken", "--output", "cli-failure", "--splits", "train", "--k", "4", "--shard-size", "16"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert cli.returncode == 1 and "ended failed" in cli.stderr and "engine failed" in cli.stderr, cli.stderr

    # Cancel works on a failed job too, and resume continues from there once the data is fixed.
    assert httpx.delete(f"{server.url}/v1/cache/jobs/{job['id']}").json()["state"] == "cancelled"
    victim.write_bytes(good)
    assert httpx.post(f"{server.url}/v1/cache/jobs/{job['id']}/resume").status_code == 202
    done = wait_job(server.url, job["id"])
    assert done["state"] == "done" and done["error"] is None, done
    same_shards(cache_root / "after-failure", reference)
    CacheReader(cache_root / "after-failure", verify=True)
    # A done job stays done when cancelled.
    assert httpx.delete(f"{server.url}/v1/cache/jobs/{job['id']}").json()["state"] == "done"


def flood(url: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """One client sending /v1/topk requests of 8 x 32 tokens back to back until ``stop``."""
    rng = np.random.default_rng(threading.get_ident() % 2**32)
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            ids = rng.integers(3, 300, size=(8, 32)).tolist()
            status = client.post("/v1/topk", json={"input_ids": ids, "k": 4}).status_code
            counts[str(status)] = counts.get(str(status), 0) + 1
            if status == 429:
                time.sleep(0.01)  # a refused client backs off a little (2 shared cores)


@pytest.mark.parametrize("busy_retry_s", ["0", "30"])
def test_a_job_under_a_flood_of_clients_completes_or_fails_then_resumes(hroots, tiny_model_dir, reference,
                                                                        busy_retry_s) -> None:
    data_root, cache_root, _ = hroots
    flood_cache = cache_root.parent / f"flood-cache-{busy_retry_s}"
    # A queue of 600 tokens holds one job request (16 x 32 tokens) only when at most 88 tokens wait,
    # so the job meets 429 often; it retries for busy_retry_s seconds before it fails (0: at the first 429).
    teacher = start_server(str(tiny_model_dir), cache_root.parent / "logs-flood",
                           env={"TEACHER_DATA_ROOT": str(data_root), "TEACHER_CACHE_ROOT": str(flood_cache),
                                "TEACHER_MAX_QUEUED_TOKENS": "600", "TEACHER_MAX_TOKENS_PER_REQUEST": "512",
                                "TEACHER_CACHE_JOB_BUSY_RETRY_S": busy_retry_s, "TEACHER_TORCH_THREADS": "1"})
    stop, counts = threading.Event(), {}
    clients = [threading.Thread(target=flood, args=(teacher.url, stop, counts)) for _ in range(4)]
    try:
        for client in clients:
            client.start()
        for _ in range(2000):  # the flood fills the queue before the job starts
            if counts.get("429", 0) >= 5:
                break
            time.sleep(0.05)
        assert counts.get("429", 0) >= 5, f"the flood never filled the queue: {counts}"
        job = post_job(teacher.url, dataset="tiny", output="flooded", k=4, shard_size=16).json()
        first = wait_job(teacher.url, job["id"])
        stop.set()
        for client in clients:
            client.join()
        print(f"\nflood: /v1/topk replies {counts}; job ended {first['state']} "
              f"({first['shards_done']}/{first['shards_total']} shards, {first.get('busy_retries')} retries on 429): "
              f"{first['error']}")
        assert set(counts) <= {"200", "429"}, counts
        assert first["state"] in ("done", "failed"), first
        if first["state"] == "failed":
            assert "queue stayed full" in first["error"], first
            clean_message(first["error"], data_root, flood_cache)
            assert httpx.post(f"{teacher.url}/v1/cache/jobs/{job['id']}/resume").status_code == 202
            assert wait_job(teacher.url, job["id"])["state"] == "done"
    finally:
        stop.set()
        teacher.stop()
    flooded = CacheReader(flood_cache / "flooded", verify=True)  # every shard's sha256 checked
    undisturbed = CacheReader(reference)
    assert flooded.complete and len(flooded) == len(undisturbed)
    for index in range(len(undisturbed)):
        a, b = undisturbed.lookup(index), flooded.lookup(index)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        # Flood requests share batches with the job's, so padding (and float rounding) may differ.
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-3)
        np.testing.assert_allclose(a.tail_logprob, b.tail_logprob, atol=2e-3)


# --------------------------------------------------------------- item 14: confinement at open time


def test_symlinks_swapped_in_after_the_post_are_refused_when_the_job_opens_them(server, hroots) -> None:
    data_root, cache_root, outside = hroots
    shutil.copytree(data_root / "tiny", data_root / "swap-data")
    shutil.copytree(data_root / "tiny", outside / "dataset")
    (outside / "out").mkdir()

    blocker = post_job(server.url, dataset="long", output="blocker", k=4, shard_size=64).json()
    wait_job(server.url, blocker["id"], states=("running",))
    # These wait behind the blocker (one job at a time), so their folders are swapped before they open them.
    swap_out = post_job(server.url, dataset="tiny", output="swap-out", k=4, shard_size=16).json()
    swap_data = post_job(server.url, dataset="swap-data", output="swap-data-out", k=4, shard_size=16).json()
    queued = post_job(server.url, dataset="tiny", output="never", k=4, shard_size=16).json()
    assert {swap_out["state"], swap_data["state"], queued["state"]} == {"queued"}
    (cache_root / "swap-out").symlink_to(outside / "out", target_is_directory=True)
    shutil.rmtree(data_root / "swap-data")
    (data_root / "swap-data").symlink_to(outside / "dataset", target_is_directory=True)

    # Cancel works while queued and while running.
    assert httpx.delete(f"{server.url}/v1/cache/jobs/{queued['id']}").json()["state"] == "cancelled"
    assert httpx.delete(f"{server.url}/v1/cache/jobs/{blocker['id']}").json()["state"] in ("running", "cancelled")
    assert wait_job(server.url, blocker["id"])["state"] == "cancelled"

    for job, words in ((swap_out, "'output' 'swap-out' resolves outside"), (swap_data, "'dataset' 'swap-data' resolves outside")):
        ended = wait_job(server.url, job["id"])
        assert ended["state"] == "failed" and words in ended["error"], ended
        clean_message(ended["error"], data_root, cache_root, outside)
    assert wait_job(server.url, queued["id"])["state"] == "cancelled"
    assert list((outside / "out").iterdir()) == []  # nothing written outside the cache root
    assert not (cache_root / "swap-data-out").exists() and not (cache_root / "never").exists()


def test_a_planted_lock_or_manifest_symlink_is_not_followed(server, hroots) -> None:
    data_root, cache_root, outside = hroots
    (cache_root / "planted-lock").mkdir()
    (cache_root / "planted-lock" / ".lock").symlink_to(outside / "lock-target")
    (outside / "foreign-manifest.json").write_text('{"format": "retnet-distill-teacher-cache", "secret": 1}')
    (cache_root / "planted-manifest").mkdir()
    (cache_root / "planted-manifest" / "manifest.json").symlink_to(outside / "foreign-manifest.json")
    for output, words in (("planted-lock", ".lock is a symlink"), ("planted-manifest", "manifest.json is a symlink")):
        job = post_job(server.url, dataset="tiny", output=output, k=4, shard_size=16).json()
        ended = wait_job(server.url, job["id"])
        assert ended["state"] == "failed" and words in ended["error"], ended
        clean_message(ended["error"], data_root, cache_root, outside)
    assert not (outside / "lock-target").exists()  # the lock was not created through the link
    assert list(outside.glob("*.safetensors")) == [] and list((cache_root / "planted-manifest").glob("shard-*")) == []

    # A dataset whose manifest is a symlink (to a manifest outside the root) is refused at the POST.
    linked = data_root / "linked-manifest"
    shutil.copytree(data_root / "tiny", linked)
    shutil.move(str(linked / "manifest.json"), str(outside / "dataset-manifest.json"))
    (linked / "manifest.json").symlink_to(outside / "dataset-manifest.json")
    reply = post_job(server.url, dataset="linked-manifest", output="linked-out", k=4, shard_size=16)
    assert reply.status_code == 422 and "manifest.json is a symlink" in reply.json()["error"]["message"], reply.text
    clean_message(reply.json()["error"]["message"], data_root, outside)
    # ... and so is one whose shard file is a symlink.
    (linked / "manifest.json").unlink()
    shutil.copy(outside / "dataset-manifest.json", linked / "manifest.json")
    shard = linked / "train-00001.tokens.npy"
    shutil.move(str(shard), str(outside / shard.name))
    shard.symlink_to(outside / shard.name)
    reply = post_job(server.url, dataset="linked-manifest", output="linked-out", k=4, shard_size=16)
    assert reply.status_code == 422 and "not a regular file" in reply.json()["error"]["message"], reply.text
    assert not (cache_root / "linked-out").exists()


def test_the_cache_writer_stays_in_the_folder_it_opened(tmp_path) -> None:
    """The writer's own backstop for the instant between the job's check and its open: it checks
    the folder it holds open, and a path swapped later does not redirect its writes."""
    from shared.cache_format import CacheError, CacheWriter
    from tests.test_cache_format import make_shard, make_spec

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    spec = make_spec()
    with pytest.raises(CacheError, match="resolves outside"):
        CacheWriter(root / "escape", spec, confine_to=root)
    assert list(outside.iterdir()) == []  # not even the lock file

    with CacheWriter(root / "out", spec, confine_to=root) as writer:
        (root / "out").rename(root / "moved")
        (root / "out").symlink_to(outside, target_is_directory=True)  # swapped after the open
        for index, _, _ in writer.missing_shards():
            writer.write_shard(index, **make_shard(spec, index))
    assert list(outside.iterdir()) == []
    assert CacheReader(root / "moved", verify=True).complete


# ------------------------------------------------------------------ item 15: damaged job files


def test_a_damaged_job_file_is_set_aside_and_a_graceful_stop_interrupts_running_jobs(hroots, tiny_model_dir) -> None:
    data_root, cache_root, _ = hroots
    root = cache_root.parent / "damaged-cache"
    jobs = root / ".jobs"
    jobs.mkdir(parents=True)
    good = {"id": "goodjob00001", "state": "done", "created": 1.0, "error": None, "shards_done": 1, "shards_total": 1,
            "tokens_done": 10, "tokens_per_second": 1.0, "dataset": "tiny", "output": "x", "split": "train", "k": 4,
            "temperature": 1.0, "shard_size": 16, "target_type": "topk_fp16", "q8_step": 0.0625}
    (jobs / "goodjob00001.json").write_text(json.dumps(good))
    (jobs / "badjob000001.json").write_text(json.dumps({**good, "id": "badjob000001"})[:40])  # truncated
    teacher = start_server(str(tiny_model_dir), root.parent / "logs-damaged",
                           env={"TEACHER_DATA_ROOT": str(data_root), "TEACHER_CACHE_ROOT": str(root)})
    try:
        listed = httpx.get(teacher.url + "/v1/cache/jobs").json()["jobs"]
        assert [job["id"] for job in listed] == ["goodjob00001"]
        assert httpx.get(teacher.url + "/v1/cache/jobs/badjob000001").status_code == 404
        # A graceful stop with a running and a queued job: both end 'interrupted' and the server exits 0
        # (a job left waiting on the stopped batcher used to hold the process until it was killed).
        running = post_job(teacher.url, dataset="long", output="long", k=4, shard_size=64).json()
        queued = post_job(teacher.url, dataset="tiny", output="tiny", k=4, shard_size=16).json()
        wait_job(teacher.url, running["id"], states=("running",))
    finally:
        code = teacher.stop()
    assert code == 0, teacher.log()[-3000:]
    for job in (running, queued):
        assert json.loads((jobs / f"{job['id']}.json").read_text())["state"] == "interrupted"
    assert not (jobs / "badjob000001.json").exists() and (jobs / "badjob000001.json.damaged").is_file()
    assert "badjob000001.json is damaged" in teacher.log()


# ------------------------------------------------------------ item 10: hostile bodies give 4xx


def test_hostile_bodies_get_a_4xx_json_error(server, hroots) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ({"dataset": "ti\x00ny", "output": "x"}, "control characters"),
        ({"dataset": "tiny", "output": "o\x00ut"}, "control characters"),
        ({"dataset": "a" * 5000, "output": "x"}, "too long"),
        ({"dataset": "tiny", "output": "b" * 300}, "too long"),
        ({"dataset": "tiny", "output": "/".join(["c"] * 400)}, "too long"),
        ({"dataset": "tiny", "output": "x", "k": json.loads("[" * 500 + "]" * 500)}, "k must be an integer"),
        ({"dataset": "tiny", "output": "x", "split": "s\x00"}, "no split"),
        ({"dataset": 7, "output": "x"}, "non-empty relative name"),
    ]
    for body, words in cases:
        reply = httpx.post(server.url + "/v1/cache/jobs", json=body)
        assert 400 <= reply.status_code < 500 and words in reply.json()["error"]["message"], (body, reply.text[:300])
    for raw in (deep, '{"dataset": ' + deep + "}", '{"dataset": "tiny", "output": {"a": ' * 3000 + "1" + "}" * 3001):
        reply = httpx.post(server.url + "/v1/cache/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= reply.status_code < 500 and reply.json()["error"]["type"], reply.text[:300]


def test_property_the_cache_job_route_never_answers_5xx(server) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    names = st.one_of(st.text(max_size=40), st.sampled_from(["tiny", "hyp-out", "", ".", "..", "/etc", ".jobs", "a/../b",
                                                              "tiny/../tiny", "x\x00y", "z" * 300]))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                               max_size=3), max_leaves=8)
    fields = st.sampled_from(["dataset", "output", "split", "k", "temperature", "shard_size", "target_type", "q8_step",
                              "other"])
    bodies = st.one_of(values, st.dictionaries(fields, st.one_of(names, values), max_size=8),
                       st.fixed_dictionaries({"dataset": names, "output": names},
                                             optional={"k": values, "split": names, "shard_size": values}))
    client = httpx.Client(base_url=server.url, timeout=60)

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def never_5xx(body) -> None:
        raw = json.dumps(body, allow_nan=True)
        reply = client.post("/v1/cache/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert reply.status_code < 500, (raw[:300], reply.text[:300])
        assert "error" in reply.json() or reply.status_code == 202

    try:
        never_5xx()
    finally:
        client.close()
