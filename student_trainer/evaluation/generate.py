"""Chat with a student through the teacher tokenizer's chat template, decoding from the recurrent state.

``retnet-distill generate --checkpoint DIR --prompt TEXT`` answers one prompt; without ``--prompt`` it
reads turns from the terminal. Every token is produced by one O(1) recurrent step; a prompt is
consumed chunk by chunk (any length, memory O(chunk^2 + state)), and a new turn feeds only its own
tokens into the state the conversation has built so far, so a long chat never re-reads its history
(it starts the state over when the template renders the earlier turns differently from what was
decoded).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from student_trainer.data.tokenizer import stop_ids
from student_trainer.training.checkpoint import resolve_checkpoint
from student_trainer.model.student import RecurrentState, RetNetStudent, sample_next_token
from student_trainer.data.tokenizer import DEFAULT_MODEL_CACHE_DIR, load_tokenizer


@dataclass
class Sampling:
    """How the next token is chosen: greedy (argmax) or temperature + nucleus (top-p) sampling."""

    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, found {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, found temperature={self.temperature}, "
                             f"top_p={self.top_p}; use --greedy for argmax decoding")


class ChatSession:
    """A conversation with a student whose whole history lives in one recurrent state.

    Args:
        student: the model (eval mode is set here).
        tokenizer: the teacher's tokenizer (its chat template renders the turns).
        sampling: decoding settings.
        device: where the student runs.
    """

    def __init__(self, student: RetNetStudent, tokenizer: Any, sampling: Sampling, device: torch.device) -> None:
        sampling.check()
        self.student, self.tokenizer, self.sampling, self.device = student.eval(), tokenizer, sampling, device
        self.messages: list[dict[str, str]] = []
        self.consumed: list[int] = []  # token ids already inside ``state``
        self.state: RecurrentState | None = None
        self.logits: torch.Tensor | None = None  # [1, V] next-token logits after ``consumed``
        self.stops = stop_ids(tokenizer)
        self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        self.prefills = 0  # prefills from an empty state so far (1 per chat when turns extend the state)

    def _render(self) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(m["content"] for m in self.messages) + "\n"

    def _feed(self, ids: list[int]) -> None:
        """Advance the state over ``ids`` chunk by chunk (a long pasted document costs O(chunk^2 + state)
        memory); the first turn starts from an empty state, later ones continue the chat's."""
        if not ids:
            return
        if self.state is None:
            self.prefills += 1
        self.logits, self.state = self.student.prefill(torch.tensor([ids], device=self.device), state=self.state)
        self.consumed.extend(ids)

    @torch.no_grad()
    def reply(self, text: str, on_text: Callable[[str], None] = lambda piece: None) -> str:
        """Add a user turn, decode the answer token by token (``on_text`` gets each new piece of text)."""
        self.messages.append({"role": "user", "content": text})
        rendered = self._render()
        so_far = self.tokenizer.decode(self.consumed, skip_special_tokens=False) if self.consumed else ""
        if self.consumed and rendered.startswith(so_far):
            self._feed(self.tokenizer(rendered[len(so_far):], add_special_tokens=False)["input_ids"])
        else:  # the template re-rendered earlier turns differently: start the state over
            self.consumed, self.state = [], None
            self._feed(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        produced: list[int] = []
        shown = ""
        for _ in range(self.sampling.max_new_tokens):
            assert self.logits is not None
            if self.sampling.greedy:
                token = int(self.logits[0].argmax())
            else:
                token = int(sample_next_token(self.logits, self.sampling.temperature, self.sampling.top_p, self.generator)[0])
            self._feed([token])
            if token in self.stops:
                break
            produced.append(token)
            text_now = self.tokenizer.decode(produced, skip_special_tokens=True)
            if not text_now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text_now[len(shown):])
                shown = text_now
        answer = self.tokenizer.decode(produced, skip_special_tokens=True)
        if answer != shown:
            on_text(answer[len(shown):])
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def load_chat(checkpoint: str, tokenizer_name: str | None, sampling: Sampling, device: str = "cpu",
              model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR) -> ChatSession:
    """A chat session on a run / checkpoint / model folder; the tokenizer defaults to the run's teacher."""
    resolved = resolve_checkpoint(checkpoint)
    name = tokenizer_name or resolved.train_config.get("teacher_model")
    if not name:
        raise ValueError(f"{resolved.model_dir} records no teacher; pass --tokenizer NAME (the teacher's tokenizer)")
    tokenizer = load_tokenizer(name, resolved.train_config.get("model_cache_dir", model_cache_dir))
    student = RetNetStudent.load(resolved.model_dir, device=device)
    if student.config.vocab_size < len(tokenizer):
        raise ValueError(f"the student's vocab ({student.config.vocab_size}) is smaller than tokenizer {name}'s "
                         f"({len(tokenizer)}); pass the tokenizer of the teacher it was distilled from")
    return ChatSession(student, tokenizer, sampling, torch.device(device))


def interactive(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """Read turns until EOF, an empty line, or ``/exit``; ``/reset`` starts a new conversation."""
    write("chat with the student (empty line or /exit ends, /reset starts over)\n")
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if text in ("", "/exit"):
            return 0
        if text == "/reset":
            session.messages, session.consumed, session.state = [], [], None
            continue
        write("student> ")
        session.reply(text, lambda piece: (write(piece), sys.stdout.flush()))
        write("\n")
