"""The RetNet student: parallel / chunkwise / recurrent agreement, prefill, generation, persistence,
parameter counts, the Muon/AdamW split, bf16 autocast, config validation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torchscale.component.rms_norm import RMSNorm

from student_trainer.model.student import (
    EMBED_KEY,
    HEAD_KEY,
    PRESET_PARAM_COUNTS,
    RetNetStudent,
    StudentConfig,
    count_parameters,
    split_params_for_muon,
)
from tests.conftest import tiny_student

VOCAB = 320
SEQ = 40  # > 2 chunks of the tiny preset's 16, and not a multiple of it (exercises chunk padding)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> RetNetStudent:
    return tiny_student(VOCAB, **overrides)


@pytest.fixture(scope="module")
def trained() -> RetNetStudent:
    """The tiny model after a few AdamW steps on random tokens, so that weights are not at init."""
    model = tiny()
    initial = model.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(15):
        ids = torch.randint(0, VOCAB, (4, 65), generator=generator)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (model.embed_tokens.weight - initial).abs().max() > 1e-2
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def recurrent_logits(model: RetNetStudent, ids: torch.Tensor) -> torch.Tensor:
    """Token by token through ``step`` from an empty state: [B, L, V]."""
    state, outputs = model.new_state(), []
    for t in range(ids.size(1)):
        logits, state = model.step(ids[:, t], state)
        outputs.append(logits)
    return torch.stack(outputs, dim=1)


def set_norm_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.eps = eps


@torch.no_grad()
def test_parallel_recurrent_chunkwise_agree(trained: RetNetStudent) -> None:
    """One retention function, three paths: they agree to float noise at the default group-norm
    epsilon (TorchScale's own chunkwise kernel was 0.19 nats off the parallel path on such weights)."""
    ids = random_ids(2, SEQ)
    parallel = trained(ids, chunkwise=False)
    assert parallel.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(recurrent_logits(trained, ids), parallel, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trained(ids, chunkwise=True), parallel, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_retention_is_the_recurrent_form_in_every_path() -> None:
    """``o_n = sum_{m<=n} g^(n-m) (q_n . k_m) v_m / sqrt(S_n)``, ``S_n = sum_{j<=n} g^j``, per head,
    computed here term by term, against the parallel and chunkwise kernels (no row normaliser: rows
    whose |q k| sums are tiny, cancelling or huge are all left as the formula says)."""
    model = tiny()
    retention = model.decoder.layers[0].retention
    heads, dk, dv, length = retention.num_heads, retention.key_dim, retention.head_dim, 21
    generator = torch.Generator().manual_seed(3)
    scales = torch.tensor([1e-3, 1.0, 30.0, 1e3])[:heads].view(1, heads, 1, 1)  # a range of |q.k| per head
    qr = torch.randn(1, heads, length, dk, generator=generator) * scales
    kr = torch.randn(1, heads, length, dk, generator=generator)
    v = torch.randn(1, length, heads * dv, generator=generator)
    rel_pos = model.decoder.retnet_rel_pos
    gamma = rel_pos.decay.double().exp()  # [H]
    vr = v.double().view(1, length, heads, dv).transpose(1, 2)
    expected = torch.zeros(1, heads, length, dv, dtype=torch.float64)
    for n in range(length):
        weights = gamma[:, None] ** (n - torch.arange(n + 1, dtype=torch.float64))[None, :]  # [H, n+1]
        terms = (qr[:, :, n:n + 1].double() @ kr[:, :, : n + 1].double().transpose(-1, -2))[:, :, 0] * weights
        expected[:, :, n] = (terms[..., None] * vr[:, :, : n + 1]).sum(2) / weights.sum(-1, keepdim=True).sqrt()
    expected = expected.transpose(1, 2).float()  # [1, L, H, dv]
    _, mask = rel_pos(length)
    torch.testing.assert_close(retention.parallel_forward(qr, kr, v, mask), expected, rtol=1e-4, atol=1e-4)
    for chunk in (1, 4, 16, 64):
        rel_pos.recurrent_chunk_size = chunk
        _, chunks = rel_pos(length, chunkwise_recurrent=True)
        torch.testing.assert_close(retention.chunk_recurrent_forward(qr, kr, v, chunks), expected, rtol=1e-4, atol=1e-4)


def test_init_and_activation() -> None:
    model = tiny()
    std = model.embed_tokens.weight.std().item()
    assert abs(std - 64**-0.5) < 0.01, std  # N(0, d^-0.5), not nn.Embedding's N(0, 1)
    assert model.decoder.layers[0].ffn.activation_fn is F.silu  # SwiGLU
    ids = random_ids(2, 32, seed=9)
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0  # near log V (N(0, 1): ~20)


@pytest.mark.parametrize("prompt_len", [1, 25])
@torch.no_grad()
def test_prefill_then_step_matches_parallel(trained: RetNetStudent, prompt_len: int) -> None:
    ids = random_ids(3, SEQ, seed=3)
    parallel = trained(ids)
    # A model configured for chunkwise training must still prefill and decode correctly.
    chunky = RetNetStudent(StudentConfig.from_preset("tiny", vocab_size=VOCAB, chunkwise_recurrent=True)).eval()
    chunky.load_state_dict(trained.state_dict())
    for model in (trained, chunky):
        logits, state = model.prefill(ids[:, :prompt_len])
        assert state.position == prompt_len
        outputs = [logits]
        for t in range(prompt_len, SEQ):
            logits, state = model.step(ids[:, t], state)
            outputs.append(logits)
        torch.testing.assert_close(torch.stack(outputs, dim=1), parallel[:, prompt_len - 1:], atol=1e-4, rtol=1e-4)

    # The prefilled state is the one token-by-token decoding builds (TorchScale's kv and scale bookkeeping).
    _, prefilled = trained.prefill(ids[:, :prompt_len])
    stepped = trained.new_state()
    for t in range(prompt_len):
        _, stepped = trained.step(ids[:, t], stepped)
    for mine, reference in zip(prefilled.layers, stepped.layers):
        torch.testing.assert_close(mine["scale"], reference["scale"], atol=0, rtol=1e-5)
        torch.testing.assert_close(mine["prev_key_value"], reference["prev_key_value"], atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_prompts_of_different_lengths_decode_together_as_each_alone(trained: RetNetStudent) -> None:
    """A ragged prefill (one position per row) then batched steps give each row the numbers of its own
    prefill and steps, and the parallel forward's, although the rows sit at different positions."""
    ids = random_ids(4, SEQ, seed=6)
    lengths = torch.tensor([5, 17, 1, 17])
    padded = ids.clone()
    for row, n in enumerate(lengths.tolist()):
        padded[row, n:] = 0  # padding must not matter
    logits, state = trained.prefill(padded, lengths=lengths)
    assert state.position.tolist() == lengths.tolist()
    assert state.layers[0]["scale"].shape == (4, trained.config.n_heads)
    outputs = [logits]
    for t in range(6):  # every row feeds its own next token, at its own position
        tokens = ids[torch.arange(4), lengths + t]
        logits, state = trained.step(tokens, state)
        outputs.append(logits)
    ragged = torch.stack(outputs, dim=1)  # [B, 7, V]
    parallel = trained(ids[:, :lengths.max() + 6])
    for row, n in enumerate(lengths.tolist()):
        alone_logits, alone = trained.prefill(ids[row:row + 1, :n])
        alone_outputs = [alone_logits]
        for t in range(6):
            alone_logits, alone = trained.step(ids[row:row + 1, n + t], alone)
            alone_outputs.append(alone_logits)
        torch.testing.assert_close(ragged[row], torch.cat(alone_outputs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ragged[row], parallel[row, n - 1:n + 6], atol=1e-4, rtol=1e-4)


def test_a_ragged_prefill_refuses_bad_lengths_and_a_prefill_after_it(trained: RetNetStudent) -> None:
    ids = random_ids(2, 8)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 8\]"):
        trained.prefill(ids, lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"lengths must be a \[B\] = \[2\] tensor"):
        trained.prefill(ids, lengths=torch.tensor([3]))
    _, state = trained.prefill(ids, lengths=torch.tensor([8, 3]))
    with pytest.raises(ValueError, match="continue it token by token with step"):
        trained.prefill(ids, state=state)
    with pytest.raises(ValueError, match="starts from an empty state"):
        trained.prefill(ids, state=state, lengths=torch.tensor([8, 3]))


@torch.no_grad()
def test_step_does_not_modify_the_given_state(trained: RetNetStudent) -> None:
    ids = random_ids(2, 10, seed=4)
    _, state = trained.prefill(ids)
    before = [dict(layer) for layer in state.layers]
    first, _ = trained.step(ids[:, 0], state)
    again, _ = trained.step(ids[:, 0], state)  # branching from the same state twice gives the same result
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert state.position == 10
    assert all(a["prev_key_value"] is b["prev_key_value"] for a, b in zip(before, state.layers))


@torch.no_grad()
def test_greedy_generation_matches_parallel_argmax(trained: RetNetStudent) -> None:
    prompt = random_ids(2, 10, seed=5)
    generated = torch.stack(list(trained.generate(prompt, max_new_tokens=12, greedy=True)), dim=1)
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, trained(ids)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids[:, 10:])
    assert generated.unique().numel() > 1  # not a degenerate constant continuation

    # Sampling: reproducible with a seeded generator; top_p -> 0 keeps only the argmax.
    def sample(**kwargs) -> torch.Tensor:
        tokens = trained.generate(prompt, 12, generator=torch.Generator().manual_seed(7), **kwargs)
        return torch.stack(list(tokens), dim=1)

    assert torch.equal(sample(temperature=1.0), sample(temperature=1.0))
    assert not torch.equal(sample(temperature=1.0), generated)
    assert torch.equal(sample(temperature=1.0, top_p=1e-6), generated)

    # eos: a row that produced it keeps yielding it, and generation stops once all rows have.
    eos = int(generated[0, 2])
    with_eos = torch.stack(list(trained.generate(prompt, 12, greedy=True, eos_id=eos)), dim=1)
    first = int((generated[0] == eos).nonzero()[0])
    assert torch.equal(with_eos[0, : first + 1], generated[0, : first + 1])
    assert (with_eos[0, first:] == eos).all()


def test_save_load_roundtrip(trained: RetNetStudent, tmp_path) -> None:
    target = tmp_path / "student"
    trained.save(target)
    trained.save(target)  # overwriting an existing checkpoint works and leaves no temp dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert EMBED_KEY in keys and HEAD_KEY not in keys  # the tied weight is stored once
    assert not any("retnet_rel_pos" in key for key in keys)  # decay tables follow from the config
    meta = json.loads((target / "config.json").read_text())
    assert meta["config"] == trained.config.to_dict() and meta["num_parameters"] == trained.num_parameters()

    loaded = RetNetStudent.load(target).eval()
    assert loaded.output_projection.weight is loaded.embed_tokens.weight
    assert loaded.num_parameters() == trained.num_parameters()
    ids = random_ids(2, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), trained(ids), atol=0, rtol=0)

    untied = tiny(tie_embeddings=False).eval()
    untied.save(tmp_path / "untied")
    reloaded = RetNetStudent.load(tmp_path / "untied").eval()
    assert reloaded.output_projection.weight is not reloaded.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), untied(ids), atol=0, rtol=0)


def test_load_rejects_foreign_directories(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        RetNetStudent.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="retnet-student"):
        RetNetStudent.load(tmp_path)


@pytest.mark.parametrize("preset, nominal", [("350M", 350e6), ("500M", 500e6)])
def test_preset_parameter_counts(preset: str, nominal: float) -> None:
    config = StudentConfig.from_preset(preset)
    assert config.vocab_size == 128_256 and config.tie_embeddings
    with torch.device("meta"):  # no memory for the weights
        model = RetNetStudent(config)
    assert model.output_projection.weight is model.embed_tokens.weight
    assert model.num_parameters() == PRESET_PARAM_COUNTS[preset] == count_parameters(config)
    assert abs(model.num_parameters() - nominal) / nominal < 0.01
    assert tiny().num_parameters() == PRESET_PARAM_COUNTS["tiny"] == count_parameters(tiny().config)


def test_muon_adamw_split(trained: RetNetStudent) -> None:
    muon, adamw = split_params_for_muon(trained)
    muon_names, adamw_names = [n for n, _ in muon], [n for n, _ in adamw]
    expected = [f"decoder.layers.{i}.retention.{m}.weight" for i in range(2)
                for m in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj")]
    expected += [f"decoder.layers.{i}.ffn.{m}.weight" for i in range(2) for m in ("fc1", "fc2", "gate")]
    assert sorted(muon_names) == sorted(expected)
    assert all(p.ndim == 2 for _, p in muon)
    assert EMBED_KEY in adamw_names and HEAD_KEY not in adamw_names + muon_names  # tied head once
    norms = [n for n in adamw_names if "norm" in n]
    expected_norms = [f"decoder.layers.{i}.{k}_layer_norm.weight" for i in range(2) for k in ("retention", "final")]
    assert sorted(norms) == sorted(expected_norms + ["decoder.layer_norm.weight"])
    assert set(adamw_names) == {EMBED_KEY, *norms}  # nothing else (the student has no biases)
    every = {id(p) for p in trained.parameters()}
    assert {id(p) for _, p in muon} | {id(p) for _, p in adamw} == every and len(muon) + len(adamw) == len(every)
    # Wrapped models (DDP's "module." prefix) split the same way, and torch's Muon accepts the matrices.
    wrapped_muon, _ = split_params_for_muon(nn.ModuleDict({"module": trained}))
    assert [p for _, p in wrapped_muon] == [p for _, p in muon]
    torch.optim.Muon([p for _, p in muon], lr=1e-3, adjust_lr_fn="match_rms_adamw")
    # An untied head is a 2-D matrix outside the blocks: AdamW, not Muon.
    _, untied_adamw = split_params_for_muon(tiny(tie_embeddings=False))
    assert HEAD_KEY in [n for n, _ in untied_adamw]


@pytest.mark.parametrize("chunkwise", [False, True])
def test_bf16_autocast_is_finite_and_keeps_tables_fp32(chunkwise: bool) -> None:
    model = tiny()
    rel_pos = model.decoder.retnet_rel_pos
    decay_fp32 = rel_pos.decay.clone()
    table_dtypes = []
    rel_pos.register_forward_hook(
        lambda _m, _args, out: table_dtypes.extend(t.dtype for t in _flatten(out))
    )
    ids = random_ids(2, 384, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, chunkwise=chunkwise)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert table_dtypes and set(table_dtypes) == {torch.float32}

    # Casting the model keeps the tables fp32 and exact (bf16 would round 1 - 2^-8 to 1.0).
    model.to(torch.bfloat16)
    assert rel_pos.decay.dtype == rel_pos.angle.dtype == torch.float32
    torch.testing.assert_close(rel_pos.decay, decay_fp32, atol=0, rtol=0)
    assert not any("retnet_rel_pos" in key for key in model.state_dict())
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, :32]).float()).all()


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):  # the chunkwise path's tables
        return _flatten([getattr(value, f.name) for f in dataclasses.fields(value)])
    if isinstance(value, int):
        return []
    return [t for item in value for t in _flatten(item)]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    ids = random_ids(2, 24, seed=8)
    grads = []
    for checkpointing in (False, True):
        model = tiny(gradient_checkpointing=checkpointing).train()
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=66), "d_model=66 must be divisible by n_heads=4"),
        (dict(value_dim=130), "value_dim=130 must be divisible by n_heads=4"),
        (dict(d_model=12), "must be even"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_bad_config_raises_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudentConfig.from_preset("tiny", **overrides)


def test_bad_inputs_raise_clear_errors(trained: RetNetStudent) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        StudentConfig.from_dict({**trained.config.to_dict(), "d_modle": 64})
    with pytest.raises(ValueError, match="unknown student preset|Unknown student preset"):
        StudentConfig.from_preset("7B")
    with pytest.raises(ValueError, match=r"shape \[B, L\]"):
        trained(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
        trained.prefill(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="greedy=True"):
        next(trained.generate(torch.tensor([[1, 2]]), 3, temperature=0.0))
