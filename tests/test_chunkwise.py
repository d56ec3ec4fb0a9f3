"""Linear cost at any length (issue 14): the chunkwise path against the parallel one on trained and
retrofitted weights (losses and gradients), the path picked by length, prompts prefilled chunk by
chunk in O(chunk^2 + state) memory, training in either mode, and the settings' errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from student_trainer.training.config import ConfigError, load_config
from student_trainer.model.student import RetNetStudent, StudentConfig
from student_trainer.model.retrofit import retrofit
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train
from tests.conftest import tiny_student
from tests.test_retrofit import IDS, VOCAB, _tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTH = 75  # several chunks of 16, and not a multiple of them: the last chunk is short


def _trained_tiny() -> RetNetStudent:
    """The tiny preset after 20 AdamW steps on random tokens (weights well away from init)."""
    model = tiny_student(VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = torch.randint(0, VOCAB, (4, 65), generator=generator)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _retrofitted() -> RetNetStudent:
    """A RetNet retrofitted from a random 3-layer Llama with sharpened q/k (teacher-sized q.k)."""
    student, _ = retrofit(_tiny("llama"), IDS, recurrent_chunk_size=16, chunkwise_min_length=None)
    return student


def _loss_and_grads(model: RetNetStudent, ids: torch.Tensor, chunkwise: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1], chunkwise=chunkwise)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", ["trained", "retrofitted"])
def test_chunkwise_losses_and_gradients_equal_the_parallel_ones(weights: str) -> None:
    model = _trained_tiny() if weights == "trained" else _retrofitted()
    ids = torch.randint(0, VOCAB, (2, LENGTH + 1), generator=torch.Generator().manual_seed(4))
    parallel_loss, parallel_grads = _loss_and_grads(model, ids, chunkwise=False)
    chunk_loss, chunk_grads = _loss_and_grads(model, ids, chunkwise=True)
    assert chunk_loss == pytest.approx(parallel_loss, rel=1e-5)
    assert parallel_grads.keys() == chunk_grads.keys() and len(parallel_grads) > 10
    for name, grad in parallel_grads.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert float((chunk_grads[name] - grad).abs().max() / scale) < 1e-3, name


def test_the_path_is_picked_by_length() -> None:
    model = tiny_student(VOCAB, recurrent_chunk_size=16, chunkwise_min_length=32).eval()
    seen: list[bool] = []
    model.decoder.retnet_rel_pos.register_forward_hook(
        lambda _module, args, output: seen.append(not isinstance(output[1], torch.Tensor)))
    with torch.no_grad():
        model(torch.zeros(1, 31, dtype=torch.long))  # below the threshold: parallel ([H, L, L] mask)
        model(torch.zeros(1, 32, dtype=torch.long))  # at it: chunkwise
        model(torch.zeros(1, 31, dtype=torch.long), chunkwise=True)  # a caller can force either
    assert seen == [False, True, True]
    assert StudentConfig.from_preset("tiny", chunkwise_min_length=None).uses_chunkwise(10**6) is False
    assert StudentConfig.from_preset("tiny", chunkwise_recurrent=True).uses_chunkwise(1) is True


@torch.no_grad()
def test_a_long_prompt_is_prefilled_chunk_by_chunk_without_an_LxL_table() -> None:
    """8,192 tokens: the state equals token-by-token decoding's and the last logits the parallel
    pass's, while the retention never sees a table longer than one chunk."""
    model = tiny_student(VOCAB, recurrent_chunk_size=256).eval()
    length = 8192
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(5))
    lengths_seen: list[int] = []
    model.decoder.retnet_rel_pos.register_forward_hook(lambda _module, args, output: lengths_seen.append(args[0]))
    original = model.decoder.retnet_rel_pos.prompt_chunk
    model.decoder.retnet_rel_pos.prompt_chunk = lambda start, n: (lengths_seen.append(n), original(start, n))[1]
    logits, state = model.prefill(ids)
    assert state.position == length and max(lengths_seen) == 256 and len(lengths_seen) == length // 256
    model.decoder.retnet_rel_pos.prompt_chunk = original

    reference = model.new_state()  # TorchScale's own recurrence, one token at a time (first 600 tokens)
    for t in range(600):
        _, reference = model.step(ids[:, t], reference)
    _, partial = model.prefill(ids[:, :600])
    for mine, theirs in zip(partial.layers, reference.layers):
        torch.testing.assert_close(mine["scale"], theirs["scale"], rtol=1e-5, atol=0)
        torch.testing.assert_close(mine["prev_key_value"], theirs["prev_key_value"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, model(ids, chunkwise=True)[:, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prefill_continues_from_a_state_and_checks_its_inputs() -> None:
    model = tiny_student(VOCAB).eval()
    ids = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(6))
    whole_logits, whole = model.prefill(ids, chunk_size=16)
    _, first = model.prefill(ids[:, :23], chunk_size=7)
    first_kv = first.layers[0]["prev_key_value"].clone()
    logits, rest = model.prefill(ids[:, 23:], state=first, chunk_size=5)
    torch.testing.assert_close(logits, whole_logits, rtol=1e-4, atol=1e-4)
    assert rest.position == whole.position == 50
    assert torch.equal(first.layers[0]["prev_key_value"], first_kv)  # the given state is not modified
    with pytest.raises(ValueError, match="batch size 1, the state 2"):
        model.prefill(ids[:1], state=first)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        model.prefill(ids, chunk_size=-1)


def test_chunking_settings_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="chunkwise_min_length must be an integer >= recurrent_chunk_size"):
        StudentConfig.from_preset("tiny", recurrent_chunk_size=64, chunkwise_min_length=32)
    with pytest.raises(ConfigError, match=r"chunkwise_min_length \(256\) must be >= recurrent_chunk_size \(512\)"):
        load_config(None, [f"output_dir={tmp_path}", "chunkwise_min_length=256"])
    with pytest.raises(ConfigError, match="recurrent_chunk_size must be >= 1"):
        load_config(None, [f"output_dir={tmp_path}", "recurrent_chunk_size=0"])
    config = load_config(None, [f"output_dir={tmp_path}", "model_variant=tiny", "chunkwise_min_length=null"])
    assert config.chunkwise_min_length is None


@pytest.fixture(scope="module")
def tiny_teacher(tiny_engine) -> DirectTeacher:
    return DirectTeacher(tiny_engine, k=16, temperature=1.0)


def _run(output_dir, shards, teacher, **overrides) -> list[float]:
    settings = {"output_dir": str(output_dir), "train_data": str(shards), "model_variant": "tiny", "device": "cpu",
                "max_seq_length": 32, "batch_size": 4, "max_steps": 12, "warmup_steps": 2, "log_every": 1,
                "eval_every": 12, "eval_batches": 2, "save_every": 12, "lr": 3e-3, "weight_decay": 0.0,
                "wandb_mode": "disabled", "progress": False, "teacher_topk": 16, "saddle_detection": False,
                "recurrent_chunk_size": 8, **overrides}
    train(load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()]), teacher=teacher)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/total"] for r in records if "train/total" in r] + [r["eval/total"] for r in records if "eval/total" in r]


def test_training_chunkwise_follows_the_parallel_run(tmp_path, tiny_shards, tiny_teacher) -> None:
    """The same 12 steps on rows of 32 tokens in chunks of 8, parallel vs chunkwise: the losses and the
    held-out loss agree to float noise (the paths compute one function)."""
    parallel = _run(tmp_path / "parallel", tiny_shards, tiny_teacher, chunkwise_min_length=None)
    chunkwise = _run(tmp_path / "chunkwise", tiny_shards, tiny_teacher, chunkwise_min_length=8)
    assert len(parallel) == len(chunkwise) == 12 + 2  # 12 steps, held-out loss at steps 0 and 12
    assert chunkwise == pytest.approx(parallel, rel=1e-3)
    assert parallel[11] < parallel[0]


def test_a_context_beyond_the_direct_teachers_positions_is_refused_before_training(
        tmp_path, tiny_model_dir) -> None:
    """The student has no position limit, the teacher does (the tiny Llama: 1,024 positions)."""
    from student_trainer.data.preprocess import PreprocessConfig, preprocess

    shards = tmp_path / "long-rows"
    preprocess(PreprocessConfig(inputs=["python-docs"], output=str(shards), tokenizer=str(tiny_model_dir),
                                max_seq_length=2048, val_fraction=0.1, progress=False, corpus_dir=str(tmp_path / "c")))
    settings = {"output_dir": str(tmp_path / "run"), "train_data": str(shards), "model_variant": "tiny", "device": "cpu",
                "max_seq_length": 2048, "batch_size": 1, "max_steps": 2, "warmup_steps": 0, "wandb_mode": "disabled",
                "progress": False, "teacher_mode": "direct", "teacher_model": str(tiny_model_dir), "teacher_topk": 16}
    with pytest.raises(ValueError, match="max_seq_length=2048 but the teacher .* takes at most 1024 positions"):
        train(load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_answers_a_long_document_from_a_prompt_file(tmp_path, tiny_model_dir, capsys) -> None:
    """``retnet-distill generate --prompt-file``: a ~6K-token document, far past the student's 256-token
    training context, is consumed chunk by chunk into the state the answer is decoded from."""
    from pydoc_data.topics import topics

    from student_trainer.cli import main as cli_main
    from student_trainer.evaluation.generate import load_chat, Sampling
    from tests.conftest import TINY_VOCAB

    tiny_student(TINY_VOCAB).save(tmp_path / "student")
    document = tmp_path / "doc.txt"
    document.write_text("\n\n".join(topics[key] for key in sorted(topics)[:12]) + "\n\nWhat is this about?")
    session = load_chat(str(tmp_path / "student"), str(tiny_model_dir), Sampling(greedy=True, max_new_tokens=3))
    session.reply(document.read_text())
    assert session.state.position == len(session.consumed) > 4000
    with torch.no_grad():  # the state's next-token logits = the chunkwise pass over the whole prompt
        expected = session.student(torch.tensor([session.consumed]))[0, -1]
    torch.testing.assert_close(session.logits[0], expected, atol=1e-4, rtol=1e-4)

    args = ["generate", "--checkpoint", str(tmp_path / "student"), "--tokenizer", str(tiny_model_dir), "--greedy",
            "--max-new-tokens", "3"]
    assert cli_main(args + ["--prompt-file", str(document)]) == 0
    assert cli_main(args + ["--prompt-file", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read --prompt-file" in capsys.readouterr().err
    assert cli_main(args + ["--prompt-file", str(document), "--prompt", "x"]) == 2
