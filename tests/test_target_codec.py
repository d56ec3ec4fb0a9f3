"""shared.target_codec: round trips within the documented bound, the mass cutoff, and refusal of corrupt blocks."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import target_codec as tc
from shared.cache_format import CacheCorrupted


def random_targets(seed: int, rows: int, k: int, vocab: int, pad_fraction: float = 0.2):
    """Unique ids per row, log-probs of a random distribution (some -inf), an exact-ish tail."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)]) if rows else np.zeros((0, k), int)
    logits = rng.normal(0, rng.uniform(0.5, 4), (rows, k + 1))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    lp, tail = logp[:, :k].astype(np.float32), logp[:, k].astype(np.float32)
    lp[rng.random((rows, k)) < pad_fraction] = -np.inf
    if rows > 2:
        lp[1] = -np.inf  # an all-padding row
    return ids.astype(np.int64), lp, tail


def finite_entries(ids: np.ndarray, lp: np.ndarray, row: int) -> dict[int, float]:
    keep = np.isfinite(lp[row])
    return dict(zip(ids[row][keep].tolist(), lp[row][keep].tolist()))


shapes = st.tuples(st.integers(0, 12), st.integers(1, 9), st.sampled_from([9, 300, 49152, 131072]),
                   st.integers(0, 2**31))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, step=st.sampled_from([1 / 64, 1 / 16, 1 / 4]), knee=st.sampled_from([0.0, 2.0, 4.0]),
       pad=st.sampled_from([0.0, 0.3, 1.0]))
def test_topk_round_trip_within_bound(shape, step, knee, pad):
    rows, k, vocab, seed = shape
    k = min(k, vocab)
    ids, lp, tail = random_targets(seed, rows, k, vocab, pad)
    lp[lp.shape[0] // 2:, 0] = np.float32(-200.0)  # far down the grid
    out = tc.decode(tc.encode_topk(ids, lp, tail, vocab, step=step, knee=knee))
    assert out.indices.shape == (rows, k) and out.logprobs.shape == (rows, k) and out.logprobs.dtype == np.float32
    np.testing.assert_array_equal(out.tail_logprob, tail)  # the tail is exact
    for r in range(rows):
        want, got = finite_entries(ids, lp, r), finite_entries(out.indices, out.logprobs, r)
        assert set(got) == set(want), f"row {r}: decoded ids {sorted(got)} != {sorted(want)}"
        for i, value in want.items():
            bound = float(tc.error_bound(np.array(value), step, knee)) + 1e-6 * (1 + abs(value))
            assert abs(got[i] - value) <= bound, f"row {r} id {i}: {got[i]} vs {value}, bound {bound}"
        row = out.logprobs[r]
        assert np.all(np.diff(row[np.isfinite(row)]) <= 0), "rank order: descending log-probs"
        assert np.all(out.indices[r][~np.isfinite(row)] == 0), "padding uses id 0"


def test_id_order_and_wide_k():
    ids, lp, tail = random_targets(3, 5, 300, 49152, 0.1)
    out = tc.decode(tc.encode_topk(ids, lp, tail, 49152), order="id")
    for r in range(5):
        n = int(np.isfinite(out.logprobs[r]).sum())
        assert np.all(np.diff(out.indices[r][:n].astype(int)) > 0)
        assert set(out.indices[r][:n].tolist()) == set(finite_entries(ids, lp, r))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), eps=st.sampled_from([1e-4, 1e-2, 0.1, 0.5]))
def test_mass_cutoff_folds_dropped_mass_into_tail(seed, eps):
    ids, lp, tail = random_targets(seed, 8, 16, 500, 0.1)
    out = tc.decode(tc.encode_topk(ids, lp, tail, 500, step=1 / 256, knee=0.0, eps=eps))
    for r in range(8):
        want, got = finite_entries(ids, lp, r), finite_entries(out.indices, out.logprobs, r)
        assert set(got) <= set(want) and (len(got) >= 1 or not want)
        dropped = [want[i] for i in set(want) - set(got)]
        dropped_mass = float(np.exp(np.array(dropped, dtype=np.float64)).sum())
        assert dropped_mass <= eps + 1e-9
        if dropped:  # the least probable went first
            assert max(dropped) <= min(want[i] for i in got) + 1e-6
            expect_tail = np.logaddexp(np.float64(tail[r]), np.log(dropped_mass))
            assert abs(out.tail_logprob[r] - expect_tail) <= 1e-5 * (1 + abs(expect_tail))
        else:
            assert out.tail_logprob[r] == tail[r]
        total = np.logaddexp.reduce(np.array([*got.values(), out.tail_logprob[r]], dtype=np.float64))
        before = np.logaddexp.reduce(np.array([*want.values(), tail[r]], dtype=np.float64))
        assert abs(total - before) < 0.01, f"row {r}: mass {np.exp(total)} after, {np.exp(before)} before"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.sampled_from([1, 12, 24, 255]), rows=st.integers(0, 10),
       vocab=st.sampled_from([5, 49152, 131072]))
def test_sampled_round_trip_is_exact(seed, n, rows, vocab):
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, vocab, (rows, n))
    ids = np.zeros((rows, n), np.int64)
    counts = np.zeros((rows, n), np.int64)
    for r in range(rows):
        u, c = np.unique(draws[r], return_counts=True)
        perm = rng.permutation(len(u))
        ids[r, : len(u)], counts[r, : len(u)] = u[perm], c[perm]
    out = tc.decode(tc.encode_sampled(ids, counts, n, vocab))
    assert out.indices.shape == (rows, n)
    assert np.all(out.tail_logprob == -np.inf)
    for r in range(rows):
        want = {int(i): int(c) for i, c in zip(ids[r], counts[r]) if c}
        finite = np.isfinite(out.logprobs[r])
        got = dict(zip(out.indices[r][finite].tolist(),
                       np.rint(n * np.exp(out.logprobs[r][finite].astype(np.float64))).astype(int).tolist()))
        assert got == want
        np.testing.assert_allclose(out.logprobs[r][finite], np.log(np.array(list(got.values())) / n), rtol=1e-6)
    # and back from the decoded target type (what the cache writer receives)
    np.testing.assert_array_equal(tc.sampled_from_targets(out.indices, out.logprobs, n).sum(axis=1), np.full(rows, n))


def _sample_blocks():
    ids, lp, tail = random_targets(11, 6, 8, 49152, 0.2)
    counts = np.array([[3, 2, 1, 0]] * 4)
    sampled = tc.encode_sampled(np.array([[5, 9, 700, 0]] * 4), counts, 6, 49152)
    return {"topk": tc.encode_topk(ids, lp, tail, 49152, eps=0.01), "sampled": sampled}


BLOCKS = _sample_blocks()


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(BLOCKS)), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(kind, where, bit):
    block = bytearray(BLOCKS[kind])
    block[int(where * len(block))] ^= 1 << bit
    with pytest.raises(tc.TargetCodecError):
        tc.decode(bytes(block))


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_every_truncation_and_extension_is_refused(kind):
    block = BLOCKS[kind]
    for cut in range(len(block)):
        with pytest.raises(tc.TargetCodecError):
            tc.decode(block[:cut])
    with pytest.raises(tc.TargetCodecError, match="truncated or padded"):
        tc.decode(block + b"\0")


def _reheader(block: bytes, **changes) -> bytes:
    """The block with header fields changed and a *valid* CRC: only the structural checks can catch it."""
    names = ["magic", "version", "kind", "k", "rows", "vocab", "step", "knee", "n", "nbytes", "flags",
             "s0", "s1", "s2", "s3", "s4"]
    fields = dict(zip(names, struct.unpack_from("<4sBBHIIffHBB5I", block)))
    fields.update(changes)
    header = struct.pack("<4sBBHIIffHBB5I", *fields.values())
    payload = block[tc.HEADER_BYTES:]
    return header + struct.pack("<I", zlib.crc32(payload, zlib.crc32(header))) + payload


@pytest.mark.parametrize("changes, message", [
    ({"rows": 5}, "row lengths section"),                # wrong row count
    ({"k": 2}, "more than k=2"),                         # rows longer than k
    ({"vocab": 40000}, "id is >= vocab_size"),           # ids out of range (the block has ids near 49151)
    ({"version": 9}, "version 9"),
    ({"magic": b"XXXX"}, "magic"),
])
def test_consistent_crc_but_wrong_counts_is_refused(changes, message):
    rng = np.random.default_rng(0)
    ids = np.stack([np.sort(rng.choice(49152, 8, replace=False)) for _ in range(6)])
    ids[:, -1] = 49151 - np.arange(6)
    lp = np.full((6, 8), np.log(1 / 9), np.float32)
    block = tc.encode_topk(ids, lp, np.full(6, np.log(1 / 9), np.float32), 49152)
    with pytest.raises(tc.TargetCodecError, match=message):
        tc.decode(_reheader(block, **changes))


def test_sampled_counts_must_sum_to_n():
    block = tc.encode_sampled(np.array([[1, 2]]), np.array([[2, 1]]), 3, 10)
    with pytest.raises(tc.TargetCodecError, match="sum to n=4"):
        tc.decode(_reheader(block, k=4, n=4))


def test_peaked_realistic_rows_code_far_below_q8():
    """500 rows of k = 64 from peaked distributions over a 49K vocab with frequent low ids."""
    rng = np.random.default_rng(5)
    rows, k, vocab = 500, 64, 49152
    ids = np.stack([rng.choice(vocab, k, replace=False, p=None) if r % 2 else
                    np.minimum(rng.choice(4000, k, replace=False), vocab - 1) for r in range(rows)])
    logits = rng.normal(0, 1, (rows, k)) - 3 * np.arange(k) ** 0.5
    logp = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True) - 0.01).astype(np.float32)
    tail = np.full(rows, np.log1p(-np.exp(-0.01)), np.float32)
    block = tc.encode_topk(ids, logp, tail, vocab)
    assert len(block) / rows < 0.75 * (k * 3 + 4)  # q8 would be 196 B a row (real teacher rows: see bench_codec)
    assert len(tc.encode_topk(ids, logp, tail, vocab, eps=1e-3)) < 0.5 * len(block)  # the cutoff pays
    assert tc.read_header(block)["raw"][0] is False  # the row lengths compress (all 64)


def test_codec_error_is_a_cache_corruption():
    assert issubclass(tc.TargetCodecError, CacheCorrupted)


@pytest.mark.parametrize("change, message", [
    (lambda ids, lp: ids.__setitem__((0, 1), ids[0, 0]), "repeated id"),
    (lambda ids, lp: lp.__setitem__((0, 0), np.nan), "NaN or positive"),
    (lambda ids, lp: ids.__setitem__((0, 0), 10**6), r"must be in \[0, 49152\)"),
])
def test_encode_refuses_bad_input(change, message):
    ids, lp, tail = random_targets(1, 3, 4, 49152, 0.0)
    change(ids, lp)
    with pytest.raises(ValueError, match=message):
        tc.encode_topk(ids, lp, tail, 49152)


def test_sampled_from_targets_refuses_non_sampled_logprobs():
    with pytest.raises(ValueError, match="another n"):
        tc.sampled_from_targets(np.array([[1, 2]]), np.log(np.array([[0.3, 0.7]])), 12)


def test_codec_modules_import_no_torch_web_or_trainer_code():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, shared.target_codec, shared.cache_coded; "
            "bad = [m for m in ('torch', 'fastapi', 'transformers', 'student_trainer') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
