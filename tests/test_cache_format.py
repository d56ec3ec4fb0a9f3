"""Teacher cache v1: resumable deterministic writes, memory-mapped lookups, corruption and mismatch errors."""

from __future__ import annotations

import gc
import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.cache_format import (
    DEFAULT_Q8_STEP,
    CacheCorrupted,
    CacheError,
    CacheMismatch,
    CacheMiss,
    CacheSpec,
    CacheWriter,
    bytes_per_token,
    dequantize_q8,
    quantize_q8,
)
from shared.cache_reader import CacheReader, read_safetensors_header

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_spec(**overrides) -> CacheSpec:
    fields = dict(teacher_model="tiny/teacher", teacher_fingerprint="w-0123", tokenizer_sha256="ab" * 32,
                  vocab_size=320, k=8, temperature=1.0, target_type="topk_fp16", dataset_path="data/tiny",
                  dataset_fingerprint="cd" * 32, split="train", max_seq_length=12, num_sequences=10, shard_size=3)
    fields.update(overrides)
    return CacheSpec(**fields)


def make_shard(spec: CacheSpec, index: int) -> dict[str, np.ndarray]:
    """Random but reproducible targets for shard ``index``, with -inf padding entries and tails."""
    rng = np.random.default_rng(1000 + index)
    count = spec.shard_range(index)[1]
    lengths = rng.integers(1, spec.max_seq_length + 1, size=count).astype(np.int32)
    input_ids = np.zeros((count, spec.max_seq_length), dtype=np.int32)  # pad id 0, as in the dataset
    for row, n in enumerate(lengths):
        input_ids[row, :n] = rng.integers(0, spec.vocab_size, size=n)
    rows = int(lengths.sum())
    indices = rng.integers(0, spec.vocab_size, size=(rows, spec.k))
    logprobs = -np.cumsum(rng.exponential(1.5, size=(rows, spec.k)), axis=1).astype(np.float32)
    logprobs[rng.random(rows) < 0.3, -2:] = -np.inf  # fewer than k ids available: padded entries
    indices[np.isneginf(logprobs)] = 0
    tail = np.log(rng.uniform(1e-6, 0.5, size=rows)).astype(np.float32)
    tail[rng.random(rows) < 0.2] = -np.inf  # the k ids hold all the mass
    return dict(input_ids=input_ids, lengths=lengths, indices=indices, logprobs=logprobs, tail_logprob=tail)


def write_all(directory: Path, spec: CacheSpec) -> None:
    with CacheWriter(directory, spec) as writer:
        for index, _, _ in writer.missing_shards():
            writer.write_shard(index, **make_shard(spec, index))
        assert writer.complete


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ".lock"}


@pytest.mark.parametrize("target_type", ["topk_fp16", "topk_q8"])
def test_killed_writer_resumes_at_first_missing_shard_and_matches_uninterrupted_write(tmp_path, target_type):
    spec = make_spec(target_type=target_type)
    write_all(tmp_path / "straight", spec)

    resumed = tmp_path / "resumed"
    writer = CacheWriter(resumed, spec)
    assert writer.missing_shards() == [(0, 0, 3), (1, 3, 3), (2, 6, 3), (3, 9, 1)]
    for index in (0, 1):
        writer.write_shard(index, **make_shard(spec, index))
    del writer  # "killed": no close(), then debris of the shard it was writing
    gc.collect()
    (resumed / ".shard-00002.safetensors.tmp-99999").write_bytes(b"half a shard")
    (resumed / "shard-00002.safetensors").write_bytes(b"renamed, but not in the manifest yet")
    assert not json.loads((resumed / "manifest.json").read_text())["complete"]

    writer = CacheWriter(resumed, spec)
    assert writer.missing_shards() == [(2, 6, 3), (3, 9, 1)]
    assert not list(resumed.glob(".*.tmp-*")), "the temp file of the killed writer is cleaned up"
    for index, _, _ in writer.missing_shards():
        writer.write_shard(index, **make_shard(spec, index))
    assert writer.complete and writer.missing_shards() == []
    writer.close()

    assert files_of(resumed) == files_of(tmp_path / "straight")  # shards and manifest, byte for byte
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["complete"] and [s["first"] for s in manifest["shards"]] == [0, 3, 6, 9]


def test_listed_shard_with_wrong_size_is_written_again(tmp_path):
    spec = make_spec()
    write_all(tmp_path, spec)
    path = tmp_path / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with CacheWriter(tmp_path, spec) as writer:
        assert writer.missing_shards() == [(1, 3, 3)] and not writer.complete


@pytest.mark.parametrize("target_type", ["topk_fp16", "topk_q8"])
def test_lookup_returns_what_was_written(tmp_path, target_type):
    spec = make_spec(target_type=target_type)
    write_all(tmp_path, spec)
    reader = CacheReader(tmp_path)
    assert reader.complete and len(reader) == spec.num_sequences
    rows = []
    for index in range(spec.num_shards):
        data = make_shard(spec, index)
        offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
        for i in range(len(data["lengths"])):
            a, b = offsets[i], offsets[i + 1]
            rows.append((data["input_ids"][i], int(data["lengths"][i]), data["indices"][a:b],
                         data["logprobs"][a:b], data["tail_logprob"][a:b]))
    for row_index, (ids, length, indices, logprobs, tail) in enumerate(rows):
        got = reader.lookup(row_index)
        np.testing.assert_array_equal(got.input_ids, ids)
        assert got.length == length and got.indices.dtype == np.uint16
        np.testing.assert_array_equal(got.indices, indices)
        np.testing.assert_array_equal(got.tail_logprob, tail)  # float32, exact, -inf kept
        assert got.logprobs.dtype == np.float32 and got.logprobs.shape == (length, spec.k)
        dropped = logprobs < -254.5 * spec.q8_step if spec.q8_step else np.isneginf(logprobs)  # q8: below range
        np.testing.assert_array_equal(np.isneginf(got.logprobs), np.isneginf(logprobs) | dropped)
        finite = np.isfinite(got.logprobs)
        if target_type == "topk_fp16":
            np.testing.assert_array_equal(got.logprobs, logprobs.astype(np.float16).astype(np.float32))
        else:  # the stated bound: within step / 2 wherever the value is in range
            assert np.abs(got.logprobs[finite] - logprobs[finite]).max() <= spec.q8_step / 2
    assert any(np.isneginf(r[3]).any() for r in rows) and any(np.isneginf(r[4]).any() for r in rows)

    picked = [7, 0, 9, 3, 7]
    for row_index, got in zip(picked, reader.lookup_many(np.array(picked))):
        np.testing.assert_array_equal(got.indices, reader.lookup(row_index).indices)


@pytest.mark.parametrize("step", [DEFAULT_Q8_STEP, 0.07])
def test_q8_error_bound_and_special_values(step):
    rng = np.random.default_rng(0)
    in_range = rng.uniform(-254.5 * step, 0, size=100_000).astype(np.float32)
    decoded = dequantize_q8(quantize_q8(in_range, step), step)
    assert decoded.dtype == np.float32
    assert np.abs(decoded - in_range).max() <= step / 2 * (1 + 1e-5)
    special = np.array([0.0, 1e-4, -np.inf, -254.4 * step, -254.6 * step, -1e4], dtype=np.float32)
    codes = quantize_q8(special, step)
    np.testing.assert_array_equal(codes, [0, 0, 255, 254, 255, 255])
    assert np.isneginf(dequantize_q8(codes, step)[[2, 4, 5]]).all()
    assert dequantize_q8(np.array([1], np.uint8), step)[0] == np.float32(-step)


@pytest.mark.parametrize("vocab_size, stored", [(65536, "U16"), (65537, "I32")])
def test_id_dtype_follows_vocab_size(tmp_path, vocab_size, stored):
    spec = make_spec(vocab_size=vocab_size, num_sequences=2, shard_size=2)
    data = make_shard(spec, 0)
    data["indices"][0, 0] = vocab_size - 1  # the largest id survives either dtype
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, **data)
    header, _ = read_safetensors_header(tmp_path / "shard-00000.safetensors")
    assert header["indices"]["dtype"] == stored
    got = CacheReader(tmp_path).lookup(0)
    assert got.indices[0, 0] == vocab_size - 1


def test_flipped_byte_is_caught_by_verify(tmp_path):
    write_all(tmp_path, make_spec())
    path = tmp_path / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # in the data buffer: size and header still fine
    path.write_bytes(bytes(data))
    CacheReader(tmp_path).lookup(0)  # without verify, the flip goes unnoticed (by design: no full read)
    with pytest.raises(CacheCorrupted, match=r"shard-00002\.safetensors.*sha256"):
        CacheReader(tmp_path, verify=True)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # in the data buffer: size and header still fine
    path.write_bytes(bytes(data))


def test_first_read_verification_checks_each_shard_before_its_rows_are_used(tmp_path):
    write_all(tmp_path, make_spec())
    flip_a_byte(tmp_path / "shard-00002.safetensors")  # rows 6..8
    reader = CacheReader(tmp_path, verify="first_read")  # opening hashes nothing
    reader.lookup(0)  # shard 0 is fine
    with pytest.raises(CacheCorrupted, match=r"shard-00002\.safetensors.*sha256"):
        reader.lookup(7)
    with pytest.raises(CacheCorrupted):
        reader.lookup(6)  # still refused on the next try
    with pytest.raises(ValueError, match="verify must be"):
        CacheReader(tmp_path, verify="always")


def test_a_verified_shard_is_not_hashed_again_until_its_file_changes(tmp_path, monkeypatch):
    import shared.cache_reader as cache_reader

    write_all(tmp_path, make_spec())
    hashed: list[str] = []
    real = cache_reader.sha256_file
    monkeypatch.setattr(cache_reader, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    for row in range(10):
        CacheReader(tmp_path, verify="first_read").lookup(row)  # a new reader (a new run) per row
    assert sorted(hashed) == [f"shard-0000{i}.safetensors" for i in range(4)]  # once per shard, not per run
    stamps = json.loads((tmp_path / "verified.json").read_text())
    assert sorted(stamps) == sorted(set(hashed))
    hashed.clear()
    flip_a_byte(tmp_path / "shard-00001.safetensors")  # rewritten: another mtime
    with pytest.raises(CacheCorrupted, match="sha256"):
        CacheReader(tmp_path, verify="first_read").lookup(4)
    assert hashed == ["shard-00001.safetensors"]


def test_first_read_verification_works_where_the_stamp_cannot_be_written(tmp_path):
    import os

    write_all(tmp_path, make_spec())
    (tmp_path / f".verified.json.{os.getpid()}.tmp").mkdir()  # the stamp's staging file cannot be created
    reader = CacheReader(tmp_path, verify="first_read")
    assert reader.lookup(9).length > 0 and reader.lookup(0).length > 0
    assert not (tmp_path / "verified.json").exists()


def test_truncated_shard_fails_at_open(tmp_path):
    write_all(tmp_path, make_spec())
    path = tmp_path / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheCorrupted, match=r"shard-00001\.safetensors has 100 bytes"):
        CacheReader(tmp_path)


def test_reopening_with_another_spec_names_the_field(tmp_path):
    write_all(tmp_path, make_spec())
    with pytest.raises(CacheMismatch, match=r"k: 8 vs 4"):
        CacheWriter(tmp_path, make_spec(k=4))
    with pytest.raises(CacheMismatch, match=r"temperature: 1\.0 vs 2\.0.*dataset_fingerprint"):
        CacheWriter(tmp_path, make_spec(temperature=2.0, dataset_fingerprint="ef" * 32))
    with CacheWriter(tmp_path, make_spec(dataset_path="moved/tiny")) as writer:  # not an identity field
        assert writer.complete


def test_check_compatible_says_what_the_cache_was_made_for(tmp_path):
    write_all(tmp_path, make_spec(k=8))
    reader = CacheReader(tmp_path)
    reader.check_compatible(k=8, temperature=1, tokenizer_sha256="ab" * 32)
    with pytest.raises(CacheMismatch, match="cache was made for k=8, this run asks for k=32"):
        reader.check_compatible(k=32, temperature=1.0)
    with pytest.raises(TypeError, match="colour"):
        reader.check_compatible(colour="red")
    reader.check_input_ids(4, reader.lookup(4).input_ids)
    other = reader.lookup(4).input_ids.copy()
    other[0] = (other[0] + 1) % 320
    with pytest.raises(CacheMismatch, match="dataset row 4 differs.*position 0"):
        reader.check_input_ids(4, other)


def test_missing_rows_raise_cache_miss(tmp_path):
    spec = make_spec()
    with CacheWriter(tmp_path, spec) as writer:
        writer.write_shard(0, **make_shard(spec, 0))
        writer.write_shard(2, **make_shard(spec, 2))
    reader = CacheReader(tmp_path)
    assert not reader.complete and reader.has_row(7) and not reader.has_row(4)
    reader.lookup(7)
    with pytest.raises(CacheMiss, match=r"row 4 is in shard 1 \(rows 3\.\.5\).*incomplete \(2/4 shards\)"):
        reader.lookup(4)
    with pytest.raises(CacheMiss, match="row 10 is outside split 'train'"):
        reader.lookup(10)


def test_bytes_per_token_matches_file_sizes(tmp_path):
    assert bytes_per_token("topk_fp16", 64, 32000) == 260
    assert bytes_per_token("topk_q8", 64, 32000) == 196
    assert bytes_per_token("topk_fp16", 64, 128256) == 388  # Llama 3: int32 ids
    for target_type in ("topk_fp16", "topk_q8"):
        for vocab_size in (320, 70000):
            spec = make_spec(target_type=target_type, vocab_size=vocab_size, k=16)
            directory = tmp_path / f"{target_type}-{vocab_size}"
            write_all(directory, spec)
            for record in json.loads((directory / "manifest.json").read_text())["shards"]:
                _, data_start = read_safetensors_header(directory / record["file"])
                per_sequence = 4 * spec.max_seq_length + 4  # input_ids row + its length
                target_bytes = record["bytes"] - data_start - record["count"] * per_sequence
                assert target_bytes == record["rows"] * bytes_per_token(target_type, 16, vocab_size)


def test_write_shard_rejects_bad_arrays_with_clear_errors(tmp_path):
    spec = make_spec()
    writer = CacheWriter(tmp_path, spec)
    good = make_shard(spec, 0)
    with pytest.raises(ValueError, match=r"expected input_ids \[3, 12\]"):
        writer.write_shard(0, **{**good, "input_ids": good["input_ids"][:2]})
    with pytest.raises(ValueError, match=r"indices must be in \[0, 320\)"):
        writer.write_shard(0, **{**good, "indices": good["indices"] + 320})
    bad = good["logprobs"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or positive"):
        writer.write_shard(0, **{**good, "logprobs": bad})
    with pytest.raises(ValueError, match=r"expected tail_logprob of shape"):
        writer.write_shard(0, **{**good, "tail_logprob": good["tail_logprob"][:-1]})
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 4\)"):
        writer.write_shard(4, **good)
    with pytest.raises(CacheError, match="another CacheWriter"):
        CacheWriter(tmp_path, spec)
    writer.close()
    assert writer.missing_shards()[0] == (0, 0, 3)


def test_spec_validation_and_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="target_type must be one of"):
        make_spec(target_type="fp8")
    with pytest.raises(ValueError, match="q8_step applies to target_type 'topk_q8' only"):
        make_spec(q8_step=0.1)
    with pytest.raises(ValueError, match="k=400 exceeds vocab_size=320"):
        make_spec(k=400)
    assert make_spec(target_type="topk_q8").q8_step == DEFAULT_Q8_STEP
    assert replace(make_spec(), num_sequences=7).num_shards == 3
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a teacher cache"):
        CacheWriter(tmp_path, make_spec())
    with pytest.raises(CacheError, match="manifest.json not found"):
        CacheReader(tmp_path)


def test_shared_cache_modules_do_not_import_torch():
    code = ("import sys, shared.cache_reader, shared.cache_format as f; "
            "assert f.CacheReader; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_hand_parsed_shards_agree_with_safetensors_and_reader_pickles(tmp_path):
    from safetensors.numpy import load_file

    spec = make_spec(target_type="topk_q8", vocab_size=70000)
    write_all(tmp_path, spec)
    reader = CacheReader(tmp_path)
    reference = load_file(tmp_path / "shard-00001.safetensors")
    got = reader.lookup(3)  # the first row of shard 1
    n = int(reference["lengths"][0])
    np.testing.assert_array_equal(got.input_ids, reference["input_ids"][0])
    np.testing.assert_array_equal(got.indices, reference["indices"][:n])
    assert got.indices.dtype == np.int32
    np.testing.assert_array_equal(got.logprobs, dequantize_q8(reference["logprobs_q8"][:n], spec.q8_step))
    clone = pickle.loads(pickle.dumps(reader))  # DataLoader workers: headers travel, mappings do not
    assert reader._shards[1].tensors is not None and clone._shards[1].tensors is None
    np.testing.assert_array_equal(clone.lookup(3).logprobs, got.logprobs)
