"""Continuous batching: one background thread decodes every active request together, one token per row per step.

Each request holds only its row of the batch's :class:`RecurrentState` (per layer ``prev_key_value
[B, H, dv, dk]`` and ``scale [B, H]``, and ``position [B]``: a fixed size whatever the context). A new
request is prefilled (prompts that arrive together in one ragged prefill) and its rows JOIN the batch by
concatenation; a finished or cancelled request's row LEAVES by row selection. Every step is one
``RetNetStudent.step`` over all active rows, then each row is sampled with its own settings (greedy, or
temperature + top-p with its own ``torch.Generator``). Text goes to each request's asyncio queue, so a
slow reader never holds up the loop, and a client that goes away cancels its request (its row leaves at
the next step).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from student_trainer.evaluate import stop_ids
from student_trainer.model import RecurrentState, RetNetStudent, sample_next_token

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """One request's decoding: ``temperature`` 0 is greedy (argmax); ``stop`` strings end the text before them."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """A piece of a request's text; the last one has ``finish_reason`` ("stop", "length" or "error")."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class TextStream:
    """Incremental detokenization: new text per token, held back while it could be the start of a stop string
    (or a multi-byte character), and cut where a stop string begins."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token: ``(new text, whether a stop string was reached)``."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return "", False
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            cut = min(cuts)
            delta, self.sent = text[self.sent:cut], max(self.sent, cut)
            return delta, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def flush(self) -> str:
        """The text held back so far (at the end of a request that met no stop string)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[self.sent:], len(text)
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


def select_rows(state: RecurrentState, rows: torch.Tensor) -> RecurrentState:
    """The rows ``rows [K]`` (int64 indices) of a batched state."""
    layers = [{"prev_key_value": layer["prev_key_value"].index_select(0, rows), "scale": layer["scale"].index_select(0, rows)}
              for layer in state.layers]
    return RecurrentState(state.position.index_select(0, rows), layers)


class Engine:
    """The decode loop. ``submit`` from the event loop; ``start``/``close`` own the thread.

    Args:
        student: the model (eval mode).
        tokenizer: its tokenizer (decoding, stop ids).
        max_batch_size: most rows decoding together; more requests wait in arrival order.
        on_step: called after every sampling pass with the number of rows sampled (metrics).
    """

    def __init__(self, student: RetNetStudent, tokenizer: Any, max_batch_size: int = 64,
                 on_step: Callable[[int], None] = lambda rows: None) -> None:
        self.student, self.tokenizer, self.max_batch_size, self.on_step = student.eval(), tokenizer, max_batch_size, on_step
        self.device = next(student.parameters()).device
        self.stop_ids = stop_ids(tokenizer)
        self.vocab = len(tokenizer)  # ids at or beyond it (LM-head padding) cannot be decoded: never sampled
        self.active: list[Generation] = []
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

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Queue a request (call from the event loop that will read its events)."""
        generation = Generation(next(self._ids), prompt_ids, params, self.tokenizer, self.device,
                                asyncio.get_running_loop())
        self._pending.put(generation)
        return generation

    # ----- the decode thread -------------------------------------------------------------------------

    def _run(self) -> None:
        state: RecurrentState | None = None
        logits: torch.Tensor | None = None  # [B, V] next-token logits of the active rows
        with torch.no_grad():
            while not self._closing.is_set():
                new = self._admit(block=not self.active)
                if new:
                    try:
                        new_logits, new_state = self._prefill(new)
                    except Exception as exc:  # noqa: BLE001 - a bad prompt fails its requests, not the server
                        log.exception("prefill failed")
                        for generation in new:
                            generation.emit(Event("", "error", error=f"prefill failed: {exc}"))
                    else:
                        self.active += new
                        state = concat_states(state, new_state)
                        logits = new_logits if logits is None else torch.cat([logits, new_logits])
                if not self.active:
                    state = logits = None
                    continue
                assert state is not None and logits is not None
                try:
                    tokens = self._sample(logits)
                    keep = self._deliver(tokens)
                    self.on_step(len(tokens))
                    if len(keep) < len(self.active):
                        rows = torch.tensor(keep, dtype=torch.int64, device=self.device)
                        self.active = [self.active[i] for i in keep]
                        state, logits, tokens = select_rows(state, rows), logits[rows], tokens[rows]
                    if self.active:
                        logits, state = self.student.step(tokens, state)
                        self.steps += 1
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                    log.exception("decode step failed")
                    for generation in self.active:
                        generation.emit(Event("", "error", error=f"decode step failed: {exc}"))
                    self.active, state, logits = [], None, None
            for generation in self.active:
                generation.emit(Event("", "error", error="the server is shutting down"))

    def _admit(self, block: bool) -> list[Generation]:
        """Pending requests that fit in the batch (waiting up to 0.1 s for one when the batch is empty)."""
        new: list[Generation] = []
        while len(self.active) + len(new) < self.max_batch_size:
            try:
                generation = self._pending.get(timeout=0.1) if block and not new else self._pending.get_nowait()
            except queue.Empty:
                break
            if not generation.cancelled:
                new.append(generation)
        return new

    def _prefill(self, new: list[Generation]) -> tuple[torch.Tensor, RecurrentState]:
        """One ragged prefill of the new prompts: logits ``[N, V]`` and a state of N rows (per-row positions)."""
        lengths = torch.tensor([len(g.prompt_ids) for g in new], dtype=torch.int64)
        ids = torch.zeros((len(new), int(lengths.max())), dtype=torch.int64)
        for row, generation in enumerate(new):
            ids[row, :len(generation.prompt_ids)] = torch.tensor(generation.prompt_ids)
        return self.student.prefill(ids.to(self.device), lengths=lengths.to(self.device))

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
            if token in self.stop_ids:
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
    """Whether the engine has no active rows within ``timeout`` seconds (tests, shutdown)."""
    deadline = time.monotonic() + timeout
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine.active
