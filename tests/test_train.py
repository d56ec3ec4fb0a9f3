"""The training recipe end to end on a tiny teacher and student: resume, interventions, telemetry."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from student_trainer.cli import main as cli_main
from student_trainer.training.config import ConfigError, load_config
from student_trainer.data.preprocess import PreprocessConfig, preprocess
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_teacher(tiny_engine) -> DirectTeacher:
    return DirectTeacher(tiny_engine, k=16, temperature=1.0)


def tiny_config(output_dir: Path, shards: Path, **overrides):
    settings = {"output_dir": str(output_dir), "train_data": str(shards), "model_variant": "tiny", "device": "cpu",
                "max_seq_length": 32, "batch_size": 4, "max_steps": 20, "warmup_steps": 2, "log_every": 1,
                "eval_every": 10, "eval_batches": 2, "save_every": 10, "keep_last": 5, "lr": 3e-3, "weight_decay": 0.0,
                "wandb_mode": "disabled", "progress": False, "teacher_topk": 16, "saddle_detection": False, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()])


def step_losses(output_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["train/total"] for line in lines if "train/total" in line}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, tiny_shards, tiny_teacher) -> None:
    straight = train(tiny_config(tmp_path / "straight", tiny_shards), teacher=tiny_teacher)
    assert straight["steps"] == 20
    first = train(tiny_config(tmp_path / "resumed", tiny_shards, stop_at_step=10), teacher=tiny_teacher)
    assert first["steps"] == 10 and first["checkpoint"].endswith("step-00000010")
    # a second invocation with resume=auto picks up step 10 and continues to 20
    train(tiny_config(tmp_path / "resumed", tiny_shards), teacher=tiny_teacher)
    a, b = step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(1, 21):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    assert a[20] < a[1]  # and it learns


def test_checkpoints_are_complete_and_pruned(tmp_path, tiny_shards, tiny_teacher) -> None:
    summary = train(tiny_config(tmp_path / "run", tiny_shards, max_steps=6, save_every=2, keep_last=2), teacher=tiny_teacher)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]
    last = Path(summary["checkpoint"])
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["sampler"]["position"] == 24 and state["config"]["model_variant"] == "tiny"
    assert state["teacher"]["tokenizer_sha256"] == tiny_teacher.tokenizer_sha256
    from student_trainer.model.student import RetNetStudent

    assert RetNetStudent.load(last / "model").config.vocab_size == tiny_teacher.vocab_size


def test_a_stuck_run_triggers_an_intervention_that_shows_in_the_metrics(tmp_path, tiny_shards, tiny_teacher) -> None:
    config = tiny_config(tmp_path / "stuck", tiny_shards, max_steps=30, lr=1e-9, saddle_detection=True, saddle_window=5,
                         saddle_warmup_steps=8, saddle_patience=3, saddle_boost=4.0, saddle_duration=5,
                         saddle_cooldown=100, saddle_min_improvement=0.01)
    summary = train(config, teacher=tiny_teacher)
    assert len(summary["saddle_events"]) == 1
    event = summary["saddle_events"][0]
    lines = [json.loads(line) for line in (tmp_path / "stuck" / "metrics.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines if line.get("event") == "saddle_intervention"] == ["saddle_intervention"]
    boosted = {line["step"] for line in lines if line.get("train/lr_multiplier") == 4.0}
    assert boosted == set(range(event["start"] + 1, event["end"] + 1))  # logged after each boosted step
    lr_by_step = {line["step"]: line["lr/adamw_no_decay"] for line in lines if "lr/adamw_no_decay" in line}
    before, during = lr_by_step[event["start"]], lr_by_step[event["start"] + 1]
    assert during / before == pytest.approx(4.0, rel=0.05)  # the boost multiplies the scheduled LR


def test_wandb_offline_mode_writes_a_local_run(tmp_path, tiny_shards, tiny_teacher) -> None:
    train(tiny_config(tmp_path / "wb", tiny_shards, max_steps=3, eval_every=3, save_every=3, wandb_mode="offline"),
          teacher=tiny_teacher)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    metrics = [json.loads(line) for line in (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()]
    step3 = [m for m in metrics if m["step"] == 3 and "train/total" in m][0]
    for key in ("train/ce", "train/kl", "train/diversity", "train/grad_norm", "lr/muon", "lr/adamw_no_decay",
                "train/tokens_per_s", "teacher/seconds", "teacher/share", "memory/rss_mb"):
        assert key in step3, key
    assert any("eval/kl" in m for m in metrics)


def test_data_from_another_tokenizer_is_refused(tmp_path, tiny_teacher) -> None:
    folder = tmp_path / "smol"
    preprocess(PreprocessConfig(inputs=["python-docs"], output=str(folder), max_seq_length=32, progress=False,
                                corpus_dir=str(tmp_path / "corpora")))
    with pytest.raises(ValueError, match="preprocess the data with the teacher's tokenizer"):
        train(tiny_config(tmp_path / "run", folder), teacher=tiny_teacher)


def test_config_keys_and_values_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'teacher_topK'; did you mean 'teacher_topk'"):
        load_config(None, ["teacher_topK=5"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, ["max_steps=10", "warmup_steps=10"])
    for path in ("configs/train_cpu.yaml", "configs/train_direct.yaml", "configs/train_retrofit.yaml",
                 "configs/train_cached.yaml", "configs/train_network.yaml"):
        load_config(Path(__file__).resolve().parents[1] / path)
    assert cli_main(["train", "--config", "configs/train_cpu.yaml", "distil_alpha=0.5"]) == 2


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_shards, tiny_teacher) -> None:
    """Two micro-batches of 2 rows take the same first step as one batch of 4 rows (same rows)."""
    big = train(tiny_config(tmp_path / "big", tiny_shards, max_steps=3, eval_every=3, save_every=3), teacher=tiny_teacher)
    accum = train(tiny_config(tmp_path / "accum", tiny_shards, max_steps=3, eval_every=3, save_every=3, batch_size=2,
                              grad_accum_steps=2), teacher=tiny_teacher)
    a, b = step_losses(tmp_path / "big"), step_losses(tmp_path / "accum")
    # the loss is a mean over the step's supervised rows however they fall into micro-batches (the
    # rows here have uneven lengths). Step 2's loss comes after one update: it checks the gradient too.
    assert b[1] == pytest.approx(a[1], rel=1e-5)
    assert b[2] == pytest.approx(a[2], rel=1e-5) and b[2] != pytest.approx(b[1], rel=1e-3)
    state = json.loads((Path(accum["checkpoint"]) / "trainer_state.json").read_text())
    assert state["sampler"]["position"] == 12 and state["tokens_seen"] == json.loads(
        (Path(big["checkpoint"]) / "trainer_state.json").read_text())["tokens_seen"]


def test_accumulated_gradients_with_uneven_masks_equal_one_big_batch(tiny_shards, tiny_teacher) -> None:
    """Micro-batches with few and many supervised rows (assistant-only masks) give the gradients of
    one batch of all their rows: every supervised row weighs the same (not every micro-batch)."""
    import torch

    from student_trainer.data.shards import PretokenizedShardDataset
    from student_trainer.training.distributed import Distributed
    from student_trainer.training.losses import LossConfig
    from student_trainer.training.recipe import Batch, DistillStep, step_row_totals
    from tests.conftest import tiny_student

    dataset = PretokenizedShardDataset(tiny_shards, "train")
    rows = [dataset[i] for i in range(4)]
    for row, keep in zip(rows, (3, 32, 32, 32)):  # the first micro-batch has a row with 2 supervised positions
        row["loss_mask"] = row["loss_mask"].clone()
        row["loss_mask"][keep:] = 0
    torch.manual_seed(0)
    student = tiny_student()
    step = DistillStep(student, LossConfig(alpha=0.5), torch.device("cpu"), torch.autocast("cpu", enabled=False))

    def gradients(batches: list[Batch], totals) -> list[torch.Tensor]:
        student.zero_grad(set_to_none=True)
        for batch in batches:
            targets = tiny_teacher.targets_for(batch.input_ids, batch.lengths, batch.indices)
            out = step(batch, targets, totals(batches) if totals else None)
            (out.loss if totals else out.loss / len(batches)).backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    big = gradients([Batch.from_rows(rows)], None)
    micro = [Batch.from_rows(rows[:2]), Batch.from_rows(rows[2:])]
    assert int(micro[0].row_mask.sum()) < int(micro[1].row_mask.sum())  # uneven
    accumulated = gradients(micro, lambda batches: step_row_totals(batches, Distributed(torch.device("cpu"))))
    for a, b in zip(accumulated, big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    per_micro_mean = gradients(micro, None)  # what micro-batch means give: visibly other gradients
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(per_micro_mean, big)) > 1e-2


@contextlib.contextmanager
def nan_at_steps(steps: set[int]):
    """NaN in the student's hidden states at the given training steps (1-based): an overflow in the
    forward, injected with a global forward hook on TorchScale's decoder (training mode only)."""
    from torchscale.architecture.retnet import RetNetDecoder

    calls = {"n": 0}

    def hook(module, args, output):
        if not isinstance(module, RetNetDecoder) or not module.training:
            return None
        calls["n"] += 1
        if calls["n"] in steps:
            hidden, extra = output
            return hidden * float("nan"), extra
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("stop_at_step", [4, None])
def test_a_skipped_last_step_still_stops_saves_and_evaluates(tmp_path, tiny_shards, tiny_teacher, stop_at_step) -> None:
    last = stop_at_step or 6
    with nan_at_steps({last}) as calls:
        summary = train(tiny_config(tmp_path, tiny_shards, max_steps=6, eval_every=100, save_every=100,
                                    stop_at_step=stop_at_step), teacher=tiny_teacher)
    assert summary["skipped_steps"] == 1 and summary["steps"] == last
    assert Path(summary["checkpoint"]).is_dir() and summary["checkpoint"].endswith(f"step-{last:08d}")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("event") == "nonfinite_skip"] == [last]
    if stop_at_step:
        assert any(line.get("event") == "stop" and line["step"] == last for line in lines)
        assert calls["n"] == last  # it stopped there
    else:
        assert any(line["step"] == last and "eval/kl" in line for line in lines)  # the final evaluation ran


def test_the_total_limit_of_skipped_steps_is_a_setting(tmp_path, tiny_shards, tiny_teacher) -> None:
    from student_trainer.training.health import TrainingDiverged

    with nan_at_steps({2, 4}), pytest.raises(TrainingDiverged, match="2 total steps"):
        train(tiny_config(tmp_path, tiny_shards, max_steps=6, max_total_nonfinite_steps=2), teacher=tiny_teacher)
    with pytest.raises(ConfigError, match="max_total_nonfinite_steps must be >= 1 or null"):
        tiny_config(tmp_path, tiny_shards, max_total_nonfinite_steps=0)
