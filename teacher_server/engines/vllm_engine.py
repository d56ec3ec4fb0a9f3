"""vLLM engine: the same top-k targets as the HF engine, from vLLM's prompt log-probs on CUDA.

vLLM is an optional extra with its own pinned torch and transformers, so it is imported only when
this engine is built (``pip install '.[vllm]'`` in an environment of its own). The conversion from
vLLM's output objects to our arrays, :func:`rows_from_vllm`, is a pure function of plain lists of
dicts, so it is tested on CPU without vLLM.

What vLLM returns and what we do with it (DESIGN.md sections 3 and 12; vLLM >= 0.10.2):

- ``RequestOutput.prompt_logprobs[i]`` is the distribution that *predicted* prompt token ``i``
  (entry 0 is ``None``), so our row ``t`` (the distribution after token ``t``) is entry ``t + 1``,
  and the last row comes from the one generated step, ``outputs[0].logprobs[0]``.
- Each entry is ``{token_id: Logprob(logprob, rank, decoded_token)}`` with the top ``n`` by rank
  ``1..n`` plus the actual prompt (or sampled) token when it is not among them: we keep the ``n``
  best ranks.
- Prompt log-probs are computed from the *raw* logits, before any sampling processor: temperature
  is never applied to them, whatever ``logprobs_mode`` says (``compute_prompt_logprobs_with_chunking``
  in ``vllm/v1/worker/gpu/sample/prompt_logprob.py`` calls ``logits_fn`` and only switches between
  logits and log-softmax; ``GPUModelRunner._get_prompt_logprobs_dict`` of the older V1 runner does
  the same; vLLM PR #47680 "processed logprobs is not apply to prompt logprobs"; the open PR #37082
  would add a ``prompt_logprobs_temperature``). ``log_softmax(z / T)`` over the full
  vocabulary cannot be recovered from the top k of ``log_softmax(z)``, so this engine serves
  ``T == 1`` only and refuses other temperatures with a clear error; use the HF engine for them.
  We pin ``logprobs_mode="raw_logprobs"`` and sample greedily so the last row (from the sampler)
  is ``log_softmax(z)`` too.
- vLLM normalises over every LM-head row of ``config.vocab_size``. When the head has rows beyond
  the tokenizer (padding), the HF engine drops them before the softmax and vLLM cannot: such
  models are refused unless ``allow_padded_head`` is set, in which case padded ids are filtered
  out (we ask for ``k + padded`` entries so ``k`` real ones remain) and their mass ends up in the
  tail.
- The tail is ``log(1 - sum(exp(top_k)))`` by a stable ``log1mexp`` in float64. vLLM gives only
  the top k, so the HF engine's cancellation-free ``logsumexp`` over the ids outside the top k is
  not available: vLLM's log-probs are float32, so the tail's probability is good to about 1e-6
  absolute, and a top k that rounds up to all the mass gives an empty tail (``-inf``).
- Wire v1.1 scoring (``score_ids``, ``logsumexp``) is refused: prompt log-probs hold the top ``n``
  plus the prompt's own next token, never ids of our choosing, and they are normalised log-probs,
  from which the logits' log-sum-exp cannot be recovered. Asking for the full vocabulary at every
  position would express it, at ``V`` entries a position, and is untested here: use the HF engine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.errors import InvalidRequest
from shared.fingerprint import tokenizer_sha256
from teacher_server.engines.base import EngineRequest
from teacher_server.engines.model_source import resolve_model
from teacher_server.engines.topk_math import TopKRows

log = logging.getLogger(__name__)

MIN_VLLM_VERSION = "0.10.2"  # logprobs_mode, and LLM() may be built outside the main thread (PR #23298)
_DTYPES = {"float32", "bfloat16", "float16"}


def log1mexp(x: np.ndarray) -> np.ndarray:
    """``log(1 - exp(x))`` for ``x <= 0``, elementwise and stable (Maechler 2012): ``log(-expm1(x))``
    near 0, ``log1p(-exp(x))`` further out. ``x >= 0`` (rounding above 1) gives ``-inf``."""
    x = np.minimum(np.asarray(x, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -math.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _best_entries(entry: Mapping[int, Any], wanted: int, where: str) -> list[tuple[int, float]]:
    """The ``wanted`` best ``(token_id, logprob)`` pairs of one vLLM entry, by rank.

    An entry holds ranks ``1..wanted`` plus, when it is not among them, the actual token with its
    own (larger) rank; a token tied with the last one may carry a rank ``<= wanted`` as well, so we
    sort and cut instead of filtering by rank alone.
    """
    if entry is None:
        raise ValueError(f"{where}: vLLM returned no log-probs; expected a dict of {wanted} entries")
    ranked = []
    for token_id, item in entry.items():
        if item.rank is None:
            raise ValueError(f"{where}: vLLM entry for token {token_id} has no rank; expected ranks 1..{wanted}")
        ranked.append((item.rank, -item.logprob, int(token_id), float(item.logprob)))
    ranked.sort()
    if len(ranked) < wanted:
        raise ValueError(
            f"{where}: vLLM returned {len(ranked)} log-probs, expected at least {wanted}; is the engine's "
            "max_logprobs below the requested k?"
        )
    return [(token_id, logprob) for _, _, token_id, logprob in ranked[:wanted]]


def rows_from_vllm(
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
    sample_logprobs: Sequence[Mapping[int, Any]],
    k: int,
    vocab_size: int,
    requested: int | None = None,
) -> TopKRows:
    """Our rows for one sequence from vLLM's prompt log-probs and the one generated step.

    Args:
        prompt_logprobs: ``RequestOutput.prompt_logprobs``, one entry per prompt token ``[L]``;
            entry 0 is ``None``, entry ``i`` maps token ids to objects with ``.logprob`` and
            ``.rank`` for the distribution that predicted token ``i``.
        sample_logprobs: ``CompletionOutput.logprobs``; entry 0 is the distribution after the
            whole prompt (our last row).
        k: entries per row, ``1 <= k <= vocab_size``.
        vocab_size: the tokenizer's length; ids at or above it (padded LM-head rows) are dropped.
        requested: how many entries were asked of vLLM per position (``k`` plus the padded head
            rows, so that ``k`` real ids survive the filter); defaults to ``k``.

    Returns:
        :class:`TopKRows` with ``indices [L, k]`` int32 sorted by descending probability,
        ``logprobs [L, k]`` float32 and ``tail_logprob [L]`` float32; row ``t`` is
        ``log p(. | x_0..x_t)`` (DESIGN.md section 3: vLLM's entry ``t + 1``).
    """
    requested = k if requested is None else requested
    length = len(prompt_logprobs)
    if length == 0:
        raise ValueError("vLLM returned no prompt log-probs; expected one entry per prompt token")
    if prompt_logprobs[0] is not None:
        raise ValueError(
            "vLLM's prompt_logprobs[0] is not None: the entries are not indexed as expected (entry i "
            "predicts token i), so the alignment shift would be wrong; check the vLLM version"
        )
    if not sample_logprobs:
        raise ValueError("vLLM returned no log-probs for the generated step; expected logprobs=k with max_tokens=1")
    shifted = list(prompt_logprobs[1:]) + [sample_logprobs[0]]  # row t <- entry t + 1
    indices = np.empty((length, k), dtype=np.int32)
    logprobs = np.empty((length, k), dtype=np.float64)
    for t, entry in enumerate(shifted):
        best = [(i, lp) for i, lp in _best_entries(entry, requested, f"row {t}") if i < vocab_size][:k]
        if len(best) < k:
            raise ValueError(
                f"row {t}: only {len(best)} of the {requested} best ids are below the vocabulary size "
                f"{vocab_size}, expected {k}; ask vLLM for k plus the number of padded LM-head rows"
            )
        indices[t] = [i for i, _ in best]
        logprobs[t] = [lp for _, lp in best]
    if k >= vocab_size and requested == k:
        tail = np.full(length, -np.inf)  # every id is listed (no padded rows): nothing is left for the tail
    else:
        peak = logprobs.max(axis=1, keepdims=True)
        top_mass = peak[:, 0] + np.log(np.exp(logprobs - peak).sum(axis=1))  # logsumexp of the top k
        tail = log1mexp(top_mass)
    return TopKRows(indices=indices, logprobs=logprobs.astype(np.float32), tail_logprob=tail.astype(np.float32))


def head_rows(config: Any) -> int:
    """LM-head rows as vLLM builds them: the (text) config's ``vocab_size``."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


class VLLMEngine:
    """Top-k teacher targets from vLLM (CUDA only), the same rows as :class:`HFEngine` at ``T = 1``.

    Args:
        model: hub id, local directory, ``.gguf`` file, or ``smollm2-135m-instruct``.
        device: ``auto`` or ``cuda`` (pick the GPU with ``CUDA_VISIBLE_DEVICES``; vLLM has no index).
        dtype: ``auto`` (bf16, as the HF engine on CUDA), ``float32``, ``bfloat16`` or ``float16``.
        cache_dir: where GGUF files are converted to safetensors (once).
        max_k: the largest k a request may ask; sets vLLM's ``max_logprobs`` (its default cap is 20).
        gpu_memory_utilization: share of GPU memory vLLM may take for weights and KV cache.
        max_model_len: context length (default: the model's); one slot is kept for the generated step.
        allow_padded_head: serve a model whose LM head has rows beyond the tokenizer (see the module
            docstring: their mass goes into the tail).
        trust_remote_code: let transformers and vLLM run a model repo's own code.
    """

    supports_sampling = False  # prompt log-probs hold only vLLM's top n, not the full distribution

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str = "~/.cache/retnet-distill/models",
        max_k: int = 1024,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        allow_padded_head: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from teacher_server.engines.hf import weights_fingerprint

        started = time.perf_counter()
        if device not in ("auto", "cuda"):
            raise RuntimeError(
                f"the vLLM engine runs on CUDA only and picks its GPU from CUDA_VISIBLE_DEVICES; found "
                f"device={device!r}. Use device=cuda (CUDA_VISIBLE_DEVICES=N for cuda:N), or engine=hf on CPU"
            )
        if dtype not in _DTYPES and dtype != "auto":
            raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; found {dtype!r}")
        source = resolve_model(model, cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        self.model_name = source.name
        self.model_path = source.path
        self.vocab_size = len(self.tokenizer)
        rows = head_rows(config)
        if rows < self.vocab_size:
            raise RuntimeError(f"LM head has {rows} rows but the tokenizer has {self.vocab_size} tokens")
        self.padded_rows = rows - self.vocab_size
        if self.padded_rows and not allow_padded_head:
            raise RuntimeError(
                f"{source.name}: the LM head has {rows} rows but the tokenizer only {self.vocab_size}. vLLM "
                "normalises over all rows, the HF engine over the tokenizer's, so the two would disagree. "
                "Use engine=hf for this model, or set TEACHER_VLLM_ALLOW_PADDED_HEAD=true to serve it with "
                "the padded rows' mass counted in the tail (padded ids are never returned)"
            )
        self.tokenizer_sha256 = tokenizer_sha256(self.tokenizer)
        self.weights_fingerprint = weights_fingerprint(source.path, getattr(config, "_commit_hash", None))
        self.device = "cuda"
        self.dtype = "bfloat16" if dtype == "auto" else dtype  # the HF engine's auto on CUDA, for parity

        vllm = _import_vllm()
        self.max_logprobs = min(max_k, self.vocab_size) + self.padded_rows
        engine_args: dict[str, Any] = dict(
            model=source.path,
            tokenizer=source.path,
            dtype=self.dtype,
            max_logprobs=self.max_logprobs,
            enable_prefix_caching=False,  # prompt log-probs need every prompt position computed
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            logprobs_mode="raw_logprobs",  # log_softmax of the raw logits, before any processor
        )
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**engine_args)
        self._sampling_params = vllm.SamplingParams
        context = _engine_max_model_len(self.llm) or max_model_len or getattr(config, "max_position_embeddings", None)
        # the generated step needs one position after the prompt
        self.max_sequence_length = None if context is None else int(context) - 1
        log.info(
            "loaded %s with vLLM %s (%s) in %.1fs: vocab %d, head rows %d, max_logprobs %d",
            self.model_name, vllm.__version__, self.dtype, time.perf_counter() - started,
            self.vocab_size, rows, self.max_logprobs,
        )

    supports_scoring = False  # see the module docstring: no score_ids, no logsumexp

    def check_request(self, k: int, temperature: float, scores: bool = False) -> None:
        """Refuse what this engine cannot serve exactly, before the request joins a batch.

        Raises:
            InvalidRequest: ``temperature != 1`` (vLLM's prompt log-probs ignore temperature),
                ``k`` above the ``max_logprobs`` this engine was started with, or ``scores``: the
                request has wire v1.1 ``score_ids`` or ``return_logsumexp``.
        """
        if scores:
            raise InvalidRequest(
                "the vLLM engine cannot serve score_ids or return_logsumexp (wire v1.1): vLLM's prompt log-probs "
                "hold only its top n and the prompt's own next token, and no logits' log-sum-exp. Leave these "
                "fields out, or use a teacher with TEACHER_ENGINE=hf"
            )
        if temperature != 1.0:
            raise InvalidRequest(
                f"the vLLM engine serves temperature 1.0 only, found {temperature}: vLLM computes prompt "
                "log-probs from the raw logits, and log_softmax(z / T) cannot be rebuilt from a top k. Ask "
                "for temperature 1.0 or use a teacher with TEACHER_ENGINE=hf"
            )
        if k + self.padded_rows > self.max_logprobs:
            raise InvalidRequest(f"k must be at most {self.max_logprobs - self.padded_rows} on this engine, found {k}")

    def topk(self, requests: list[EngineRequest]) -> list[TopKRows]:
        """One ``LLM.generate`` over all sequences of all requests, each with its own k."""
        for req in requests:
            self.check_request(req.k, req.temperature, scores=req.wants_scores)
            if req.sample_n:
                raise InvalidRequest("the vLLM engine cannot draw sampled targets (vLLM's prompt log-probs hold only "
                                     "its top n, not the full distribution); use TEACHER_ENGINE=hf for them")
        prompts, params = [], []
        for req in requests:
            wanted = req.k + self.padded_rows
            request_params = self._sampling_params(
                max_tokens=1, temperature=0.0, prompt_logprobs=wanted, logprobs=wanted, detokenize=False
            )
            for seq in req.sequences:
                prompts.append({"prompt_token_ids": np.asarray(seq, dtype=np.int64).tolist()})  # a TokensPrompt
                params.append(request_params)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results, cursor = [], 0
        for req in requests:
            parts = []
            for output in outputs[cursor : cursor + len(req.sequences)]:
                parts.append(
                    rows_from_vllm(
                        output.prompt_logprobs, output.outputs[0].logprobs, req.k, self.vocab_size,
                        requested=req.k + self.padded_rows,
                    )
                )
            cursor += len(req.sequences)
            results.append(
                TopKRows(
                    indices=np.concatenate([p.indices for p in parts]),
                    logprobs=np.concatenate([p.logprobs for p in parts]),
                    tail_logprob=np.concatenate([p.tail_logprob for p in parts]),
                )
            )
        return results


def _import_vllm():
    """vLLM, or an error that says how to get a version this engine works with."""
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "TEACHER_ENGINE=vllm needs the vllm package, which pins its own torch and transformers: install "
            "it in an environment of its own with: pip install '.[vllm]'  (or use TEACHER_ENGINE=hf)"
        ) from exc
    from packaging.version import InvalidVersion, Version

    try:
        too_old = Version(vllm.__version__).release < Version(MIN_VLLM_VERSION).release
    except InvalidVersion:  # a source build with a custom version string: assume it is recent
        too_old = False
    if too_old:
        raise RuntimeError(
            f"the vLLM engine needs vllm >= {MIN_VLLM_VERSION} (logprobs_mode, construction outside the main "
            f"thread); found {vllm.__version__}. Upgrade with: pip install -U 'vllm>={MIN_VLLM_VERSION}'"
        )
    return vllm


def _engine_max_model_len(llm: Any) -> int | None:
    """The context length vLLM settled on (the model's, or the one asked for), if it says."""
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    return getattr(config, "max_model_len", None)
