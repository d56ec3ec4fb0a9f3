"""Checkpoint evaluation, training-curve plots and chat generation on a tiny teacher and student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student_trainer.cli import main as cli_main
from student_trainer.training.config import load_config
from student_trainer.data.shards import PretokenizedShardDataset
from student_trainer.evaluation.evaluate import (
    EvalSettings,
    evaluate,
    heldout_metrics,
    recurrent_parallel_difference,
)
from student_trainer.evaluation.generate import ChatSession, Sampling, interactive
from student_trainer.evaluation.plots import plot_training_curves, read_metrics
from student_trainer.teachers import DirectTeacher
from student_trainer.training.checkpoint import CheckpointNotFound, resolve_checkpoint
from student_trainer.training.recipe import train
from tests.conftest import TINY_VOCAB, tiny_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_engine, tiny_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    settings = {"output_dir": str(run), "train_data": str(tiny_shards), "model_variant": "tiny", "device": "cpu",
                "max_seq_length": 32, "batch_size": 4, "max_steps": 12, "warmup_steps": 2, "log_every": 1,
                "eval_every": 6, "eval_batches": 2, "save_every": 6, "lr": 3e-3, "weight_decay": 0.0,
                "wandb_mode": "disabled", "progress": False, "teacher_topk": 16, "teacher_model": str(tiny_model_dir)}
    config = load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()])
    train(config, teacher=DirectTeacher(tiny_engine, k=16, temperature=1.0))
    return run


class _TeacherAsStudent(torch.nn.Module):
    """The teacher LM behind the student's call signature (``ids [1, L] -> logits [1, L, V]``)."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def test_a_student_equal_to_its_teacher_has_zero_kl_full_agreement_and_the_same_perplexity(tiny_engine, tiny_shards):
    dataset = PretokenizedShardDataset(tiny_shards, "val")
    m = heldout_metrics(_TeacherAsStudent(tiny_engine.model), tiny_engine.model, dataset, TINY_VOCAB, 2, 4, torch.device("cpu"))
    assert m["kl_teacher_student"] == pytest.approx(0.0, abs=1e-5)
    assert m["top1_agreement"] == 1.0
    assert m["student_perplexity"] == pytest.approx(m["teacher_perplexity"], rel=1e-5)
    assert m["target_tokens"] > 0


def test_heldout_metrics_match_a_dense_reference(tiny_engine, tiny_shards):
    dataset = PretokenizedShardDataset(tiny_shards, "val")
    student = tiny_student().eval()
    m = heldout_metrics(student, tiny_engine.model, dataset, TINY_VOCAB, 2, 4, torch.device("cpu"))
    nll, kl, agree, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for index in range(8):
            row = dataset[index]
            ids, mask = row["input_ids"][: row["length"]], row["loss_mask"][: row["length"]]
            s = torch.log_softmax(student(ids[None])[0, :-1, :TINY_VOCAB], -1)
            t = torch.log_softmax(tiny_engine.model(input_ids=ids[None]).logits[0, :-1, :TINY_VOCAB], -1)
            keep = mask[1:]
            s, t, labels = s[keep], t[keep], ids[1:][keep]
            nll -= float(s.gather(1, labels[:, None]).sum())
            kl += float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum"))
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
            count += int(keep.sum())
    assert m["target_tokens"] == count
    assert m["student_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert m["kl_teacher_student"] == pytest.approx(kl / count, rel=1e-4)
    assert m["top1_agreement"] == pytest.approx(agree / count)


def test_recurrent_path_agrees_with_parallel_and_a_wrong_state_is_caught():
    student = tiny_student(vocab_size=TINY_VOCAB).eval()
    ids = torch.randint(0, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    assert recurrent_parallel_difference(student, ids) < 1e-4
    real_step = student.step
    # a state that forgot where it is (decay tables of position 0 at every step) must show up
    student.step = lambda token, state: real_step(token, type(state)(0, state.layers))
    assert recurrent_parallel_difference(student, ids) > 1e-3


def test_evaluate_writes_a_report_and_curves_of_the_run(trained_run, tiny_model_dir, tiny_shards, tmp_path):
    settings = EvalSettings(checkpoint=str(trained_run), data=str(tiny_shards), teacher=str(tiny_model_dir), batches=2,
                            prompts=["def f(x):"], max_new_tokens=8, output_dir=str(tmp_path / "eval"))
    report = evaluate(settings)
    assert report["step"] == 12 and report["checkpoint"].endswith("step-00000012/model")
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["metrics"] == report["metrics"]
    m = report["metrics"]
    assert 1 < m["student_perplexity"] < 10 * TINY_VOCAB and 1 < m["teacher_perplexity"]
    assert m["kl_teacher_student"] > 0 and 0 <= m["top1_agreement"] <= 1
    assert m["recurrent_vs_parallel_max_abs_diff"] < 1e-4 and m["decode_tokens_per_s"] > 0
    assert report["samples"][0]["prompt"] == "def f(x):" and 0 < report["samples"][0]["student_tokens"] <= 8
    assert (tmp_path / "eval" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_names_a_missing_checkpoint(tmp_path, capsys):
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "nothing")]) == 1
    assert "is not a run folder" in capsys.readouterr().err


def test_resolve_checkpoint_accepts_run_checkpoint_and_model_folders(trained_run):
    from_run = resolve_checkpoint(trained_run)
    assert from_run.step == 12 and from_run.run_dir == trained_run and from_run.train_config["max_steps"] == 12
    assert resolve_checkpoint(from_run.model_dir.parent).model_dir == from_run.model_dir
    bare = resolve_checkpoint(from_run.model_dir)
    assert bare.run_dir is None and bare.train_config == {}
    with pytest.raises(CheckpointNotFound, match="not a run folder"):
        resolve_checkpoint(trained_run / "checkpoints")


def test_plots_mark_events_and_refuse_files_without_training_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "train/total": 5 - s / 10, "train/grad_norm": 1.0, "lr/muon": 1e-3, "teacher/share": 0.1}
             for s in range(1, 21)]
    lines.insert(10, {"step": 10, "event": "saddle_intervention", "multiplier": 2.0})
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 21, "train/to')  # torn last line
    assert len(read_metrics(metrics)) == 21
    png = plot_training_curves(metrics, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "other.jsonl").write_text('{"step": 1, "foo": 2}\n')
    with pytest.raises(ValueError, match="no train/total"):
        plot_training_curves(tmp_path / "other.jsonl", tmp_path / "x.png")


def test_plots_keep_onpolicy_steps_apart_and_draw_the_generation_panel(tmp_path):
    from student_trainer.evaluation.plots import ONPOLICY_KEY, series

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "train/total": 3.0, "train/divergence": 0.5 if s % 2 else 2.0, "train/onpolicy": float(s % 2),
              "train/grad_norm": 1.0, "lr/adamw": 1e-4, "teacher/share": 0.2} for s in range(1, 11)]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = read_metrics(metrics)
    assert series(records, ONPOLICY_KEY) == ([1, 3, 5, 7, 9], [0.5] * 5)
    assert series(records, "train/divergence") == ([2, 4, 6, 8, 10], [2.0] * 5)
    assert series(records, "train/grad_norm")[0] == list(range(1, 11))  # not a loss part: every step
    generation = {"student": {"teacher_nll": 2.1, "distinct_2": 0.8, "distinct_3": 0.9, "repetition_4": None},
                  "teacher": {"teacher_nll": 1.2, "distinct_2": 0.9, "distinct_3": 0.95, "repetition_4": 0.0}}
    plain = plot_training_curves(metrics, tmp_path / "plain.png")
    with_generation = plot_training_curves(metrics, tmp_path / "curves.png", generation=generation)
    from PIL import Image

    assert Image.open(with_generation).size[1] > Image.open(plain).size[1]  # the fifth panel's row


@pytest.fixture()
def chat_tokenizer(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = CHATML
    yield tokenizer
    tokenizer.chat_template = saved


def test_greedy_streaming_answer_equals_argmax_decoding_of_the_parallel_model(chat_tokenizer):
    student = tiny_student(vocab_size=TINY_VOCAB)
    session = ChatSession(student, chat_tokenizer, Sampling(greedy=True, max_new_tokens=12), torch.device("cpu"))
    pieces: list[str] = []
    answer = session.reply("What is a list?", pieces.append)
    assert "".join(pieces) == answer
    ids = chat_tokenizer.apply_chat_template([{"role": "user", "content": "What is a list?"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    expected = []
    with torch.no_grad():
        for _ in range(12):
            token = int(student(torch.tensor([ids + expected]))[0, -1].argmax())
            if token == chat_tokenizer.eos_token_id:
                break
            expected.append(token)
    assert answer == chat_tokenizer.decode(expected, skip_special_tokens=True)


def test_a_second_turn_extends_the_recurrent_state_without_reprefilling(chat_tokenizer):
    student = tiny_student(vocab_size=TINY_VOCAB)
    # greedy: a sampled special token (the random tiny model writes <s> now and then) is dropped from the
    # answer's text, so the re-rendered chat differs from what was consumed and the session rightly starts over
    session = ChatSession(student, chat_tokenizer, Sampling(greedy=True, max_new_tokens=6), torch.device("cpu"))
    session.reply("first question")
    session.reply("and a second one")
    assert session.prefills == 1 and len(session.messages) == 4
    with torch.no_grad():  # the state after both turns = one parallel pass over everything consumed
        expected = student(torch.tensor([session.consumed]))[0, -1]
    torch.testing.assert_close(session.logits[0], expected, atol=1e-4, rtol=1e-4)
    assert session.state.position == len(session.consumed)


def test_interactive_mode_reads_turns_until_exit(chat_tokenizer):
    session = ChatSession(tiny_student(vocab_size=TINY_VOCAB), chat_tokenizer, Sampling(greedy=True, max_new_tokens=4),
                          torch.device("cpu"))
    turns = iter(["hello", "/reset", "again", "/exit"])
    written: list[str] = []
    assert interactive(session, read=lambda prompt: next(turns), write=written.append) == 0
    assert "".join(written).count("student> ") == 2
    assert len(session.messages) == 2  # the reset dropped the first exchange


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="temperature > 0"):
        Sampling(temperature=0.0).check()
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(greedy=True, max_new_tokens=0).check()
