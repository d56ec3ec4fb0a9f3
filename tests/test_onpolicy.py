"""On-policy distillation: prompts, the student's batched sampler, the union-support loss against a
dense reference, and training runs (direct and network mode, resume, refusals)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from student_trainer.training.config import ConfigError, load_config
from student_trainer.training.batches import Batch
from student_trainer.data.preprocess import PreprocessConfig, preprocess
from student_trainer.training.losses import LossConfig, distillation_loss_from_logits
from student_trainer.training.onpolicy import (OnPolicySettings, future_advantages, prompts_of, sample_rollout,
                                               union_targets)
from student_trainer.teachers.targets import TeacherScores, TeacherTargets
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train
from tests.conftest import tiny_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer in a sentence."},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}, which is the sum of the two numbers."}]}
    for a, b in [(2, 3), (10, 7), (4, 4), (12, 30), (8, 1), (6, 9), (21, 21), (5, 13), (3, 3), (40, 2), (7, 7), (9, 11)]
]


@pytest.fixture(scope="module")
def chat_shards(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chat rows (user turn, then an assistant answer that is the only target), 64 tokens a row."""
    root = tmp_path_factory.mktemp("chat")
    source = root / "chat.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in CHAT * 3))
    folder = root / "shards"
    preprocess(PreprocessConfig(inputs=[str(source)], output=str(folder), tokenizer=str(tiny_model_dir),
                                max_seq_length=64, val_fraction=0.1, pack=False, progress=False))
    return folder


@pytest.fixture(scope="module")
def tiny_teacher(tiny_engine) -> DirectTeacher:
    return DirectTeacher(tiny_engine, k=8, temperature=1.0)


def settings(**overrides) -> OnPolicySettings:
    values = {"fraction": 0.5, "max_new_tokens": 6, "temperature": 1.0, "student_topk": 4, "divergence": "reverse_kl",
              "jsd_beta": 0.5, "stop_ids": [], "max_seq_length": 32, **overrides}
    return OnPolicySettings(**values)


def a_batch(rows: list[list[int]], first_targets: list[int | None]) -> Batch:
    """Right-padded rows; tokens from ``first_targets[i]`` on are targets (None: every token)."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, (row, first) in enumerate(zip(rows, first_targets)):
        ids[i, :len(row)] = torch.tensor(row)
        loss_mask[i, (first or 0):len(row)] = 1
    row_mask = torch.zeros_like(loss_mask)
    row_mask[:, :-1] = loss_mask[:, 1:]
    return Batch(ids, torch.tensor(list(map(len, rows))), torch.arange(len(rows)), row_mask, torch.full_like(ids, -100))


# ----------------------------------------------------------------------------------------- prompts


def test_a_prompt_ends_before_the_first_target_token_or_is_half_of_plain_text() -> None:
    batch = a_batch([list(range(10, 20)), list(range(30, 38)), list(range(40, 52))], [4, None, 3])
    prompts = prompts_of(batch, max_prompt_tokens=100)
    assert prompts[0].tolist() == [10, 11, 12, 13]  # the chat turns before the answer
    assert prompts[1].tolist() == [30, 31, 32, 33]  # plain text: its first half
    assert prompts[2].tolist() == [40, 41, 42]
    assert prompts_of(batch, max_prompt_tokens=2)[0].tolist() == [12, 13]  # the last tokens are kept


# ----------------------------------------------------------------------------------------- sampler


def test_the_sampler_writes_from_each_prompt_and_marks_only_written_positions() -> None:
    student = tiny_student(64).eval()
    batch = a_batch([list(range(1, 11)), list(range(20, 25)), list(range(30, 44))], [6, 2, 9])
    generator = torch.Generator().manual_seed(0)
    stop = 7
    rollout = sample_rollout(student, batch, settings(stop_ids=[stop], student_topk=5, sequence_weight=1.0, temperature=0.7), generator,
                             vocab_limit=50, device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False))
    out = rollout.batch
    prompts = prompts_of(batch, 32 - 6)
    for row, prompt in enumerate(prompts):
        n, start = int(out.lengths[row]), len(prompt)
        assert out.input_ids[row, :start].tolist() == prompt.tolist()
        supervised = out.row_mask[row].nonzero()[:, 0].tolist()
        written = len(supervised)
        assert 1 <= written <= 6 and supervised == list(range(start - 1, start - 1 + written))
        assert n == start + written - 1  # the last written token is a target, not an input
        sampled = rollout.score_ids[row, supervised, -1]
        # the sampled token of row t is the input at t + 1 (and the last one is only scored)
        assert sampled[:-1].tolist() == out.input_ids[row, start:n].tolist()
        assert stop not in sampled[:-1].tolist() and (written == 6 or int(sampled[-1]) == stop)
        assert int(rollout.score_ids[row].max()) < 50  # never beyond the teacher's vocab
        assert (rollout.score_ids[row, n:] == 0).all() and (out.row_mask[row, n:] == 0).all()
    assert rollout.written_tokens == int(out.row_mask.sum())
    # the written tokens are the labels of the rows that predict them, nothing else has one
    written_mask = out.row_mask.bool()
    assert (out.labels[written_mask] == rollout.score_ids[..., -1][written_mask]).all()
    assert (out.labels[~written_mask] == -100).all()
    # the student's own top 5 are the scored ids next to the sampled one
    logits = student(out.input_ids)[..., :50]
    row, t = 0, len(prompts[0]) - 1
    assert set(rollout.score_ids[row, t, :5].tolist()) == set(logits[row, t].topk(5).indices.tolist())
    # and the log-probs the sampler recorded are the student's own of the scored ids (over the teacher's
    # ids), its sampling distribution over its top 5 the tempered softmax renormalised over them
    for row in range(len(prompts)):
        positions = out.row_mask[row].nonzero()[:, 0]
        for t in positions[:-1].tolist():  # the last written token is not an input, so no logits row here
            expected = logits[row, t].log_softmax(-1)[rollout.score_ids[row, t]]
            torch.testing.assert_close(rollout.student_logprobs[row, t], expected, atol=1e-4, rtol=0)
            assert int(rollout.score_ids[row, t, -1]) == int(out.labels[row, t])
            top = logits[row, t].topk(5)
            torch.testing.assert_close(rollout.policy[row, t], torch.softmax(top.values / 0.7, -1), atol=1e-5, rtol=0)
    assert (rollout.student_logprobs[~written_mask] == 0).all() and (rollout.policy[~written_mask] == 0).all()


def test_onpolicy_top_p_keeps_the_sampling_inside_the_nucleus() -> None:
    """A nucleus of one id (top_p near 0) writes the student's own argmax at every written position; the
    whole vocabulary (top_p 1) at a high temperature does not."""
    student = tiny_student(64).eval()
    batch = a_batch([list(range(1, 11)), list(range(20, 25))], [6, 2])
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)

    def written_vs_argmax(top_p: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        rollout = sample_rollout(student, batch, settings(max_new_tokens=8, top_p=top_p, temperature=temperature),
                                 torch.Generator().manual_seed(5), 50, cpu, off)
        mask = rollout.batch.row_mask.bool()
        return rollout.score_ids[..., -1][mask], rollout.score_ids[..., 0][mask]  # sampled, the student's top 1

    sampled, top1 = written_vs_argmax(1e-6, 5.0)
    assert torch.equal(sampled, top1)
    sampled, top1 = written_vs_argmax(1.0, 5.0)
    assert not torch.equal(sampled, top1)


def test_the_same_generator_state_writes_the_same_text() -> None:
    student = tiny_student(64).eval()
    batch = a_batch([list(range(1, 11)), list(range(20, 25))], [6, 2])
    args = (settings(max_new_tokens=8), )
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    generator = torch.Generator().manual_seed(3)
    saved = generator.get_state()
    first = sample_rollout(student, batch, *args, generator, 64, cpu, off)
    generator.set_state(saved)
    again = sample_rollout(student, batch, *args, generator, 64, cpu, off)
    assert torch.equal(first.batch.input_ids, again.batch.input_ids)
    other = sample_rollout(student, batch, *args, generator, 64, cpu, off)
    assert not torch.equal(first.score_ids, other.score_ids)


# ----------------------------------------------------------------------------------- union support


def dense_case(vocab: int = 40, k: int = 5, m: int = 6, seed: int = 0):
    """Dense teacher and student logits on [1, 4] rows, the teacher's top k as targets and the student's
    top m-1 plus one sampled id as scored ids (overlapping the teacher's on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 2.5 * torch.randn(1, 4, vocab, generator=gen, dtype=torch.float64)
    student = teacher + 1.5 * torch.randn(1, 4, vocab, generator=gen, dtype=torch.float64)
    lt = torch.log_softmax(teacher, dim=-1)
    top = lt.topk(k, dim=-1)
    mass = top.values.exp().sum(-1)
    targets = TeacherTargets(top.indices, top.values.float(), torch.log1p(-mass).float(), temperature=1.0)
    sampled = torch.randint(0, vocab, (1, 4, 1), generator=gen)
    score_ids = torch.cat([student.topk(m - 1, dim=-1).indices, sampled], dim=-1)
    scores = TeacherScores(targets, score_ids, lt.gather(-1, score_ids).float(), torch.logsumexp(teacher, -1).float())
    return teacher, student, scores


def partition_divergence(teacher, student, ids: set[int], kind: str, beta: float = 0.5) -> float:
    """The divergence of the two distributions coarsened to {each id of ``ids``} + {the rest}, by hand."""
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    inside = torch.zeros_like(p, dtype=torch.bool)
    inside[list(ids)] = True
    p_b = torch.cat([p[inside], p[~inside].sum()[None]]) if (~inside).any() else p[inside]
    q_b = torch.cat([q[inside], q[~inside].sum()[None]]) if (~inside).any() else q[inside]
    if kind == "reverse":
        return float((q_b * (q_b.log() - p_b.log())).sum())
    mix = beta * p_b + (1 - beta) * q_b
    return float(beta * (p_b * (p_b.log() - mix.log())).sum() + (1 - beta) * (q_b * (q_b.log() - mix.log())).sum())


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_the_union_support_loss_is_the_divergence_on_that_partition(kind: str) -> None:
    teacher, student, scores = dense_case()
    mask = torch.ones(1, 4, dtype=torch.bool)
    union = union_targets(scores, mask)
    assert union.k == 5 + 6
    config = LossConfig(alpha=0.0, divergence=kind, jsd_beta=0.3 if kind == "jsd" else 0.5)
    out = distillation_loss_from_logits(student.float(), union, torch.full((1, 4), -100), mask.float(), config)
    expected = []
    for t in range(4):
        ids = set(scores.targets.indices[0, t].tolist()) | set(scores.score_ids[0, t].tolist())
        expected.append(partition_divergence(teacher[0, t], student[0, t], ids, kind, config.jsd_beta))
    assert out.divergence.item() == pytest.approx(sum(expected) / 4, rel=1e-4, abs=1e-6)
    # repeats of the teacher's ids (and of each other) are padding entries, and the exact scored value wins
    for t in range(4):
        valid = union.indices[0, t][union.logprobs[0, t] > -math.inf].tolist()
        assert len(valid) == len(set(valid))
        lt = torch.log_softmax(teacher[0, t], -1)
        assert torch.allclose(union.logprobs[0, t][union.logprobs[0, t] > -math.inf].double(),
                              lt[valid], atol=1e-6)
        covered = lt[valid].exp().sum()
        assert union.tail_logprob[0, t].double().exp() == pytest.approx(float(1 - covered), rel=1e-4)


def test_when_the_union_covers_the_vocab_it_is_the_full_reverse_kl() -> None:
    vocab = 12
    teacher, student, scores = dense_case(vocab=vocab, k=6, m=vocab)  # the student's top 11 + one sampled id
    mask = torch.ones(1, 4, dtype=torch.bool)
    union = union_targets(scores, mask)
    out = distillation_loss_from_logits(student.float(), union, torch.full((1, 4), -100), mask.float(),
                                        LossConfig(alpha=0.0, divergence="reverse"))
    p, q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    dense = (q.exp() * (q - p)).sum(-1).mean()
    assert out.divergence.item() == pytest.approx(float(dense), rel=1e-4)


def test_rows_outside_the_mask_are_padding() -> None:
    _, _, scores = dense_case()
    mask = torch.tensor([[False, True, False, True]])
    union = union_targets(scores, mask)
    assert torch.isneginf(union.logprobs[0, 0]).all() and torch.isneginf(union.tail_logprob[0, 2])
    assert (union.logprobs[0, 1] > -math.inf).any()


@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
def test_a_written_tokens_advantage_is_the_whitened_discounted_mean_of_the_later_rewards(discount: float) -> None:
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 9, generator=gen)
    written = torch.zeros(3, 9, dtype=torch.bool)
    written[0, 2:8], written[1, 0:3], written[2, 4:5] = True, True, True  # row 2: one token, no future
    padded = torch.where(written, rewards, torch.tensor(123.0))  # what lies outside must not count
    advantages = future_advantages(padded, written, discount)
    returns = {}
    for row in range(3):
        positions = written[row].nonzero()[:, 0].tolist()
        for i, t in enumerate(positions[:-1]):
            later = positions[i + 1:]
            weights = [discount ** (j - t - 1) if j - t - 1 > 0 else 1.0 for j in later]
            returns[row, t] = sum(w * float(rewards[row, j]) for w, j in zip(weights, later)) / sum(weights)
    values = torch.tensor(list(returns.values()), dtype=torch.float64)
    expected = (values - values.mean()) / values.std()
    for (row, t), value in zip(returns, expected.tolist()):
        assert float(advantages[row, t]) == pytest.approx(value, abs=1e-4)
    has_future = torch.zeros_like(written)
    for row, t in returns:
        has_future[row, t] = True
    assert (advantages[~has_future] == 0).all()  # last tokens, the lone token, prompt and padding
    if discount == 0.0:  # the next token's reward only
        assert returns[0, 2] == pytest.approx(float(rewards[0, 3]))


@pytest.mark.parametrize("reward", ["teacher_logprob", "reverse_kl"])
def test_a_positions_reward_is_the_drawn_tokens_or_its_expectation_over_the_students_top_k(reward: str) -> None:
    from student_trainer.training.onpolicy import Rollout, sequence_rewards

    gen = torch.Generator().manual_seed(4)
    b, length, k = 2, 5, 3
    teacher = torch.randn(b, length, k + 1, generator=gen).log_softmax(-1)
    student = torch.randn(b, length, k + 1, generator=gen).log_softmax(-1)
    policy = torch.rand(b, length, k, generator=gen)
    policy = policy / policy.sum(-1, keepdim=True)
    teacher[1, 4] = -math.inf  # a padding row of the reply: no NaN leaks out of it
    ids = torch.zeros(b, length, k + 1, dtype=torch.int64)
    rollout = Rollout(None, ids, student, policy, 0, 0)  # type: ignore[arg-type]
    scores = TeacherScores(None, ids, teacher, torch.zeros(b, length))  # type: ignore[arg-type]
    per_id = teacher - student if reward == "reverse_kl" else teacher
    sampled = sequence_rewards(rollout, scores, settings(sequence_reward=reward, sequence_return="sampled"))
    expected = sequence_rewards(rollout, scores, settings(sequence_reward=reward, sequence_return="expected"))
    torch.testing.assert_close(sampled[0], per_id[0, :, -1])
    torch.testing.assert_close(expected[0], (policy[0] * per_id[0, :, :k]).sum(-1))
    assert torch.isfinite(sampled).all() and torch.isfinite(expected).all()


def test_the_sequence_term_adds_a_policy_gradient_to_the_same_text(tmp_path, chat_shards, tiny_teacher) -> None:
    """onpolicy_sequence_weight: the first step writes the same text (same seed, same weights), its
    divergence is the same, the loss is not, and the written tokens' mean reward is logged."""
    first = {}
    for name, extra in (("plain", {}),
                        ("reverse_kl", {"onpolicy_sequence_weight": 1.0}),
                        ("teacher", {"onpolicy_sequence_weight": 1.0, "onpolicy_sequence_reward": "teacher_logprob",
                                     "onpolicy_sequence_discount": 1.0, "onpolicy_sequence_return": "sampled"})):
        summary = train(run_config(tmp_path / name, chat_shards, max_steps=3, onpolicy_fraction=1.0, **extra),
                        teacher=tiny_teacher)
        assert summary["steps"] == 3
        lines = [line for line in metric_lines(tmp_path / name) if "train/total" in line]
        assert all(math.isfinite(line["train/total"]) for line in lines)
        first[name] = lines[0]
    plain = first["plain"]
    for name in ("reverse_kl", "teacher"):
        assert first[name]["onpolicy/written_tokens"] == plain["onpolicy/written_tokens"]
        assert first[name]["train/divergence"] == pytest.approx(plain["train/divergence"], rel=1e-5)
        assert first[name]["train/total"] != pytest.approx(plain["train/total"], rel=1e-4)
    assert first["teacher"]["onpolicy/reward"] < 0  # a mean of the teacher's log-probs of the drawn tokens
    # the reverse-KL reward is the teacher's log-prob minus the student's: it differs from the plain one
    assert first["reverse_kl"]["onpolicy/reward"] != pytest.approx(first["teacher"]["onpolicy/reward"], rel=1e-3)


def test_the_schedule_spreads_onpolicy_steps_evenly() -> None:
    quarter = [s for s in range(12) if settings(fraction=0.25).is_onpolicy(s)]
    assert quarter == [3, 7, 11]
    assert [s for s in range(6) if settings(fraction=0.5).is_onpolicy(s)] == [1, 3, 5]
    assert all(settings(fraction=1.0).is_onpolicy(s) for s in range(5))
    assert not settings(fraction=0.25).is_onpolicy(-1)  # stage 1 is never on-policy


# ----------------------------------------------------------------------------------------- training


def run_config(output_dir: Path, shards: Path, **overrides):
    values = {"output_dir": str(output_dir), "train_data": str(shards), "model_variant": "tiny", "device": "cpu",
              "max_seq_length": 64, "batch_size": 4, "max_steps": 8, "warmup_steps": 1, "log_every": 1,
              "eval_every": 4, "eval_batches": 1, "save_every": 4, "keep_last": 3, "lr": 3e-3, "weight_decay": 0.0,
              "wandb_mode": "disabled", "progress": False, "teacher_topk": 8, "saddle_detection": False,
              "onpolicy_fraction": 0.5, "onpolicy_max_new_tokens": 8, "onpolicy_student_topk": 4, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def metric_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_mixes_onpolicy_steps_into_kd_and_resumes_exactly(tmp_path, chat_shards, tiny_teacher) -> None:
    straight = train(run_config(tmp_path / "straight", chat_shards, grad_accum_steps=2), teacher=tiny_teacher)
    assert straight["steps"] == 8
    lines = [line for line in metric_lines(tmp_path / "straight") if "train/total" in line]
    onpolicy = {line["step"] for line in lines if line["train/onpolicy"] == 1.0}
    assert onpolicy == {2, 4, 6, 8}  # KD steps 1, 3, 5, 7 (logged after the step)
    for line in lines:
        assert math.isfinite(line["train/total"])
        if line["step"] in onpolicy:
            assert line["onpolicy/written_tokens"] > 0 and line["train/divergence"] >= 0.0
            # the student's NLL of its own text is logged as train/ce, but its own samples are not hard labels
            assert line["train/ce"] > 0.0 and "onpolicy/reward" not in line
            assert line["train/total"] == pytest.approx(line["train/divergence"], rel=1e-5)
    state = json.loads((Path(straight["checkpoint"]) / "trainer_state.json").read_text())
    assert len(state["onpolicy_rng"]) == 1 and state["teacher_tokens"] > 0

    train(run_config(tmp_path / "resumed", chat_shards, grad_accum_steps=2, stop_at_step=3), teacher=tiny_teacher)
    # the checkpoint at step 3 is between on-policy steps: the resumed sampler must continue its stream
    train(run_config(tmp_path / "resumed", chat_shards, grad_accum_steps=2), teacher=tiny_teacher)
    a = {line["step"]: line for line in lines}
    b = {line["step"]: line for line in metric_lines(tmp_path / "resumed") if "train/total" in line}
    for step in range(1, 9):
        assert b[step]["train/total"] == pytest.approx(a[step]["train/total"], rel=1e-5, abs=1e-6), step
        assert b[step].get("onpolicy/written_tokens") == a[step].get("onpolicy/written_tokens")


def test_jsd_and_a_fraction_of_one(tmp_path, chat_shards, tiny_teacher) -> None:
    summary = train(run_config(tmp_path / "jsd", chat_shards, max_steps=3, onpolicy_fraction=1.0,
                               onpolicy_divergence="jsd", onpolicy_jsd_beta=0.3), teacher=tiny_teacher)
    lines = [line for line in metric_lines(tmp_path / "jsd") if "train/total" in line]
    assert [line["train/onpolicy"] for line in lines] == [1.0, 1.0, 1.0]
    assert all(0.0 <= line["train/divergence"] <= math.log(2) for line in lines)  # a JSD is bounded
    assert summary["steps"] == 3


def test_a_sharper_teacher_scores_the_same_text_at_its_own_temperature(tmp_path, chat_shards, tiny_teacher) -> None:
    """onpolicy_teacher_temperature: the first step writes the same text (same seed, same weights) and
    its divergence is to the teacher at 0.5, not at the run's 1."""
    first = {}
    for name, extra in (("plain", {}), ("sharp", {"onpolicy_teacher_temperature": 0.5})):
        train(run_config(tmp_path / name, chat_shards, max_steps=2, onpolicy_fraction=1.0, **extra), teacher=tiny_teacher)
        first[name] = next(line for line in metric_lines(tmp_path / name) if "train/total" in line)
    assert first["plain"]["onpolicy/written_tokens"] == first["sharp"]["onpolicy/written_tokens"]
    assert math.isfinite(first["sharp"]["train/divergence"])
    assert first["sharp"]["train/divergence"] != pytest.approx(first["plain"]["train/divergence"], rel=1e-3)
    assert tiny_teacher.temperature == 1.0  # the run's teacher is untouched


@pytest.mark.parametrize("overrides, message", [
    ({"teacher_mode": "cached", "teacher_cache": "somewhere"}, "a cache holds only the teacher's top k"),
    ({"teacher_mode": "network", "teacher_url": "http://127.0.0.1:9", "teacher_fallback": ["cached"]},
     "teacher_fallback includes cached"),
    ({"onpolicy_fraction": 1.5}, r"onpolicy_fraction must be in \[0, 1\]"),
    ({"onpolicy_max_new_tokens": 64}, r"onpolicy_max_new_tokens must be in \[1, max_seq_length=64\)"),
    ({"onpolicy_temperature": 0.0}, "onpolicy_temperature must be > 0"),
    ({"onpolicy_top_p": 0.0}, r"onpolicy_top_p must be in \(0, 1\]"),
    ({"onpolicy_top_p": 1.5}, r"onpolicy_top_p must be in \(0, 1\]"),
    ({"onpolicy_jsd_beta": 1.0}, r"onpolicy_jsd_beta must be in \(0, 1\)"),
    ({"onpolicy_teacher_temperature": 0.0}, "onpolicy_teacher_temperature must be a finite number > 0"),
    ({"onpolicy_teacher_temperature": float("inf")}, "onpolicy_teacher_temperature must be a finite number > 0"),
    ({"onpolicy_sequence_weight": -0.5}, "onpolicy_sequence_weight must be a finite number >= 0"),
    ({"onpolicy_sequence_discount": 1.5}, r"onpolicy_sequence_discount must be in \[0, 1\]"),
    ({"onpolicy_sequence_reward": "bleu"}, "onpolicy_sequence_reward"),
    ({"onpolicy_sequence_return": "mean"}, "onpolicy_sequence_return"),
])
def test_bad_onpolicy_settings_are_refused_before_training(tmp_path, chat_shards, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path / "bad", chat_shards, **overrides)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------ network mode


@pytest.fixture(scope="module")
def service(tiny_engine, one_torch_thread, tmp_path_factory):
    """The real app around the real tiny engine in uvicorn (in a thread), scoring at most 6 ids a position."""
    import uvicorn

    from student_trainer.teachers.process import free_port
    from teacher_server.app import create_app
    from teacher_server.settings import TeacherSettings

    root = tmp_path_factory.mktemp("onpolicy-server")
    config = TeacherSettings(model="tiny", device="cpu", max_k=32, default_k=8, max_tokens_per_request=4096,
                             max_score_ids=6, data_root=str(root), cache_root=str(root))
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine=tiny_engine), host="127.0.0.1",
                                           port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 60
    while not (server.started and httpx.get(url + "/ready").status_code == 200):
        assert time.monotonic() < deadline, "the in-thread server did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)


def test_network_mode_scores_the_students_text_over_the_wire(tmp_path, chat_shards, tiny_model_dir, service) -> None:
    config = run_config(tmp_path / "net", chat_shards, teacher_mode="network", teacher_url=service,
                        teacher_model=str(tiny_model_dir), max_steps=4, onpolicy_student_topk=5)
    summary = train(config)
    lines = [line for line in metric_lines(tmp_path / "net") if "train/total" in line]
    assert [line["train/onpolicy"] for line in lines] == [0.0, 1.0, 0.0, 1.0]
    assert all(math.isfinite(line["train/total"]) for line in lines) and summary["steps"] == 4
    assert lines[-1]["teacher/requests"] >= 4


def test_more_scored_ids_than_the_service_takes_are_refused_at_start(tmp_path, chat_shards, tiny_model_dir,
                                                                     service) -> None:
    config = run_config(tmp_path / "net", chat_shards, teacher_mode="network", teacher_url=service,
                        teacher_model=str(tiny_model_dir), onpolicy_student_topk=6)
    with pytest.raises(ValueError, match=r"onpolicy_student_topk \+ 1 = 7 ids .* scores at most 6"):
        train(config)
    assert not list((tmp_path / "net").glob("checkpoints/step-*"))
