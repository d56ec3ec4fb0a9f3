"""Teacher cache target types ``topk_coded`` and ``sampled``: write, read back as CachedRow, refuse corruption."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import target_codec as tc
from shared.cache_format import CacheCorrupted, CacheWriter, bytes_per_token
from shared.cache_reader import CacheReader, read_safetensors_header
from tests.conftest import REPO_ROOT
from tests.test_cache_format import make_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_coded_shard(spec, index: int) -> dict[str, np.ndarray]:
    """Reproducible targets with unique ids per row; sampled: counts out of k draws, tail -inf."""
    rng = np.random.default_rng(2000 + index)
    count = spec.shard_range(index)[1]
    lengths = rng.integers(1, spec.max_seq_length + 1, size=count).astype(np.int32)
    input_ids = np.zeros((count, spec.max_seq_length), dtype=np.int32)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = rng.integers(0, spec.vocab_size, size=n)
    rows, k = int(lengths.sum()), spec.k
    indices = np.stack([rng.choice(spec.vocab_size, k, replace=False) for _ in range(rows)])
    if spec.target_type == "sampled":
        draws = rng.integers(0, 20, size=(rows, k))  # few distinct ids, so counts > 1 occur
        counts = np.stack([np.bincount(np.unique(d, return_inverse=True)[1], minlength=k) for d in draws])
        with np.errstate(divide="ignore"):
            logprobs = np.log(counts / k).astype(np.float32)
        tail = np.full(rows, -np.inf, dtype=np.float32)
    else:
        logits = rng.normal(0, 2, size=(rows, k + 1))
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        logprobs, tail = logp[:, :k].astype(np.float32), logp[:, k].astype(np.float32)
        logprobs[rng.random(rows) < 0.3, -2:] = -np.inf
    return dict(input_ids=input_ids, lengths=lengths, indices=indices, logprobs=logprobs, tail_logprob=tail)


def write_all(directory: Path, spec) -> list[dict[str, np.ndarray]]:
    shards = [make_coded_shard(spec, i) for i in range(spec.num_shards)]
    with CacheWriter(directory, spec) as writer:
        for index, _, _ in writer.missing_shards():
            writer.write_shard(index, **shards[index])
    return shards


def rows_of(shard: dict[str, np.ndarray]):
    offsets = np.concatenate([[0], np.cumsum(shard["lengths"])])
    for i in range(len(shard["lengths"])):
        a, b = offsets[i], offsets[i + 1]
        yield shard["indices"][a:b], shard["logprobs"][a:b], shard["tail_logprob"][a:b]


@pytest.mark.parametrize("target_type, extra", [("topk_coded", {}), ("topk_coded", {"mass_cutoff": 0.05}),
                                                ("topk_coded", {"code_step": 0.25, "code_knee": 0.0}),
                                                ("sampled", {})])
def test_lookup_returns_the_written_targets_in_the_usual_arrays(tmp_path, target_type, extra):
    spec = make_spec(target_type=target_type, **extra)
    shards = write_all(tmp_path, spec)
    reader = CacheReader(tmp_path, verify=True)
    row = 0
    for shard in shards:
        for indices, logprobs, tail in rows_of(shard):
            got = reader.lookup(row)
            row += 1
            assert got.indices.dtype == np.uint16 and got.indices.shape == (len(tail), spec.k)
            assert got.logprobs.dtype == np.float32 and got.tail_logprob.dtype == np.float32
            for r in range(len(tail)):
                want = {int(i): float(v) for i, v in zip(indices[r], logprobs[r]) if np.isfinite(v)}
                keep = np.isfinite(got.logprobs[r])
                have = dict(zip(got.indices[r][keep].tolist(), got.logprobs[r][keep].tolist()))
                assert np.all(np.diff(got.logprobs[r][keep]) <= 0), "rank order"
                if target_type == "sampled":
                    assert have.keys() == want.keys() and got.tail_logprob[r] == -np.inf
                    np.testing.assert_allclose(list(have.values()), [want[i] for i in have], rtol=1e-6)
                    continue
                assert set(have) <= set(want) and (extra.get("mass_cutoff") or set(have) == set(want))
                for i, v in have.items():
                    assert abs(v - want[i]) <= tc.error_bound(np.array(want[i]), spec.code_step, spec.code_knee) + 1e-6
                if set(have) == set(want):
                    assert got.tail_logprob[r] == tail[r]
                else:  # the dropped mass is in the tail now
                    before = np.logaddexp.reduce([*want.values(), float(tail[r])])
                    after = np.logaddexp.reduce([*(want[i] for i in have), float(got.tail_logprob[r])])
                    assert abs(before - after) < 1e-5
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    target_bytes = sum(s["target_bytes"] for s in manifest["shards"])
    assert manifest["bytes_per_token"] == round(target_bytes / sum(s["rows"] for s in manifest["shards"]), 2)


@pytest.mark.parametrize("target_type", ["topk_coded", "sampled"])
def test_resumed_coded_cache_is_byte_identical(tmp_path, target_type):
    spec = make_spec(target_type=target_type, **({"mass_cutoff": 0.01} if target_type == "topk_coded" else {}))
    write_all(tmp_path / "straight", spec)
    with CacheWriter(tmp_path / "resumed", spec) as writer:
        writer.write_shard(0, **make_coded_shard(spec, 0))
    write_all(tmp_path / "resumed", spec)
    for path in sorted((tmp_path / "straight").glob("*.safetensors")) + [tmp_path / "straight" / "manifest.json"]:
        assert path.read_bytes() == (tmp_path / "resumed" / path.name).read_bytes(), path.name


def test_a_flipped_byte_in_coded_targets_is_refused_at_lookup_without_sha256(tmp_path):
    spec = make_spec(target_type="topk_coded")
    write_all(tmp_path, spec)
    path = tmp_path / "shard-00001.safetensors"
    header, start = read_safetensors_header(path)
    begin, end = header["targets_coded"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    reader = CacheReader(tmp_path, verify=False)  # no sha256: the block's own CRC32 must catch it
    broken = []
    for row in range(3, 6):
        try:
            reader.lookup(row)
        except CacheCorrupted as exc:
            broken.append(str(exc))
    assert len(broken) == 1 and "CRC32 mismatch" in broken[0] and "shard-00001" in broken[0]
    reader.lookup(0)  # other shards still read


def test_sampled_cache_refuses_targets_that_are_not_sampled(tmp_path):
    spec = make_spec(target_type="sampled")
    shard = make_coded_shard(replace(spec, target_type="topk_coded"), 0)
    with CacheWriter(tmp_path, spec) as writer, pytest.raises(ValueError, match="sampled targets carry no tail"):
        writer.write_shard(0, **shard)
    shard["tail_logprob"][:] = -np.inf
    with CacheWriter(tmp_path, spec) as writer, pytest.raises(ValueError, match="log\\(count / 8\\)"):
        writer.write_shard(0, **shard)


def test_spec_fields_of_the_coded_types():
    assert make_spec(target_type="topk_coded").code_step == 1 / 64
    assert make_spec(target_type="topk_coded", code_step=0.1).code_step == float(np.float32(0.1))
    with pytest.raises(ValueError, match="code_step applies to target_type 'topk_coded' only"):
        make_spec(code_step=0.1)
    with pytest.raises(ValueError, match="mass_cutoff must be in \\[0, 1\\)"):
        make_spec(target_type="topk_coded", mass_cutoff=1.0)
    with pytest.raises(ValueError, match="at most 255"):
        make_spec(target_type="sampled", k=256, vocab_size=1000)
    with pytest.raises(ValueError, match="no fixed bytes per token"):
        bytes_per_token("topk_coded", 64, 49152)


@pytest.mark.slow
@pytest.mark.parametrize("target_type, extra", [("topk_coded", ["--mass-cutoff", "0.001"]), ("sampled", [])])
def test_cli_writes_coded_caches_the_cached_teacher_reads(roots, tiny_model_dir, tiny_engine, tmp_path,
                                                          target_type, extra):
    from student_trainer.data.shards import PretokenizedShardDataset, read_manifest
    from student_trainer.teachers import CachedTeacher, DirectTeacher
    from student_trainer.training.recipe import Batch

    data, output = roots[0] / "docs", tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "student_trainer", "cache", "--data", str(data), "--output", str(output),
                    "--teacher", str(tiny_model_dir), "--k", "16", "--shard-size", "64", "--splits", "train",
                    "--target-type", target_type, *extra], check=True, cwd=REPO_ROOT, capture_output=True)
    manifest = json.loads((output / "train" / "manifest.json").read_text())
    assert manifest["target_type"] == target_type and manifest["complete"] and manifest["bytes_per_token"] > 0
    dataset = PretokenizedShardDataset(data, "train")
    batch = Batch.from_rows([dataset[i] for i in (3, 70, 5)])
    cached = CachedTeacher(output, read_manifest(data), k=16, temperature=1.0, verify=True)
    got = cached.targets_for(batch.input_ids, batch.lengths, batch.indices)
    direct = DirectTeacher(tiny_engine, k=16, temperature=1.0).targets_for(batch.input_ids, batch.lengths,
                                                                            batch.indices)
    mask = torch.arange(batch.input_ids.shape[1])[None] < batch.lengths[:, None]
    if target_type == "sampled":  # n = 16 draws from the teacher: counts / 16, no tail
        p = got.logprobs[mask].exp()
        torch.testing.assert_close(p.sum(-1), torch.ones(int(mask.sum())))
        assert torch.all(got.tail_logprob[mask] == -torch.inf)
        torch.testing.assert_close(p * 16, (p * 16).round(), atol=1e-3, rtol=0)
    else:  # the top ids agree, and values within the grid's bound
        torch.testing.assert_close(got.indices[..., 0][mask], direct.indices[..., 0][mask])
        torch.testing.assert_close(got.logprobs[..., 0][mask], direct.logprobs[..., 0][mask], atol=0.05, rtol=0)
        mass = torch.logsumexp(torch.cat([got.logprobs[mask], got.tail_logprob[mask][:, None]], -1), -1)
        torch.testing.assert_close(mass, torch.zeros_like(mass), atol=0.03, rtol=0)


@pytest.mark.slow
def test_route_writes_the_same_coded_caches_as_the_cli(roots, tiny_model_dir, tmp_path):
    from tests.conftest import start_server
    from tests.test_cache_jobs_hardening import post_job, same_shards, wait_job

    data_root, cache_root = roots
    jobs = {"sampled": {"target_type": "sampled", "k": 12},
            "coded": {"target_type": "topk_coded", "k": 16, "mass_cutoff": 0.001, "code_step": 0.03125}}
    teacher = start_server(str(tiny_model_dir), tmp_path / "logs",
                           env={"TEACHER_DATA_ROOT": str(data_root), "TEACHER_CACHE_ROOT": str(cache_root)})
    try:
        refused = post_job(teacher.url, dataset="docs", output="bad", k=16, code_step=0.1)
        assert refused.status_code == 422 and "applies to target_type 'topk_coded' only" in refused.text
        refused = post_job(teacher.url, dataset="docs", output="bad", k=16, target_type="topk_coded", mass_cutoff=2)
        assert refused.status_code == 422 and "mass_cutoff must be" in refused.text
        for name, fields in jobs.items():
            reply = post_job(teacher.url, dataset="docs", output=f"route-{name}", shard_size=64, **fields)
            assert reply.status_code in (200, 201, 202), reply.text
            assert wait_job(teacher.url, reply.json()["id"])["state"] == "done"
    finally:
        teacher.stop()
    for name, fields in jobs.items():
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in fields.items()]
        subprocess.run([sys.executable, "-m", "student_trainer", "cache", "--data", str(data_root / "docs"),
                        "--output", str(tmp_path / name), "--teacher", str(tiny_model_dir), "--shard-size", "64",
                        "--splits", "train", *flags], check=True, cwd=REPO_ROOT, capture_output=True)
        same_shards(cache_root / f"route-{name}", tmp_path / name / "train")
        assert CacheReader(cache_root / f"route-{name}", verify=True).spec.target_type == fields["target_type"]
