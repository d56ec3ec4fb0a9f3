"""Teacher cache v1 (DESIGN.md section 4): the spec, the encodings and the resumable writer.

A cache is a directory ``manifest.json`` + ``shard-00000.safetensors``, ... Shard ``i`` holds the
dataset rows ``first = i * shard_size`` .. ``first + count - 1`` of ONE split of a pre-tokenized
dataset (the shard set of :mod:`student_trainer.data.shards`), as these safetensors tensors:

==================  =====================  ==========================================================
name                dtype, shape           meaning
==================  =====================  ==========================================================
``input_ids``       int32 ``[n, L]``       the dataset rows, right-padded exactly as in the dataset
``lengths``         int32 ``[n]``          real tokens per row
``indices``         uint16/int32 ``[R,k]`` teacher top-k ids (uint16 when vocab_size <= 65536)
``logprobs``        float16 ``[R, k]``     target type ``topk_fp16``: ``log p_T(id | x_0..x_t)``
``logprobs_q8``     uint8 ``[R, k]``       target type ``topk_q8``: the same, quantised (below)
``tail_logprob``    float32 ``[R]``        ``log(1 - sum_k p_T)``, exact, ``-inf`` when the k hold all
==================  =====================  ==========================================================

Target types ``topk_coded`` and ``sampled`` (issue 17) store ``targets_coded`` + ``target_offsets``
instead of the last three (one :mod:`shared.target_codec` block per sequence, see
:mod:`shared.cache_coded`); their ``bytes_per_token`` in the manifest is measured (target bytes of
the shards written / rows), and each shard record also says its ``target_bytes``.

``R = sum(lengths)``: rows are packed sequence after sequence, and row ``t`` of a sequence is the
teacher's distribution of the token *after* ``x_t`` (as on the wire). ``-inf`` log-probs (padding
when fewer than k ids are available, ids with zero mass) and ``-inf`` tails are stored as such.

q8 mapping (``topk_q8``), with ``step = q8_step`` chosen per cache (default 1/16 nat)::

    encode: q = rint(max(-logprob, 0) / step); q = 255 if q >= 255 or logprob == -inf
    decode: logprob = -step * q (float32), and q == 255 decodes to -inf

So ``[-254 * step, 0]`` is covered with a uniform grid; for every ``logprob >= -254.5 * step`` the
decoded value is within ``step / 2`` of the original (1/32 nat at the default step, range -15.9
nats: p >= 1.3e-7). Anything below range is dropped to ``-inf`` (zero mass): at most
``k * exp(-254.5 * step)`` of probability, 8e-6 for k = 64 at the default step.

The manifest is rewritten atomically after every shard and each shard is written to a temp name,
fsynced, then renamed, so a killed writer resumes at the first missing shard. A shard's safetensors
``__metadata__`` has one key, ``retnet-distill-teacher-cache``: a sorted JSON object with format,
version, first, count, target_type and q8_step, so a lone shard says what it is. Reading lives in
:mod:`shared.cache_reader` (``CacheReader`` is also importable from here).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import stat

import numpy as np
from safetensors.numpy import save as safetensors_save

from shared.files import atomic_write, fsync_path, is_temp_file, sha256_file  # noqa: F401  (re-exported)

FORMAT_NAME = "retnet-distill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
TARGET_TYPES = ("topk_fp16", "topk_q8", "topk_coded", "sampled")
CODED_TARGET_TYPES = ("topk_coded", "sampled")  # stored as shared.target_codec blocks (shared.cache_coded)
DEFAULT_Q8_STEP = 1.0 / 16.0  # a power of two, so that -step * q is exact in float32
Q8_NEG_INF = 255
DEFAULT_CODE_STEP = 1.0 / 64.0  # topk_coded's log-prob grid (shared.target_codec), powers of two: exact in float32
DEFAULT_CODE_KNEE = 0.5
# Log-probs a little above 0 are rounding noise of log_softmax; much above is a bug upstream.
_POSITIVE_TOLERANCE = 1e-2
# Fields that must agree for a resumed writer or a reader: anything that changes the bytes.
IDENTITY_FIELDS = (
    "teacher_model", "teacher_fingerprint", "tokenizer_sha256", "vocab_size", "k", "temperature",
    "target_type", "q8_step", "code_step", "code_knee", "mass_cutoff", "dataset_fingerprint", "split", "max_seq_length", "num_sequences", "shard_size",
)


class CacheError(Exception):
    """Base class: a teacher cache cannot be used as asked."""


class CacheMismatch(CacheError):
    """The cache was made for a different teacher, tokenizer, k, temperature, dataset, ..."""


class CacheMiss(CacheError):
    """A dataset row is not (yet) in the cache."""


class CacheCorrupted(CacheError):
    """A cache file is truncated, altered or inconsistent with the manifest."""


def index_dtype(vocab_size: int) -> np.dtype:
    """uint16 ids when every id fits (vocab_size <= 65536), else int32 (as on the wire)."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def bytes_per_token(target_type: str, k: int, vocab_size: int) -> int:
    """Teacher-target bytes stored per token (one row of ``R``): ``k * (id + logprob) + 4`` (tail).

    ``topk_fp16``: id 2 or 4 B + 2 B per entry; ``topk_q8``: id + 1 B. A shard also stores its input
    ids (4 B per padded position, ``n * L * 4``), its lengths (``4 * n``) and a JSON header. The coded
    types have no fixed size: their manifest records the measured figure.
    """
    if target_type in CODED_TARGET_TYPES:
        raise ValueError(f"target_type {target_type!r} has no fixed bytes per token; read the measured "
                         "'bytes_per_token' of its manifest")
    if target_type not in TARGET_TYPES:
        raise ValueError(f"target_type must be one of {TARGET_TYPES}, found {target_type!r}")
    logprob_bytes = 2 if target_type == "topk_fp16" else 1
    return k * (index_dtype(vocab_size).itemsize + logprob_bytes) + 4


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds and for which teacher and dataset; every field is in the manifest.

    Attributes:
        teacher_model: the teacher's model id (e.g. a Hugging Face repo id).
        teacher_fingerprint: a string that changes when the teacher's weights change.
        tokenizer_sha256: :func:`shared.fingerprint.tokenizer_sha256` of the teacher's tokenizer.
        vocab_size: tokenizer length; every id is in ``[0, vocab_size)``.
        k: top-k entries per token; temperature: applied to the teacher's logits (``> 0``).
        target_type: one of :data:`TARGET_TYPES`; q8_step: the q8 grid step in nats (q8 only;
            ``None`` means :data:`DEFAULT_Q8_STEP`).
        code_step, code_knee, mass_cutoff: ``topk_coded`` only (``None`` = the defaults
            1/64, 0.5 and 0): the log-prob grid and the per-row mass cutoff eps of
            :func:`shared.target_codec.encode_topk`. ``sampled``: ``k`` is the number of draws ``n``.
        dataset_path, dataset_fingerprint: the shard set (its manifest's ``fingerprint``).
        split: the dataset split; max_seq_length: ``L``; num_sequences: rows in the split.
        shard_size: sequences per cache shard (the last shard may hold fewer).
    """

    teacher_model: str
    teacher_fingerprint: str
    tokenizer_sha256: str
    vocab_size: int
    k: int
    temperature: float
    target_type: str
    dataset_path: str
    dataset_fingerprint: str
    split: str
    max_seq_length: int
    num_sequences: int
    shard_size: int
    q8_step: float | None = None
    code_step: float | None = None
    code_knee: float | None = None
    mass_cutoff: float | None = None

    def __post_init__(self) -> None:
        for name in ("teacher_model", "teacher_fingerprint", "tokenizer_sha256", "dataset_fingerprint", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CacheSpec.{name} must be a non-empty string, found {value!r}")
        if not isinstance(self.dataset_path, str):
            raise ValueError(f"CacheSpec.dataset_path must be a string, found {self.dataset_path!r}")
        for name in ("vocab_size", "k", "max_seq_length", "num_sequences", "shard_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"CacheSpec.{name} must be an integer >= 1, found {value!r}")
        if self.k > self.vocab_size:
            raise ValueError(f"CacheSpec.k={self.k} exceeds vocab_size={self.vocab_size}; lower k")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"CacheSpec.temperature must be finite and > 0, found {self.temperature!r}")
        if self.target_type not in TARGET_TYPES:
            raise ValueError(f"CacheSpec.target_type must be one of {TARGET_TYPES}, found {self.target_type!r}")
        if self.target_type == "topk_q8":
            if self.q8_step is None:
                object.__setattr__(self, "q8_step", DEFAULT_Q8_STEP)
            elif not isinstance(self.q8_step, (int, float)) or not 0 < self.q8_step <= 1:
                raise ValueError(f"CacheSpec.q8_step must be in (0, 1] nats, found {self.q8_step!r}")
            object.__setattr__(self, "q8_step", float(self.q8_step))
        elif self.q8_step is not None:
            raise ValueError(f"CacheSpec.q8_step applies to target_type 'topk_q8' only, found {self.q8_step!r} "
                             f"with target_type {self.target_type!r}; leave it None")
        self._check_code_fields()
        object.__setattr__(self, "temperature", float(self.temperature))

    def _check_code_fields(self) -> None:
        names = ("code_step", "code_knee", "mass_cutoff")
        if self.target_type != "topk_coded":
            for name in names:
                if getattr(self, name) is not None:
                    raise ValueError(f"CacheSpec.{name} applies to target_type 'topk_coded' only, found "
                                     f"{getattr(self, name)!r} with target_type {self.target_type!r}; leave it None")
            if self.target_type == "sampled" and self.k > 255:
                raise ValueError(f"CacheSpec.k is the number of draws for target_type 'sampled': at most 255, "
                                 f"found {self.k}")
            return
        checks = {"code_step": (DEFAULT_CODE_STEP, lambda v: 0 < v <= 1, "in (0, 1] nats"),
                  "code_knee": (DEFAULT_CODE_KNEE, lambda v: 0 <= v <= 1e6, ">= 0 nats (0 = a uniform grid)"),
                  "mass_cutoff": (0.0, lambda v: 0 <= v < 1, "in [0, 1) (0 = no cutoff)")}
        for name, (default, ok, what) in checks.items():
            value = default if getattr(self, name) is None else getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"CacheSpec.{name} must be {what}, found {value!r}")
            # the codec's header stores step and knee as float32: encode and decode must use that grid
            object.__setattr__(self, name, float(value) if name == "mass_cutoff" else float(np.float32(value)))

    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        """``(first, count)``: the dataset rows of shard ``index``."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"shard index must be in [0, {self.num_shards}), found {index}")
        first = index * self.shard_size
        return first, min(self.shard_size, self.num_sequences - first)

    def differences(self, other: CacheSpec) -> list[str]:
        """Human-readable ``field: ours vs theirs`` for every identity field that differs."""
        return [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
                for name in IDENTITY_FIELDS if getattr(self, name) != getattr(other, name)]

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> CacheSpec:
        try:
            return cls(**{f.name: manifest.get(f.name) for f in fields(cls)})
        except ValueError as exc:
            raise CacheCorrupted(f"the cache manifest holds an invalid spec: {exc}") from exc


# ------------------------------------------------------------------------------------- q8 codec


def quantize_q8(logprobs: np.ndarray, step: float) -> np.ndarray:
    """Log-probs ``[...]`` (float, ``<= 0`` or ``-inf``) -> uint8 codes ``[...]`` (module docstring)."""
    # float32 is enough: multiplying by 1/step is exact for power-of-two steps (the default).
    scaled = np.maximum(-np.asarray(logprobs, dtype=np.float32), np.float32(0)) * np.float32(1.0 / step)
    return np.rint(np.minimum(scaled, np.float32(Q8_NEG_INF))).astype(np.uint8)  # -inf -> +inf -> 255


def dequantize_q8(codes: np.ndarray, step: float) -> np.ndarray:
    """uint8 codes ``[...]`` -> float32 log-probs ``[...]``; 255 -> ``-inf``."""
    table = (-step * np.arange(256, dtype=np.float64)).astype(np.float32)
    table[Q8_NEG_INF] = -np.inf
    return table[codes]


# ------------------------------------------------------------------------------------ file utils


def read_manifest(directory: Path, shown_as: Path | None = None) -> dict[str, Any]:
    """The parsed manifest of the cache in ``directory``, format and version checked.

    ``shown_as``: the directory to name in messages (when ``directory`` is a ``/proc/self/fd`` path).
    """
    path = directory / MANIFEST
    shown = (shown_as or directory) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{shown} not found: {shown.parent} is not a teacher cache (expected a directory "
                         "written by CacheWriter, with manifest.json and shard-*.safetensors)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheCorrupted(f"{shown} is not valid JSON ({exc}); delete the cache directory and write it again") \
            from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CacheError(f"{shown}: format {found!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheError(f"{shown}: version {manifest.get('version')!r}, this code reads version {FORMAT_VERSION}; "
                         "rewrite the cache with this version")
    return manifest


def _is_regular_file(path: Path) -> bool:
    """True for a regular file that is not a symlink (``lstat``: nothing is followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes (or resumes writing) the cache of ``spec`` in ``directory``, one shard at a time.

    Opening a directory that already has a manifest resumes it when the identity fields agree
    (:data:`IDENTITY_FIELDS`) and raises :class:`CacheMismatch` otherwise. Listed shards are
    trusted when their file exists with the listed size (and sha256, with ``verify_existing``);
    the others are written again. Leftover temp files of a killed writer are removed. A lock file
    keeps a second writer out of the same directory while this one is open.

    Nothing inside ``directory`` is followed through a symlink: the lock file is opened with
    ``O_NOFOLLOW``, a symlinked manifest is refused, a symlinked shard counts as missing (and is
    replaced by a real file), and files are written via fresh ``O_EXCL | O_NOFOLLOW`` temp files.
    So a link planted in a cache folder cannot make the writer read or write outside it.

    The writer holds ``directory`` open and works through ``/proc/self/fd/N`` (on Linux), so every
    file it touches is in the directory it opened, even if that path is swapped for a symlink
    later. With ``confine_to``, the opened directory must lie inside that folder (checked on the
    open directory itself, so no swap can slip in between) or :class:`CacheError` is raised
    before anything is written.
    """

    def __init__(self, directory: str | Path, spec: CacheSpec, verify_existing: bool = False,
                 confine_to: str | Path | None = None) -> None:
        self.directory = Path(directory)
        self.spec = spec
        self._lock_fd: int | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd: int | None = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        proc = Path(f"/proc/self/fd/{self._dir_fd}")
        self._at = proc if proc.is_dir() else self.directory  # where file operations go
        if confine_to is not None:
            root = Path(confine_to).resolve()
            real = Path(os.path.realpath(self._at))
            if real != root and root not in real.parents:
                self.close()
                raise CacheError(f"{self.directory} resolves outside {root} (a symlink swapped in?); refused")
        try:
            self._lock_fd = os.open(self._at / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            planted_link = os.path.islink(self._at / LOCK)
            self.close()
            if planted_link:
                raise CacheError(f"{self.directory / LOCK} is a symlink; a cache lock file must be a regular file "
                                 "(remove the link, or choose another directory)") from None
            raise CacheError(f"cannot open the lock file {self.directory / LOCK}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise CacheError(f"another CacheWriter is writing {self.directory}; wait for it or cancel it") from None
        try:
            self._shards = self._open_existing(verify_existing)
            self._write_manifest()
        except BaseException:
            self.close()
            raise

    def _open_existing(self, verify: bool) -> dict[int, dict[str, Any]]:
        names = []
        for path in self._at.iterdir():
            if is_temp_file(path.name):  # we hold the lock, so no live writer owns it
                path.unlink(missing_ok=True)
            else:
                names.append(path.name)
        if os.path.islink(self._at / MANIFEST):
            raise CacheError(f"{self.directory / MANIFEST} is a symlink; a cache manifest must be a regular file "
                             "(remove the link, or choose another directory)")
        if MANIFEST not in names:
            foreign = [n for n in names if n != LOCK and not (n.startswith("shard-") and n.endswith(".safetensors"))]
            if foreign:
                raise CacheError(f"{self.directory} has no {MANIFEST} but holds {sorted(foreign)[:5]}: "
                                 "it is not a teacher cache; choose an empty or new directory")
            return {}
        manifest = read_manifest(self._at, shown_as=self.directory)
        existing = CacheSpec.from_manifest(manifest)
        diffs = existing.differences(self.spec)
        if diffs:
            raise CacheMismatch(f"{self.directory} holds a cache for another configuration (cache vs this writer): "
                                + "; ".join(diffs) + ". Write to a new directory, or delete this one to rebuild it")
        kept = {}
        for record in manifest.get("shards", []):
            path = self._at / record["file"]
            if not _is_regular_file(path) or path.stat().st_size != record["bytes"]:
                continue  # half-copied, deleted or a symlink: write it again (os.replace swaps the name itself)
            if verify and sha256_file(path) != record["sha256"]:
                continue
            kept[int(record["index"])] = record
        return kept

    @property
    def complete(self) -> bool:
        return len(self._shards) == self.spec.num_shards

    def missing_shards(self) -> list[tuple[int, int, int]]:
        """``(shard index, first dataset row, count)`` of every shard not written yet, in order."""
        return [(i, *self.spec.shard_range(i)) for i in range(self.spec.num_shards) if i not in self._shards]

    def write_shard(
        self,
        shard_index: int,
        input_ids: np.ndarray,
        lengths: np.ndarray,
        indices: np.ndarray,
        logprobs: np.ndarray,
        tail_logprob: np.ndarray,
    ) -> dict[str, Any]:
        """Write shard ``shard_index`` atomically, then the manifest; returns its manifest record.

        Args:
            input_ids: ``[n, L]`` integer, the dataset rows ``first .. first + n - 1`` as stored there.
            lengths: ``[n]`` integer, real tokens per row (``1 <= length <= L``).
            indices: ``[R, k]`` integer ids in ``[0, vocab_size)``, ``R = sum(lengths)``.
            logprobs: ``[R, k]`` float (float32 fine), ``<= 0`` or ``-inf``; stored per target type.
            tail_logprob: ``[R]`` float, ``<= 0`` or ``-inf``.
        """
        spec = self.spec
        first, count = spec.shard_range(shard_index)
        tensors = self._validate(shard_index, count, input_ids, lengths, indices, logprobs, tail_logprob)
        # One metadata key: safetensors keeps metadata in a hash map, so several keys would come out
        # in a random order and two writes of the same shard would differ.
        about = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "first": first, "count": count,
                 "target_type": spec.target_type, "q8_step": spec.q8_step}
        if spec.target_type == "topk_coded":
            about.update(code_step=spec.code_step, code_knee=spec.code_knee, mass_cutoff=spec.mass_cutoff)
        data = safetensors_save(tensors, metadata={FORMAT_NAME: json.dumps(about, sort_keys=True)})
        path = self._at / shard_file_name(shard_index)
        atomic_write(path, data)
        record = {"index": shard_index, "file": path.name, "first": first, "count": count,
                  "rows": int(tensors["lengths"].sum()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if "targets_coded" in tensors:
            record["target_bytes"] = int(tensors["targets_coded"].size)
        self._shards[shard_index] = record
        self._write_manifest()
        return record

    def _validate(self, shard_index: int, count: int, input_ids: np.ndarray, lengths: np.ndarray,
                  indices: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> dict[str, np.ndarray]:
        """Check shapes, dtypes and ranges; return the tensors in their stored dtypes."""
        spec, where = self.spec, f"shard {shard_index}"
        arrays = {"input_ids": np.asarray(input_ids), "lengths": np.asarray(lengths), "indices": np.asarray(indices),
                  "logprobs": np.asarray(logprobs), "tail_logprob": np.asarray(tail)}
        for name in ("input_ids", "lengths", "indices"):
            if arrays[name].dtype.kind not in "iu":
                raise ValueError(f"{where}: {name} must be an integer array, found {arrays[name].dtype}")
        for name in ("logprobs", "tail_logprob"):
            if arrays[name].dtype.kind != "f":
                raise ValueError(f"{where}: {name} must be a float array, found {arrays[name].dtype}")
        lens = arrays["lengths"]
        if arrays["input_ids"].shape != (count, spec.max_seq_length) or lens.shape != (count,):
            raise ValueError(f"{where} holds {count} rows: expected input_ids [{count}, {spec.max_seq_length}] "
                             f"and lengths [{count}], found "
                             f"{list(arrays['input_ids'].shape)} and {list(lens.shape)}")
        if lens.min() < 1 or lens.max() > spec.max_seq_length:
            raise ValueError(f"{where}: lengths must be in [1, {spec.max_seq_length}], "
                             f"found [{lens.min()}, {lens.max()}]")
        rows = int(lens.sum())
        for name, shape in (("indices", (rows, spec.k)), ("logprobs", (rows, spec.k)), ("tail_logprob", (rows,))):
            if arrays[name].shape != shape:
                raise ValueError(f"{where}: expected {name} of shape {list(shape)} (R = sum(lengths) = {rows}, "
                                 f"k = {spec.k}), found {list(arrays[name].shape)}")
        for name in ("input_ids", "indices"):
            low, high = int(arrays[name].min()), int(arrays[name].max())
            if low < 0 or high >= spec.vocab_size:
                raise ValueError(f"{where}: {name} must be in [0, {spec.vocab_size}), found ids in [{low}, {high}]; "
                                 "check that the teacher's vocab_size in the spec is the tokenizer's length")
        for name in ("logprobs", "tail_logprob"):
            values = arrays[name]
            bad = np.isnan(values) | (values > _POSITIVE_TOLERANCE)
            if bad.any():
                raise ValueError(f"{where}: {name} must be log-probabilities (<= 0 or -inf), found "
                                 f"{int(bad.sum())} NaN or positive values such as {values[bad].flat[0]}")
        out = {"input_ids": arrays["input_ids"].astype("<i4"), "lengths": lens.astype("<i4")}
        if spec.target_type in CODED_TARGET_TYPES:
            from shared.cache_coded import encode_shard_targets  # imports the codec, which imports this module

            out.update(encode_shard_targets(spec, lens, arrays["indices"], arrays["logprobs"], arrays["tail_logprob"]))
            return {name: np.ascontiguousarray(value) for name, value in out.items()}
        out["indices"] = arrays["indices"].astype(index_dtype(spec.vocab_size))
        out["tail_logprob"] = arrays["tail_logprob"].astype("<f4")
        if spec.target_type == "topk_q8":
            out["logprobs_q8"] = quantize_q8(arrays["logprobs"], spec.q8_step)
        else:
            out["logprobs"] = arrays["logprobs"].astype("<f2")
        return {name: np.ascontiguousarray(value) for name, value in out.items()}

    def _write_manifest(self) -> None:
        spec = self.spec
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(spec),
                    "index_dtype": index_dtype(spec.vocab_size).name,
                    "bytes_per_token": self._bytes_per_token(),
                    "num_shards": spec.num_shards, "complete": self.complete,
                    "shards": [self._shards[i] for i in sorted(self._shards)]}
        atomic_write(self._at / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    def _bytes_per_token(self) -> float | int | None:
        """Fixed for the plain types; measured over the shards written for the coded ones (None before any)."""
        spec = self.spec
        if spec.target_type not in CODED_TARGET_TYPES:
            return bytes_per_token(spec.target_type, spec.k, spec.vocab_size)
        rows = sum(r["rows"] for r in self._shards.values())
        coded = sum(r.get("target_bytes", 0) for r in self._shards.values())
        return round(coded / rows, 2) if rows else None

    def close(self) -> None:
        """Release the directory lock (also on garbage collection and when the process dies)."""
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if getattr(self, "_dir_fd", None) is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    # The reader lives in its own module; re-export it lazily so that both import orders work.
    if name in ("CacheReader", "CachedRow"):
        from shared import cache_reader

        return getattr(cache_reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
