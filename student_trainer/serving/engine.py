"""Continuous batching: one background thread decodes every active request together, one token per row per step.

Each request holds only its row of the batch's :class:`RecurrentState` (per layer ``prev_key_value
[B, H, dv, dk]`` and ``scale [B, H]``, and ``position [B]``: a fixed size whatever the context). A new
request is prefilled in chunks between decode steps (prompts that arrive together are consumed together)
and its rows JOIN the batch by concatenation; a finished or cancelled request's row LEAVES by row selection. Every step is one
``RetNetStudent.step`` over all active rows, then each row is sampled with its own settings (greedy, or
temperature + top-p with its own ``torch.Generator``). Text goes to each request's asyncio queue, so a
slow reader never holds up the loop, and a client that goes away cancels its request (its row leaves at
the next step).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from student_trainer.data.tokenizer import stop_ids
from student_trainer.model.student import RecurrentState, RetNetStudent, sample_next_token

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """One request's decoding: ``temperature`` 0 is greedy (argmax); ``stop`` strings end the text before them;
    ``ignore_eos`` decodes ``max_tokens`` tokens whatever they are."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # stop ids do not end the request (fixed-length benchmarks)


@dataclass
class Event:
    """A piece of a request's text; the last one has ``finish_reason`` ("stop", "length" or "error")."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class TextStream:
    """Incremental detokenization: new text per token, held back while it could be the start of a stop string
    (or a multi-byte character), and cut where a stop string begins.

    Each token decodes only a short window of ids (from ``prefix_offset``), not the whole answer: the new
    text is the window's decode minus the decode of its already-read part, so tokenizers that drop a
    leading space at the start of a decode give the same text as one decode of all ids (O(1) per token).
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of ``text`` already handed out
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were decoded into text already
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token: ``(new text, whether a stop string was reached)``."""
        self.ids.append(token_id)
        read = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) <= len(read) or window.endswith("\ufffd"):  # nothing new, or half a multi-byte character
            return "", False
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += window[len(read):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        cuts = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
        if cuts:
            cut = min(cuts)
            delta, self.sent = self.text[self.sent:cut], max(self.sent, cut)
            return delta, True
        text = self.text
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def flush(self) -> str:
        """The text held back so far (at the end of a request that met no stop string)."""
        tail = self._decode(self.ids[self.prefix_offset:])
        read = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if len(tail) > len(read):
            self.text += tail[len(read):]
            self.prefix_offset = self.read_offset = len(self.ids)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class Generation:
    """One request inside the engine: its prompt, settings, text stream and the queue its events go to."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, tokenizer: Any,
                 device: torch.device, loop: asyncio.AbstractEventLoop) -> None:
        self.id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.stream = TextStream(tokenizer, params.stop)
        self.completion_tokens = 0
        self.cancelled = False
        self.finished = False
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop decoding this request (its row leaves the batch at the next step)."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        """Hand an event to the request's reader (called from the decode thread)."""
        if event.finish_reason is not None:
            self.finished = True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """Events until the final one (with a ``finish_reason``)."""
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    async def next_event(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds (so that the caller can check its client)."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


def concat_states(a: RecurrentState | None, b: RecurrentState) -> RecurrentState:
    """Rows of ``a`` then rows of ``b`` (both with per-row positions ``[B]`` and scales ``[B, H]``)."""
    if a is None:
        return b
    layers = [{"prev_key_value": torch.cat([x["prev_key_value"], y["prev_key_value"]]),
               "scale": torch.cat([x["scale"], y["scale"]])} for x, y in zip(a.layers, b.layers)]
    return RecurrentState(torch.cat([a.position, b.position]), layers)


def select_rows_shared(state: RecurrentState, rows: torch.Tensor) -> RecurrentState:
    """The rows ``rows [K]`` of a prefill state whose rows share one int position and ``scale [H]``."""
    layers = [{"prev_key_value": layer["prev_key_value"].index_select(0, rows), "scale": layer["scale"]}
              for layer in state.layers]
    return RecurrentState(state.position, layers)


def select_rows(state: RecurrentState, rows: torch.Tensor) -> RecurrentState:
    """The rows ``rows [K]`` (int64 indices) of a batched state."""
    layers = [{"prev_key_value": layer["prev_key_value"].index_select(0, rows), "scale": layer["scale"].index_select(0, rows)}
              for layer in state.layers]
    return RecurrentState(state.position.index_select(0, rows), layers)


class EngineFull(Exception):
    """More requests wait than the engine's ``max_waiting`` (answered 429: retry later)."""


@dataclass
class PrefillGroup:
    """Requests whose prompts are consumed together, at the same offset: ``state`` holds their rows
    (one shared int position) after ``consumed`` prompt tokens each (None before the first chunk)."""

    generations: list[Generation]
    consumed: int = 0
    state: RecurrentState | None = None

    def remaining(self) -> list[int]:
        return [len(g.prompt_ids) - self.consumed for g in self.generations]


def per_row_state(state: RecurrentState) -> RecurrentState:
    """A prefill state of B rows at one int position -> the per-row form the decode batch holds
    (``position [B]``, ``scale [B, H]``)."""
    rows = state.layers[0]["prev_key_value"].size(0)
    layers = [{"prev_key_value": layer["prev_key_value"], "scale": layer["scale"].reshape(1, -1).expand(rows, -1).clone()}
              for layer in state.layers]
    return RecurrentState(torch.full((rows,), int(state.position), dtype=torch.int64,
                                     device=layers[0]["prev_key_value"].device), layers)


@functools.cache
def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def set_malloc_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (0: leave glibc's adaptive one); True when set.

    glibc raises its threshold to the size of every mmapped block it frees (up to 32 MiB), so activations
    of a forward come from the heap, which keeps their pages; with a fixed threshold bigger blocks stay
    mmapped and go back to the OS the moment they are freed (flat RSS, slower allocation)."""
    if threshold <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``); True when it ran.

    glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, and a forward's
    activations leave holes that a later forward of another shape does not fill, so without this a server's
    RSS grows with the longest prompts it has prefilled (1.36x from 128- to 4,096-token prompts at 32 streams,
    RESULTS.md "Serving"). Trimming costs milliseconds, against seconds for a prefill forward; fixing a low mmap
    threshold instead (every activation mmapped) made prefill 1.3-1.4x slower here."""
    trim = _libc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class Engine:
    """The decode loop. ``submit`` from the event loop; ``start``/``close`` own the thread.

    Every iteration runs one decode step over the active rows and then at most ``prefill_tokens`` prompt
    tokens of the requests still prefilling (chunked prefill: a long prompt never pauses the running
    streams for longer than one budget's worth of prefill). Requests that arrive together are prefilled
    together, at the same offset, so they start decoding together. With no stream decoding, prompts are
    consumed at full speed, ``prefill_batch_tokens`` per forward (chunks of at most the student's
    ``recurrent_chunk_size`` per row).

    Args:
        student: the model (eval mode).
        tokenizer: its tokenizer (decoding, stop ids).
        max_batch_size: most rows decoding or prefilling together; more requests wait in arrival order.
        prefill_tokens: prompt tokens consumed per decode step while streams are decoding.
        prefill_batch_tokens: most prompt tokens in one prefill forward with no stream decoding (its
            activations are O(rows x chunk), so this bounds the server's memory whatever the batch).
        max_waiting: most requests waiting for a row; beyond it ``submit`` raises :class:`EngineFull`.
        on_step: called after every sampling pass with the number of rows sampled (metrics).
        release_prefill_memory: after every turn that ran a prefill forward, hand the heap's free pages back
            to the OS (:func:`release_freed_memory`), so the RSS does not keep the longest prompt's activations.
    """

    def __init__(self, student: RetNetStudent, tokenizer: Any, max_batch_size: int = 64, prefill_tokens: int = 512,
                 max_waiting: int = 256, on_step: Callable[[int], None] = lambda rows: None,
                 prefill_batch_tokens: int = 4096, release_prefill_memory: bool = True) -> None:
        self.student, self.tokenizer, self.max_batch_size, self.on_step = student.eval(), tokenizer, max_batch_size, on_step
        self.prefill_tokens, self.max_waiting = prefill_tokens, max_waiting
        self.prefill_batch_tokens = max(prefill_batch_tokens, prefill_tokens)
        self.release_prefill_memory = release_prefill_memory
        self.memory_releases = 0  # turns after which the heap was trimmed
        self.device = next(student.parameters()).device
        self.stop_ids = stop_ids(tokenizer)
        self.vocab = len(tokenizer)  # ids at or beyond it (LM-head padding) cannot be decoded: never sampled
        self.active: list[Generation] = []
        self.prefilling: list[PrefillGroup] = []
        self._state: RecurrentState | None = None  # the active rows' batched state
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of the active rows
        self.steps = 0
        self._pending: queue.Queue[Generation] = queue.Queue()
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="student-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still running get an error event)."""
        self._closing.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests not yet decoding: queued, or prefilling."""
        return self._pending.qsize() + sum(len(group.generations) for group in self.prefilling)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Queue a request (call from the event loop that will read its events); :class:`EngineFull` when
        ``max_waiting`` requests wait already."""
        if self._pending.qsize() >= self.max_waiting:
            raise EngineFull(f"{self._pending.qsize()} requests are waiting for a row (the limit is {self.max_waiting})")
        generation = Generation(next(self._ids), prompt_ids, params, self.tokenizer, self.device,
                                asyncio.get_running_loop())
        self._pending.put(generation)
        return generation

    # ----- the decode thread -------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while not self._closing.is_set():
                self.iterate(block=True)
        for generation in self.active + [g for group in self.prefilling for g in group.generations]:
            generation.emit(Event("", "error", error="the server is shutting down"))

    @torch.no_grad()
    def iterate(self, block: bool = False) -> None:
        """One turn of the loop (the decode thread calls it; tests may drive a not-started engine with it):
        admit waiting requests, one decode step of the active rows, then one budget of prefill.
        ``block``: with nothing to do, wait up to 0.1 s for a request."""
        new = self._admit(block=block and not self.active and not self.prefilling)
        if new:
            self.prefilling.append(PrefillGroup(new))
        if self.active:
            assert self._state is not None and self._logits is not None
            try:
                self._logits, self._state = self._decode(self._logits, self._state)
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("decode step failed")
                for generation in self.active:
                    generation.emit(Event("", "error", error=f"decode step failed: {exc}"))
                self.active, self._state, self._logits = [], None, None
        prefilled = bool(self.prefilling)
        for ready, ready_logits, ready_state in self._prefill_some():
            self.active += ready
            self._state = concat_states(self._state, ready_state)
            self._logits = ready_logits if self._logits is None else torch.cat([self._logits, ready_logits])
        if prefilled and self.release_prefill_memory and release_freed_memory():
            self.memory_releases += 1
        if not self.active:
            self._state = self._logits = None

    def _decode(self, logits: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor | None, RecurrentState | None]:
        """Sample every active row, hand out the tokens, drop finished rows, step the rest."""
        tokens = self._sample(logits)
        keep = self._deliver(tokens)
        self.on_step(len(tokens))
        if len(keep) < len(self.active):
            rows = torch.tensor(keep, dtype=torch.int64, device=self.device)
            self.active = [self.active[i] for i in keep]
            state, logits, tokens = select_rows(state, rows), logits[rows], tokens[rows]
        if not self.active:
            return None, None
        logits, state = self.student.step(tokens, state, overwrite=True)  # the batch owns its state
        self.steps += 1
        return logits, state

    def _admit(self, block: bool) -> list[Generation]:
        """Pending requests that fit in the batch (waiting up to 0.1 s for one when nothing runs)."""
        new: list[Generation] = []
        taken = len(self.active) + sum(len(group.generations) for group in self.prefilling)
        while taken + len(new) < self.max_batch_size:
            try:
                generation = self._pending.get(timeout=0.1) if block and not new else self._pending.get_nowait()
            except queue.Empty:
                break
            if not generation.cancelled:
                new.append(generation)
        return new

    def _prefill_some(self) -> list[tuple[list[Generation], torch.Tensor, RecurrentState]]:
        """Consume up to one budget of prompt tokens, oldest group first: the requests whose prompts are
        done, with their next-token logits ``[N, V]`` and their rows' state (per-row form).

        Requests that arrive a few milliseconds apart land in different groups; a group at most one chunk
        ahead of a younger one waits while the younger one catches up to its offset, and groups at one
        offset merge, so prompts sent together are consumed (and decoded) as one batch."""
        for group in list(self.prefilling):
            self._drop_cancelled(group)
            if not group.generations:
                self.prefilling.remove(group)
        self._merge_equal_offsets()
        done: list[tuple[list[Generation], torch.Tensor, RecurrentState]] = []
        # nobody waits for a token: full speed, in forwards of at most prefill_batch_tokens (bounded memory)
        budget = self.prefill_tokens if self.active else self.prefill_batch_tokens
        chunk_size = self.student.config.recurrent_chunk_size
        for group in list(self.prefilling):
            if budget <= 0:
                break
            ahead = [g.consumed for g in self.prefilling if 0 < g.consumed - group.consumed <= chunk_size]
            behind = any(0 < group.consumed - g.consumed <= chunk_size for g in self.prefilling)
            if behind:  # a younger group is catching up with this one: wait for it
                continue
            try:
                finished = self._prefill_chunk(group, budget, min(ahead) if ahead else None)
            except Exception as exc:  # noqa: BLE001 - a bad prompt fails its requests, not the server
                log.exception("prefill failed")
                for generation in group.generations:
                    generation.emit(Event("", "error", error=f"prefill failed: {exc}"))
                self.prefilling.remove(group)
                continue
            budget -= finished[3]
            if finished[0]:
                done.append(finished[:3])
            if not group.generations:
                self.prefilling.remove(group)
        return done

    def _merge_equal_offsets(self) -> None:
        """Groups at the same offset become one (their states share the int position and ``scale``)."""
        merged: list[PrefillGroup] = []
        for group in self.prefilling:
            same = next((m for m in merged if m.consumed == group.consumed), None)
            if same is None:
                merged.append(group)
                continue
            same.generations += group.generations
            if same.state is not None:
                assert group.state is not None
                same.state = RecurrentState(same.state.position, [
                    {"prev_key_value": torch.cat([a["prev_key_value"], b["prev_key_value"]]), "scale": a["scale"]}
                    for a, b in zip(same.state.layers, group.state.layers)])
        self.prefilling = merged

    def _prefill_chunk(self, group: PrefillGroup, budget: int, target: int | None = None
                       ) -> tuple[list[Generation], torch.Tensor, RecurrentState, int]:
        """Advance ``group`` by one chunk (all its rows the same number of tokens, at most the shortest
        remaining prompt, and no further than offset ``target``): the rows whose prompts ended, their
        logits and per-row state, tokens consumed."""
        rows = len(group.generations)
        chunk = min(group.remaining())
        chunk = min(chunk, self.student.config.recurrent_chunk_size)
        if target is not None:
            chunk = min(chunk, target - group.consumed)
        chunk = min(chunk, max(1, budget // rows))
        ids = torch.tensor([g.prompt_ids[group.consumed:group.consumed + chunk] for g in group.generations],
                           dtype=torch.int64, device=self.device)
        chunk_logits, group.state = self.student.prefill(ids, state=group.state, chunk_size=chunk)
        group.consumed += chunk
        ended = [i for i, left in enumerate(group.remaining()) if left == 0]
        if not ended:
            return [], chunk_logits[:0], group.state, rows * chunk
        ended_rows = torch.tensor(ended, dtype=torch.int64, device=self.device)
        ready = [group.generations[i] for i in ended]
        ready_state = per_row_state(select_rows_shared(group.state, ended_rows))
        going = [i for i in range(rows) if i not in set(ended)]
        if going:
            group.state = select_rows_shared(group.state, torch.tensor(going, dtype=torch.int64, device=self.device))
        group.generations = [group.generations[i] for i in going]
        return ready, chunk_logits[ended_rows], ready_state, rows * chunk

    def _drop_cancelled(self, group: PrefillGroup) -> None:
        """Requests cancelled while prefilling leave their group (and its state rows)."""
        keep = [i for i, g in enumerate(group.generations) if not g.cancelled]
        if len(keep) == len(group.generations):
            return
        if group.state is not None and keep:
            group.state = select_rows_shared(group.state, torch.tensor(keep, dtype=torch.int64, device=self.device))
        group.generations = [group.generations[i] for i in keep]

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every active row ``[B]``: argmax where temperature is 0, else its own sample."""
        if logits.size(-1) > self.vocab:
            logits = logits.clone()
            logits[:, self.vocab:] = float("-inf")
        tokens = logits.argmax(dim=-1)
        for row, generation in enumerate(self.active):
            if generation.generator is not None:
                p = generation.params
                tokens[row] = sample_next_token(logits[row:row + 1], p.temperature, p.top_p, generation.generator)[0]
        return tokens

    def _deliver(self, tokens: torch.Tensor) -> list[int]:
        """Hand each row's token to its request; the indices of the rows that go on decoding."""
        keep = []
        for row, (generation, token) in enumerate(zip(self.active, tokens.tolist())):
            if generation.cancelled:
                continue
            generation.completion_tokens += 1
            if token in self.stop_ids and not generation.params.ignore_eos:
                generation.emit(Event(generation.stream.flush(), "stop", generation.completion_tokens))
                continue
            text, stopped = generation.stream.push(token)
            if stopped:
                generation.emit(Event(text, "stop", generation.completion_tokens))
            elif generation.completion_tokens >= generation.params.max_tokens:
                generation.emit(Event(text + generation.stream.flush(), "length", generation.completion_tokens))
            else:
                if text:
                    generation.emit(Event(text, None, generation.completion_tokens))
                keep.append(row)
        return keep


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Whether the engine has no active or prefilling rows within ``timeout`` seconds (tests, shutdown)."""
    deadline = time.monotonic() + timeout
    while (engine.active or engine.prefilling) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not (engine.active or engine.prefilling)
