"""Hugging Face transformers engine: any causal LM on CPU or CUDA.

One call runs one transformer pass over every sequence of every request in the dynamic batch
(grouped into length-sorted micro-batches so short sequences are not padded to the longest), then
computes each request's top-k with its own k and temperature from the final hidden states, plus
the scores of its ``score_ids`` and its logsumexp when asked (wire v1.1), from the same logits.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from shared.fingerprint import tokenizer_sha256
from teacher_server.engines.base import EngineRequest
from teacher_server.engines.model_source import resolve_model
from teacher_server.engines.topk_math import TopKRows, topk_from_hidden

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use device=cpu")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (bf16 on CPUs without native support is ~5x slower)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; found {dtype!r}")
    return _DTYPES[dtype]


def weights_fingerprint(path: str, commit: str | None = None, sample_bytes: int = 1 << 20) -> str:
    """A cheap identity of a model's weights: sha256 over each weight file's name, size and three
    1 MB samples (start, middle, end). A finetuned copy of the same architecture differs in all of
    them; hashing every byte of a multi-GB teacher at each start would cost seconds to minutes.
    A hub id that is not a local folder is identified by its resolved commit."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}@{commit or 'unknown'}"
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as fh:
            for offset in (0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)):
                fh.seek(offset)
                digest.update(fh.read(sample_bytes))
    return digest.hexdigest()


class HFEngine:
    """Top-k teacher targets from a Hugging Face causal LM.

    Args:
        model: hub id, local directory, ``.gguf`` file, or ``smollm2-135m-instruct``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        cache_dir: where GGUF files are converted to safetensors (once).
        micro_batch_tokens: padded tokens per transformer pass.
    """

    supports_scoring = True  # score_ids and logsumexp come from the same full-vocabulary logits

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: str = "~/.cache/retnet-distill/models",
        micro_batch_tokens: int = 8192,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        source = resolve_model(model, cache_dir)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.model_name = source.name
        self.model_path = source.path
        self.vocab_size = len(self.tokenizer)
        head_rows = self.model.get_output_embeddings().weight.shape[0]
        if head_rows < self.vocab_size:
            raise RuntimeError(f"LM head has {head_rows} rows but the tokenizer has {self.vocab_size} tokens")
        self.tokenizer_sha256 = tokenizer_sha256(self.tokenizer)
        self.weights_fingerprint = weights_fingerprint(source.path, getattr(self.model.config, "_commit_hash", None))
        self.max_sequence_length = getattr(self.model.config, "max_position_embeddings", None)
        self.logit_softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.micro_batch_tokens = micro_batch_tokens
        self.lm_head = self._fp32_head()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        log.info(
            "loaded %s on %s (%s) in %.1fs: vocab %d, head rows %d",
            self.model_name, self.device, self.dtype, time.perf_counter() - started, self.vocab_size, head_rows,
        )

    def _fp32_head(self):
        """The LM head computed in fp32. A bf16 head rounds logits to 8 mantissa bits (0.125 at a logit
        of 20), coarser than the fp16 wire; so with bf16/fp16 weights an fp32 copy of the head's
        weight is kept (V x d x 4 bytes: 113 MB for SmolLM2, 2.1 GB for a 128K x 4096 head) and each
        row chunk's hidden states are upcast: the exact product of the model's own values."""
        head = self.model.get_output_embeddings()
        if head.weight.dtype == torch.float32:
            return head
        weight = head.weight.detach().float()
        bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
        return lambda hidden: torch.nn.functional.linear(hidden.float(), weight, bias)

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """Sequence indices grouped longest-first so that count * longest <= micro_batch_tokens."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.micro_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.inference_mode()
    def hidden_states(self, sequences: list[np.ndarray]) -> list[torch.Tensor]:
        """Final hidden states ``[L_i, d]`` per sequence (right padding; causal, so pads never leak)."""
        out: list[torch.Tensor | None] = [None] * len(sequences)
        backbone = self.model.base_model
        for group in self._micro_batches([len(s) for s in sequences]):
            longest = len(sequences[group[0]])
            ids = torch.full((len(group), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), longest), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(sequences[i])] = torch.from_numpy(sequences[i])
                mask[row, : len(sequences[i])] = 1
            hidden = backbone(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device) if not bool(mask.all()) else None,
            ).last_hidden_state
            for row, i in enumerate(group):
                out[i] = hidden[row, : len(sequences[i])]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def topk(self, requests: list[EngineRequest]) -> list[TopKRows]:
        """One pass over all sequences of all requests, then each request's own top-k and tail (and
        scores, when it asks)."""
        flat = [seq for req in requests for seq in req.sequences]
        hidden = self.hidden_states(flat)
        lm_head = self.lm_head
        results, cursor = [], 0
        for req in requests:
            rows = torch.cat(hidden[cursor : cursor + len(req.sequences)], dim=0)
            cursor += len(req.sequences)
            results.append(
                topk_from_hidden(rows, lm_head, req.k, req.temperature, self.vocab_size, logit_softcap=self.logit_softcap,
                                 score_ids=req.score_ids, return_logsumexp=req.return_logsumexp,
                                 sample_n=req.sample_n, sample_seed=req.sample_seed)
            )
        return results
