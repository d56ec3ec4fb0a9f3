"""Retrofit: the teacher's weights in a RetNet student, attention transfer (stage 1), then KD (stage 2).

The mapping is proved exact by swapping a causal softmax mixer in for retention (a test-only switch):
the retrofitted student then *is* the teacher, log-prob for log-prob.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torchscale.component.multiscale_retention import theta_shift

from student_trainer.training.config import ConfigError, load_config
from student_trainer.evaluation.evaluate import recurrent_parallel_difference
from student_trainer.model.student import RetNetStudent
from student_trainer.model.retrofit import (
    RetrofitError,
    capture_attention,
    inverse_swish,
    layer_errors,
    load_teacher_lm,
    resolve_layers,
    retrofit,
    rotate_half_to_interleaved,
    student_config_for,
)
from student_trainer.teachers import DirectTeacher
from student_trainer.training.recipe import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 320  # the tiny teacher's tokenizer; its LM head has padded rows beyond it


def _softmax_forward(self, x, rel_pos, chunkwise_recurrent=False, incremental_state=None):
    """Causal softmax attention with the retention's own projections and rotary tables, no gate."""
    b, length, _ = x.shape
    (sin, cos), _ = rel_pos
    q = self.q_proj(x).view(b, length, self.num_heads, self.key_dim).transpose(1, 2)
    k = (self.k_proj(x) * self.scaling).view(b, length, self.num_heads, self.key_dim).transpose(1, 2)
    v = self.v_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
    scores = theta_shift(q, sin, cos) @ theta_shift(k, sin, cos).transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return self.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1))


@contextlib.contextmanager
def softmax_mixer(student: RetNetStudent):
    """Test-only switch: every layer mixes tokens with causal softmax attention instead of retention."""
    for layer in student.decoder.layers:
        layer.retention.forward = _softmax_forward.__get__(layer.retention)
    try:
        yield
    finally:
        for layer in student.decoder.layers:
            del layer.retention.forward


def _logprobs(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab].float(), dim=-1)


def _tiny(model_type: str, **overrides):
    """A random 2-layer Llama / Qwen2 / Qwen3 causal LM (GQA: 4 heads on 2 KV heads), sharpened q/k so
    that attention is far from uniform (a wrong rotary layout then shows)."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[model_type])
    settings = dict(vocab_size=VOCAB + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, head_dim=16)
    settings.update(overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**settings)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
            for name in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(layer.self_attn, name).bias
                if bias is not None:
                    bias.normal_(0, 0.5)
    return model


IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("qwen2", {}),  # q/k/v biases
])
def test_mapping_is_exact_with_a_softmax_mixer(model_type, overrides) -> None:
    teacher = _tiny(model_type, **overrides)
    student, _ = retrofit(teacher, IDS)
    with torch.no_grad(), softmax_mixer(student):
        ours = _logprobs(student(IDS), VOCAB)
    theirs = _logprobs(teacher(IDS).logits, VOCAB)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # without the switch it is a RetNet, which is not softmax attention
    with torch.no_grad():
        assert (_logprobs(student(IDS), VOCAB) - theirs).abs().max() > 1e-2


def test_a_wrong_rotary_layout_breaks_exactness() -> None:
    """The permutation matters: copying q/k rows as they are (rotate-half layout) is far off."""
    teacher = _tiny("llama")
    student, _ = retrofit(teacher, IDS)
    order = torch.argsort(rotate_half_to_interleaved(16))  # undo the permutation of every head
    with torch.no_grad():
        for layer in student.decoder.layers:
            for name in ("q_proj", "k_proj"):
                weight = getattr(layer.retention, name).weight
                weight.copy_(weight.view(4, 16, -1)[:, order].reshape_as(weight))
        with softmax_mixer(student):
            ours = _logprobs(student(IDS), VOCAB)
    assert (ours - _logprobs(teacher(IDS).logits, VOCAB)).abs().max() > 1e-2


def test_a_subset_of_layers_is_that_teacher_without_the_others() -> None:
    teacher = _tiny("llama")
    student, report = retrofit(teacher, IDS, layers=[0, 2])
    assert student.config.n_layers == 2 and report.teacher_layers == [0, 2]
    del teacher.model.layers[1]  # the teacher with only layers 0 and 2
    teacher.config.num_hidden_layers = 2
    with torch.no_grad(), softmax_mixer(student):
        ours = _logprobs(student(IDS), VOCAB)
    torch.testing.assert_close(ours, _logprobs(teacher(IDS, use_cache=False).logits, VOCAB), atol=1e-4, rtol=0)


def test_config_carries_the_teacher_shape_and_epsilons() -> None:
    teacher = _tiny("llama")
    config = student_config_for(teacher)
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.ffn_dim) == (336, 64, 3, 4, 128)
    assert config.layernorm_eps == 1e-5 and config.group_norm_eps == 1e-8 and not config.tie_embeddings
    torch.testing.assert_close(torch.tensor(config.rotary_inv_freq), teacher.model.rotary_emb.inv_freq.float())
    with pytest.raises(RetrofitError, match="teacher's shape"):
        student_config_for(teacher, d_model=32)


def test_gate_fit_brings_retention_closer_to_attention() -> None:
    teacher = _tiny("llama")
    _, report = retrofit(teacher, IDS)
    assert all(after < before for before, after in zip(report.error_random_gate, report.error_fitted_gate))
    assert "student layer" in report.lines()[0] and len(report.lines()) == 4


def test_inverse_swish() -> None:
    values = torch.tensor([-0.25, -0.1, 0.0, 0.3, 1.0, 7.5])
    torch.testing.assert_close(torch.nn.functional.silu(inverse_swish(values)), values, atol=1e-5, rtol=0)
    assert float(inverse_swish(torch.tensor([-5.0]))) == pytest.approx(-1.2785, abs=1e-3)  # clamped to swish's minimum


def test_unsupported_teachers_are_refused_by_name() -> None:
    with pytest.raises(RetrofitError, match="q_norm"):
        retrofit(_tiny("qwen3"), IDS)
    with pytest.raises(RetrofitError, match="hidden_act 'gelu'"):
        retrofit(_tiny("llama", hidden_act="gelu"), IDS)
    with pytest.raises(RetrofitError, match=r"heads x head_dim = 4 x 32 != hidden_size 64"):
        retrofit(_tiny("llama", head_dim=32), IDS)
    with pytest.raises(RetrofitError, match="no .model.layers"):
        retrofit(torch.nn.Linear(2, 2), IDS)


@pytest.mark.parametrize("layers, message", [([0, 5], r"\[5\] outside the teacher's 3 layers"), ([], "empty"),
                                             ([2, 1], "strictly increasing"), ([1, 1], "strictly increasing")])
def test_bad_layer_lists_are_refused(layers, message) -> None:
    with pytest.raises(RetrofitError, match=message):
        resolve_layers(layers, 3)


def test_recurrent_equals_parallel_on_a_retrofitted_student() -> None:
    """The small group-norm epsilon keeps the recurrent path on the parallel one with teacher-sized q.k."""
    student, _ = retrofit(_tiny("llama"), IDS)
    assert recurrent_parallel_difference(student.eval(), IDS[0]) <= 1e-3


def test_capture_attention_reads_the_teacher_layers() -> None:
    teacher = _tiny("llama")
    taps = capture_attention(teacher, IDS, [0, 2], with_heads=True)
    assert [tuple(t.inputs.shape) for t in taps] == [(2, 40, 64)] * 2 and taps[1].heads.shape == (2, 40, 64)
    with torch.no_grad():
        normed = teacher.model.layers[0].input_layernorm(teacher.model.embed_tokens(IDS))
    torch.testing.assert_close(taps[0].inputs, normed)


# ----------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_teacher(tiny_engine) -> DirectTeacher:
    return DirectTeacher(tiny_engine, k=16, temperature=1.0)


def retrofit_config(output_dir: Path, shards: Path, **overrides):
    settings = {"output_dir": str(output_dir), "train_data": str(shards), "device": "cpu", "student_init": "teacher",
                "attention_transfer_steps": 6, "attention_transfer_warmup": 1, "attention_transfer_lr": 3e-3,
                "max_seq_length": 32, "batch_size": 4, "max_steps": 10, "warmup_steps": 1, "log_every": 1,
                "eval_every": 5, "eval_batches": 2, "save_every": 4, "keep_last": 5, "lr": 1e-3, "weight_decay": 0.0,
                "wandb_mode": "disabled", "progress": False, "teacher_topk": 16, "saddle_detection": False, **overrides}
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in settings.items()])


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage1_trains_only_the_retention_then_stage2_everything(tmp_path, tiny_shards, tiny_teacher) -> None:
    run = tmp_path / "run"
    summary = train(retrofit_config(run, tiny_shards), teacher=tiny_teacher)
    records = _records(run)
    steps = {r["step"]: r for r in records if "train/total" in r and "train/stage" in r}
    assert [steps[s]["train/stage"] for s in range(1, 11)] == [1] * 6 + [2] * 4
    assert "transfer/layer_00" in steps[1] and "transfer/layer_01" in steps[6] and "transfer/layer_00" not in steps[7]
    assert steps[6]["train/total"] < steps[1]["train/total"]  # the retention approaches the attention
    assert any(r.get("event") == "retrofit" for r in records) and any(r.get("event") == "stage_2" for r in records)
    # the stage boundary is always checkpointed; stage 1 changed only retention weights
    start = RetNetStudent.load(run / "checkpoints" / "step-00000004" / "model")
    boundary = RetNetStudent.load(run / "checkpoints" / "step-00000006" / "model")
    final = RetNetStudent.load(Path(summary["checkpoint"]) / "model")
    teacher_lm = tiny_teacher.engine.model
    torch.testing.assert_close(boundary.embed_tokens.weight, teacher_lm.model.embed_tokens.weight)
    torch.testing.assert_close(boundary.decoder.layers[1].ffn.fc1.weight, teacher_lm.model.layers[1].mlp.gate_proj.weight)
    assert not torch.equal(boundary.decoder.layers[0].retention.q_proj.weight, start.decoder.layers[0].retention.q_proj.weight)
    assert not torch.equal(final.embed_tokens.weight, boundary.embed_tokens.weight)  # stage 2 trains everything
    assert not torch.equal(final.decoder.layers[1].ffn.fc1.weight, boundary.decoder.layers[1].ffn.fc1.weight)
    # after training, on real text: the recurrent path the generator uses is the parallel one
    from student_trainer.data.shards import PretokenizedShardDataset

    row = PretokenizedShardDataset(tiny_shards, "val")[0]
    assert recurrent_parallel_difference(final.eval(), row["input_ids"][: row["length"]]) <= 1e-3


@pytest.mark.parametrize("stop", [3, 6, 8])  # inside stage 1, at the boundary, inside stage 2
def test_resume_across_the_stages_gives_the_same_losses(tmp_path, tiny_shards, tiny_teacher, stop) -> None:
    train(retrofit_config(tmp_path / "straight", tiny_shards), teacher=tiny_teacher)
    train(retrofit_config(tmp_path / "resumed", tiny_shards, stop_at_step=stop), teacher=tiny_teacher)
    train(retrofit_config(tmp_path / "resumed", tiny_shards), teacher=tiny_teacher)

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["train/total"] for r in _records(run) if "train/total" in r and "train/stage" in r}

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("overrides, message", [
    ({"model_variant": "tiny"}, "contradicts student_init=teacher"),
    ({"student_vocab_size": 400}, "student_vocab_size cannot be set"),
    ({"student_init": "random", "model_variant": "tiny"}, "attention_transfer_steps needs student_init=teacher"),
    ({"student_init": "teacher_shape"}, "attention_transfer_steps needs student_init=teacher"),
    ({"student_init": "random", "model_variant": "tiny", "attention_transfer_steps": 0, "retrofit_layers": [0]},
     "retrofit_layers needs student_init=teacher"),
    ({"attention_transfer_steps": 10}, r"attention_transfer_steps must be in \[0, max_steps=10\)"),
    ({"attention_transfer_warmup": 6}, "attention_transfer_warmup"),
    ({"retrofit_layers": ["a"]}, "list of teacher layer indices"),
])
def test_bad_retrofit_settings_are_refused_before_training(tmp_path, tiny_shards, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        retrofit_config(tmp_path / "run", tiny_shards, **overrides)
    assert not (tmp_path / "run").exists()


def test_teacher_shape_is_the_retrofit_without_the_weights(tmp_path, tiny_shards, tiny_teacher) -> None:
    summary = train(retrofit_config(tmp_path / "run", tiny_shards, student_init="teacher_shape", attention_transfer_steps=0,
                                    max_steps=2), teacher=tiny_teacher)
    student = RetNetStudent.load(Path(summary["checkpoint"]) / "model")
    assert student.config == student_config_for(tiny_teacher.engine.model, max_seq_len=32)
    assert not torch.allclose(student.embed_tokens.weight, tiny_teacher.engine.model.model.embed_tokens.weight, atol=0.01)


def test_layers_outside_the_teacher_fail_before_anything_is_written(tmp_path, tiny_shards, tiny_teacher) -> None:
    run = tmp_path / "run"
    with pytest.raises(RetrofitError, match=r"\[7\] outside the teacher's 2 layers"):
        train(retrofit_config(run, tiny_shards, retrofit_layers=[0, 7]), teacher=tiny_teacher)
    assert not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_the_embedded_teacher_maps_exactly() -> None:
    teacher, tokenizer, _ = load_teacher_lm("smollm2-135m-instruct", "~/.cache/retnet-distill/models")
    ids = torch.tensor([tokenizer("Python's `pass` statement does nothing; it is a placeholder where a statement "
                                  "is required but no code needs to run.")["input_ids"]])
    student, report = retrofit(teacher, ids)
    # the teacher's 134.5M weights, k/v expanded from 3 KV heads to 9, plus the g_proj gates
    assert student.num_parameters() == sum(p.numel() for p in teacher.parameters()) + 30 * (2 * 576 * (576 - 192) + 576 * 576)
    assert student.num_parameters() == 157_739_328
    with torch.no_grad(), softmax_mixer(student):
        ours = _logprobs(student(ids), 49_152)
    torch.testing.assert_close(ours, _logprobs(teacher(ids).logits, 49_152), atol=1e-4, rtol=0)
    assert max(layer_errors(student, teacher, ids, report.teacher_layers)) < 2.0
