"""``retnet-distill serve``: a live uvicorn server (in a thread) on a tiny student, driven by the real openai client."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from student_trainer.data.tokenizer import stop_ids
from student_trainer.serving.app import create_app
from student_trainer.serving.engine import TextStream
from student_trainer.serving.loading import LoadedModel, load_model
from student_trainer.serving.settings import ServeSettings
from tests.conftest import build_tiny_llama, tiny_student

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MODEL = "tiny-student"
PROMPTS = ["The list type is", "A dictionary maps", "def f(x):", "Exceptions are raised", "import os", "while True:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``create_app`` in a thread on a free loopback port."""

    def __init__(self, settings: ServeSettings, loaded: LoadedModel) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, loaded)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    @property
    def engine(self):
        return self.app.state.serve.engine

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    folder = build_tiny_llama(tmp_path_factory.mktemp("teacher"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(teacher_dir) -> LoadedModel:
    from transformers import AutoTokenizer

    return LoadedModel(sharp_student(), AutoTokenizer.from_pretrained(teacher_dir), "checkpoint")


def sharp_student():
    """The tiny student with N(0, 0.3) matrices: its greedy text depends on the prompt (the default init
    repeats one token), so rows of a batch that were mixed up would show."""
    student = tiny_student().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in student.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3, generator=generator)
    return student


@pytest.fixture(scope="module")
def server(loaded):
    live = LiveServer(ServeSettings(model_id=MODEL, max_tokens_limit=4000), loaded)
    yield live
    live.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(loaded: LoadedModel, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """``RetNetStudent.generate(greedy=True)``: (text up to a stop id, tokens sampled, finish reason)."""
    stops, produced, reason = stop_ids(loaded.tokenizer), [], "length"
    for token in loaded.student.generate(torch.tensor([ids]), max_tokens, greedy=True):
        if int(token[0]) in stops:
            return loaded.tokenizer.decode(produced, skip_special_tokens=True), len(produced) + 1, "stop"
        produced.append(int(token[0]))
    return loaded.tokenizer.decode(produced, skip_special_tokens=True), len(produced), reason


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    rendered = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=False)
    return loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_completion_greedy_equals_generate(client, loaded):
    ids = loaded.tokenizer(PROMPTS[0])["input_ids"]
    text, tokens, reason = reference(loaded, ids, 16)
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(ids), tokens, len(ids) + tokens)
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == reason


def test_chat_greedy_equals_generate_streaming_and_not(client, loaded):
    text, tokens, reason = reference(loaded, chat_ids(loaded, "What is a list?"), 20)
    messages = [{"role": "user", "content": "What is a list?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == reason and reply.usage.completion_tokens == tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == tokens and not chunks[-1].choices


def test_concurrent_clients_each_get_their_solo_output(server, loaded):
    expected = {p: reference(loaded, loaded.tokenizer(p)["input_ids"], 40)[0] for p in PROMPTS}
    results: dict[str, str] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def ask(prompt: str, stream: bool) -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        barrier.wait()
        if stream:
            results[prompt] = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True))
        else:
            results[prompt] = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected
    assert len(set(expected.values())) == len(PROMPTS)  # distinct answers: a mix-up of rows would show
    steps_with_company = metric(server, "student_serve_batch_rows_count") - metric(
        server, 'student_serve_batch_rows_bucket{le="1.0"}')
    assert steps_with_company > 0, "no decode step ever held more than one request"


def test_sampling_seed_top_p_and_stop_strings(client, loaded):
    kwargs = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0.9, top_p=0.8)
    first = client.completions.create(seed=7, **kwargs).choices[0].text
    assert client.completions.create(seed=7, **kwargs).choices[0].text == first
    greedy, _, _ = reference(loaded, loaded.tokenizer(PROMPTS[1])["input_ids"], 24)
    start = next(i for i in range(4, len(greedy) - 2) if all(c.isascii() and c.isalnum() for c in greedy[i:i + 2]))
    stop = greedy[start:start + 2]
    for stream in (False, True):
        reply = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                          stream=stream)
        if stream:
            chunks = list(reply)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, reason) == (greedy[:greedy.index(stop)], "stop")


def test_text_stream_holds_back_a_possible_stop_string(loaded):
    tok = loaded.tokenizer
    ids = tok("abc def ghi")["input_ids"]
    stream = TextStream(tok, ["def"])
    pieces, stopped = [], False
    for i in ids:
        piece, stopped = stream.push(i)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "abc "


def test_disconnected_stream_leaves_the_batch(server, client):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: {") for line in got)
            other = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=0)
            assert other.choices[0].finish_reason in ("length", "stop")
            assert metric(server, "student_serve_active_streams") == 1
    deadline = time.monotonic() + 20
    while (server.engine.active or metric(server, "student_serve_active_streams")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.engine.active and metric(server, "student_serve_active_streams") == 0
    assert httpx.get(server.url + "/health").status_code == 200 and httpx.get(server.url + "/ready").status_code == 200
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0).usage.completion_tokens >= 1


@pytest.mark.parametrize("body, status, param, words", [
    (b'{"model": "tiny-student", "prompt": ', 400, None, "not valid JSON"),
    (b'[1, 2]', 400, None, "JSON object"),
    ({"model": "gpt-9", "prompt": "hi"}, 404, "model", "gpt-9"),
    ({"model": MODEL, "prompt": "hi", "n": 2}, 400, "n", "n must be 1"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4001}, 400, "max_tokens", "4000"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
    ({"prompt": "hi"}, 400, "model", "model"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "list of 2"),
    ({"model": MODEL, "prompt": [5, 320, -1]}, 400, "prompt", "[0, 320)"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and words in error["message"]


def test_bad_chat_requests_and_unknown_routes(server, client):
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.get(server.url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()
    assert [m.id for m in client.models.list()] == [MODEL]
    text = httpx.get(server.url + "/metrics").text
    assert 'student_serve_requests_total{route="/v1/chat/completions",status="404"}' in text


def test_api_key(loaded):
    live = LiveServer(ServeSettings(model_id=MODEL, api_key="s3cret"), loaded)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.get(live.url + "/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    finally:
        live.close()


def test_loads_a_checkpoint_and_an_export_folder(tmp_path, teacher_dir):
    from student_trainer.hf_export.export import export
    from student_trainer.serving.loading import LoadError

    student = tiny_student().eval()
    step = tmp_path / "run" / "checkpoints" / "step-00000010"
    student.save(step / "model")
    for name in ("optimizer.pt", "rng.pt"):
        (step / name).write_bytes(b"")
    (step / "trainer_state.json").write_text(json.dumps({"step": 10, "config": {"teacher_model": str(teacher_dir)}}))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = student(ids)
        for path in (tmp_path / "run", step):
            got = load_model(str(path))
            assert got.source == "checkpoint" and torch.equal(got.student(ids), want)
        out = export(tmp_path / "run", tmp_path / "export")
        got = load_model(str(out))
        assert got.source == "export" and got.tokenizer.chat_template == CHAT
        assert torch.allclose(got.student(ids), want, atol=1e-6)
    assert ServeSettings(checkpoint=str(step)).served_model_id == "run-step-00000010"
    assert ServeSettings(checkpoint=str(out)).served_model_id == "export"
    with pytest.raises(LoadError, match="records no teacher"):
        load_model(str(step / "model"))
    with pytest.raises(LoadError, match="not a folder"):
        load_model(str(tmp_path / "missing"))


def greedy_ids(loaded: LoadedModel, ids: list[int], max_tokens: int) -> list[int]:
    """The tokens ``RetNetStudent.generate(greedy=True)`` samples, up to (not including) a stop id."""
    stops, produced = stop_ids(loaded.tokenizer), []
    for token in loaded.student.generate(torch.tensor([ids]), max_tokens, greedy=True):
        if int(token[0]) in stops:
            break
        produced.append(int(token[0]))
    return produced


def test_chunked_prefill_keeps_running_streams_decoding(loaded):
    """A long prompt arriving while a stream decodes is consumed 8 tokens per decode step: the running
    stream gets a token at every step of that prefill, and both answers equal their solo greedy ones."""
    from student_trainer.serving.engine import Engine, SamplingParams

    engine = Engine(loaded.student, loaded.tokenizer, prefill_tokens=8)  # driven by hand: no thread
    engine.stop_ids = set()  # the running stream must not end at a stop id while the long prompt goes in
    loop = asyncio.new_event_loop()

    async def submit(ids: list[int], max_tokens: int):
        return engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0))

    short = loaded.tokenizer(PROMPTS[2])["input_ids"]
    long = (loaded.tokenizer(" ".join(PROMPTS * 12))["input_ids"])[:203]
    running = loop.run_until_complete(submit(short, 400))
    while running not in engine.active:
        engine.iterate()
    late = loop.run_until_complete(submit(long, 30))
    tokens_before, turns = running.completion_tokens, 0
    while late not in engine.active:
        engine.iterate()
        turns += 1
    assert turns >= len(long) // 8  # the prompt went in chunks of <= 8 tokens ...
    assert running.completion_tokens - tokens_before >= turns - 1  # ... with a decode step between chunks
    while engine.active:
        engine.iterate()
    loop.close()
    for generation, ids, n in ((late, long, 30), (running, short, 400)):
        produced = [int(t[0]) for t in loaded.student.generate(torch.tensor([ids]), n, greedy=True)]
        assert generation.finished and generation.stream.ids == produced


def test_prompts_of_different_lengths_arriving_together(loaded):
    """One prefill group of ragged prompts: rows leave it as their prompts end, each answer its solo one."""
    from student_trainer.serving.engine import Engine, SamplingParams

    engine = Engine(loaded.student, loaded.tokenizer, prefill_tokens=5)
    loop = asyncio.new_event_loop()
    prompts = [loaded.tokenizer(" ".join(PROMPTS[:n]))["input_ids"] for n in (1, 6, 3, 6)]

    async def submit_all():
        return [engine.submit(ids, SamplingParams(max_tokens=12, temperature=0)) for ids in prompts]

    generations = loop.run_until_complete(submit_all())
    engine.iterate()
    assert len(engine.prefilling) == 1 and len(engine.prefilling[0].generations) + len(engine.active) == 4
    for _ in range(500):
        if all(g.finished for g in generations):
            break
        engine.iterate()
    loop.close()
    for ids, generation in zip(prompts, generations):
        want = greedy_ids(loaded, ids, 12)
        assert generation.finished and generation.stream.ids == want[:len(generation.stream.ids)]
        assert len(generation.stream.ids) == len(want)


def test_full_queue_answers_429_and_the_server_keeps_serving(loaded):
    live = LiveServer(ServeSettings(model_id=MODEL, max_batch_size=1, max_waiting_requests=1, max_tokens_limit=4000),
                      loaded)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "stream": True}
    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", live.url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            assert any(next(lines).startswith("data: {") for _ in range(3))  # decoding: it holds the only row
            waiting: dict[str, str] = {}

            def second() -> None:
                waiting["text"] = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text

            thread = threading.Thread(target=second)
            thread.start()
            deadline = time.monotonic() + 20
            while live.engine.waiting < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.02)
            third = httpx.post(live.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4})
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["code"] == "rate_limit_exceeded" and "waiting" in third.json()["error"]["message"]
        thread.join(60)  # the first stream closed: its row is free for the queued one
        assert waiting["text"] == reference(loaded, loaded.tokenizer(PROMPTS[1])["input_ids"], 4)[0]
        assert httpx.get(live.url + "/health").status_code == 200
    finally:
        live.close()


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(3, 299), max_size=60), stop=st.sampled_from([[], ["e"], ["the", " a"], ["\n\n"]]))
def test_text_stream_equals_one_decode_of_all_ids(loaded, ids, stop):
    """Incremental detokenization (a short window per token) gives the text of one decode of all ids,
    cut before the first stop string."""
    full = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [i for i in (full.find(s) for s in stop) if i >= 0]
    stream, pieces, stopped = TextStream(loaded.tokenizer, stop), [], False
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.flush())
    assert "".join(pieces) == (full[:min(cuts)] if cuts else full)
    assert stopped == bool(cuts)


def test_prompt_as_token_ids_and_ignore_eos(client, server, loaded):
    ids = loaded.tokenizer(PROMPTS[4])["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=12, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    produced = [int(t[0]) for t in loaded.student.generate(torch.tensor([ids]), 60, greedy=True)]
    reply = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 60,
                                                              "temperature": 0, "ignore_eos": True}, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 60 and reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["text"] == loaded.tokenizer.decode(produced, skip_special_tokens=True)


def test_a_request_arriving_mid_prefill_catches_up_and_merges(loaded):
    """B is 8 tokens into its prompt (half a chunk of the tiny student) when C arrives: B waits while C
    catches up, then both go on as one batch (one prefill group), each still with its solo greedy answer."""
    from student_trainer.serving.engine import Engine, SamplingParams

    engine = Engine(loaded.student, loaded.tokenizer, prefill_tokens=8)
    engine.stop_ids = set()
    loop = asyncio.new_event_loop()

    async def submit(ids: list[int], max_tokens: int):
        return engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0))

    text_ids = loaded.tokenizer(" ".join(PROMPTS * 12))["input_ids"]
    running = loop.run_until_complete(submit(text_ids[:5], 200))
    while running not in engine.active:
        engine.iterate()
    b = loop.run_until_complete(submit(text_ids[10:190], 6))
    engine.iterate()
    assert [g.consumed for g in engine.prefilling] == [8]
    c = loop.run_until_complete(submit(text_ids[40:170], 6))
    offsets = []
    while len(engine.prefilling) != 1 or len(engine.prefilling[0].generations) != 2:
        engine.iterate()
        offsets.append([g.consumed for g in engine.prefilling])
        assert len(offsets) < 10, offsets
    assert all(o[0] == 8 for o in offsets[:-1])  # B waited for C
    while not (b.finished and c.finished):
        engine.iterate()
    loop.close()
    for generation, ids in ((b, text_ids[10:190]), (c, text_ids[40:170])):
        assert generation.stream.ids == [int(t[0]) for t in loaded.student.generate(torch.tensor([ids]), 6, greedy=True)]


def test_idle_prefill_forwards_hold_at_most_prefill_batch_tokens(loaded):
    """With nobody decoding, 4 prompts go in 16 / 4 = 4 tokens per row per forward (bounded memory)."""
    from student_trainer.serving.engine import Engine, SamplingParams

    engine = Engine(loaded.student, loaded.tokenizer, prefill_tokens=8, prefill_batch_tokens=16)
    loop = asyncio.new_event_loop()
    ids = loaded.tokenizer(" ".join(PROMPTS * 4))["input_ids"]

    async def submit_all():
        return [engine.submit(ids[i:i + 30], SamplingParams(max_tokens=3, temperature=0)) for i in range(4)]

    generations = loop.run_until_complete(submit_all())
    engine.iterate()
    assert [(g.consumed, len(g.generations)) for g in engine.prefilling] == [(4, 4)]
    while not all(g.finished for g in generations):
        engine.iterate()
    loop.close()
    for i, generation in enumerate(generations):
        want = greedy_ids(loaded, ids[i:i + 30], 3)
        assert generation.stream.ids == want


GLIBC_RETENTION_PROBE = """
import sys
import numpy as np
from student_trainer.serving.engine import release_freed_memory, set_malloc_mmap_threshold
print(set_malloc_mmap_threshold(1 << 20) if sys.argv[1] == "mmap" else False)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big = np.ones(16 << 20, np.uint8); del big  # freeing a 16 MB mmapped block raises glibc's adaptive threshold
base = rss()
kept, blocks = [], []
for _ in range(32):  # 128 MB of 4 MB activations, each followed by a small live object (as in a forward)
    blocks.append(np.ones(4 << 20, np.uint8)); kept.append(bytearray(4096))
del blocks
print((rss() - base) >> 20)
print(release_freed_memory() if sys.argv[1] == "release" else False)
print((rss() - base) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_released_prefill_memory_goes_back_to_the_os() -> None:
    """Why the engine trims the heap after prefill forwards: glibc keeps freed activations that sit below
    live objects in the heap (the RSS keeps them); malloc_trim hands their pages back, and a fixed mmap
    threshold (STUDENT_SERVE_MALLOC_MMAP_THRESHOLD) never puts them in the heap."""
    def retained(mode: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", GLIBC_RETENTION_PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.split()

    fixed, kept, ran, after = retained("keep")
    assert fixed == "False" and int(kept) == pytest.approx(128, abs=8) and ran == "False" and int(after) == int(kept)
    fixed, kept, ran, after = retained("release")
    assert int(kept) == pytest.approx(128, abs=8) and ran == "True" and int(after) <= 4
    fixed, kept, ran, after = retained("mmap")  # a fixed 1 MiB threshold: freed blocks go back at once
    assert fixed == "True" and int(kept) <= 4


def test_the_engine_releases_memory_after_prefill_turns_only(loaded) -> None:
    from student_trainer.serving.engine import Engine, SamplingParams

    prompt = loaded.tokenizer("a prompt of a few words, long enough for several chunks of eight tokens")["input_ids"]
    for release in (True, False):
        engine = Engine(loaded.student, loaded.tokenizer, prefill_tokens=8, release_prefill_memory=release)
        loop = asyncio.new_event_loop()

        async def submit() -> None:
            engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))

        loop.run_until_complete(submit())
        engine.iterate()
        turns = 1
        while engine.prefilling:
            engine.iterate()
            turns += 1
        assert engine.memory_releases == (turns if release else 0)  # one per turn that ran a prefill forward
        engine.iterate()  # a decode-only turn
        assert engine.memory_releases == (turns if release else 0)
        loop.close()
