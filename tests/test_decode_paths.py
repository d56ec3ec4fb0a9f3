"""The decoding fast paths: the few-rows linear (decode_linear.py), stepping with ``overwrite=True``
(the recurrent state updated in place), and the inverse-CDF sampler behind ``sample_next_token``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.model import decode_linear
from student_trainer.model.decode_linear import DecodeLinear, linear
from student_trainer.model.student import RetNetStudent, sample_next_token
from tests.conftest import tiny_student

VOCAB = 320

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(3,), (1, 24), (4, 1, 24), (2, 2, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_is_f_linear(shape: tuple[int, ...], bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    d_in = shape[-1] if len(shape) > 1 else 3
    x = torch.randn(*shape[:-1], d_in, generator=generator)
    weight = torch.randn(40, d_in, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    with torch.no_grad():
        assert decode_linear._takes_other_orientation(x, weight)  # the case under test is the other path
        got = linear(x, weight, b)
    expected = F.linear(x, weight, b)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads, d_out", [(2, 40), (4, 40), (3, 40), (2, 41)])
def test_few_rows_linear_split_over_threads_is_f_linear(threads: int, d_out: int) -> None:
    """The product as a batch of one block of W's rows per thread; a W whose rows do not divide into the
    threads, or a non-contiguous one, takes the single product."""
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(4, 24, generator=generator), torch.randn(d_out, 24, generator=generator)
    bias = torch.randn(d_out, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for w in (weight, weight.T.contiguous().T):  # the second is a non-contiguous view
                torch.testing.assert_close(linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_few_rows_linear_keeps_f_linear_where_it_should() -> None:
    """Autograd, autocast, many rows and non-fp32 all go through F.linear itself (bit for bit)."""
    weight = torch.randn(16, 8)
    few, many = torch.randn(2, 8), torch.randn(decode_linear.FEW_ROWS + 1, 8)
    assert not decode_linear._takes_other_orientation(few, weight)  # grad mode is on here
    with torch.no_grad():
        assert not decode_linear._takes_other_orientation(many, weight)
        assert not decode_linear._takes_other_orientation(few.double(), weight.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not decode_linear._takes_other_orientation(few, weight)
    trainable = weight.clone().requires_grad_()
    out = linear(few, trainable)
    assert torch.equal(out, F.linear(few, trainable))
    out.sum().backward()
    assert trainable.grad is not None


def test_the_student_decodes_with_decode_linear_and_saves_the_same_keys(tmp_path) -> None:
    model = tiny_student(VOCAB)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is DecodeLinear for m in linears)
    model.save(tmp_path / "model")
    loaded = RetNetStudent.load(tmp_path / "model")
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(type(m) is DecodeLinear for m in loaded.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def test_overwrite_steps_give_the_same_logits_and_reuse_the_state() -> None:
    model = tiny_student(VOCAB).eval()
    ids = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(3))
    parallel = model(ids)
    _, kept = model.prefill(ids[:, :10])
    _, owned = model.prefill(ids[:, :10])
    for t in range(10, 30):
        buffers = [layer["prev_key_value"] for layer in owned.layers]
        kept_logits, kept = model.step(ids[:, t], kept)
        owned_logits, owned = model.step(ids[:, t], owned, overwrite=True)
        torch.testing.assert_close(owned_logits, kept_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(owned_logits, parallel[:, t], rtol=1e-4, atol=1e-4)
        # the same buffers carry on: nothing new is allocated per layer and token
        assert all(layer["prev_key_value"].data_ptr() == buffer.data_ptr()
                   for layer, buffer in zip(owned.layers, buffers))
        assert all("overwrite" not in layer for layer in owned.layers)


@torch.no_grad()
def test_overwrite_works_after_a_ragged_prefill() -> None:
    model = tiny_student(VOCAB).eval()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([12, 7, 9])
    _, kept = model.prefill(ids, lengths=lengths)
    _, owned = model.prefill(ids, lengths=lengths)
    token = torch.tensor([5, 6, 7])
    for _ in range(4):
        kept_logits, kept = model.step(token, kept)
        owned_logits, owned = model.step(token, owned, overwrite=True)
        torch.testing.assert_close(owned_logits, kept_logits, rtol=0, atol=1e-6)


def test_inverse_cdf_sampling_follows_the_distribution() -> None:
    """Draw frequencies match the probabilities (a 5-sigma band per id), zero-probability ids are never
    drawn, and the same generator state gives the same draws."""
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125])
    logits = probs.clamp_min(1e-45).log()[None].expand(4000, -1).contiguous()
    logits[:, probs == 0] = -torch.inf
    draws = sample_next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(5))
    counts = torch.bincount(draws, minlength=6).double()
    expected = probs.double() * draws.numel()
    sigma = (expected * (1 - probs.double())).sqrt()
    assert counts[probs == 0].sum() == 0
    assert ((counts - expected).abs() <= 5 * sigma + 1e-9).all(), (counts, expected)
    again = sample_next_token(logits, 1.0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(draws, again)


def test_top_p_sampling_keeps_the_nucleus_only() -> None:
    probs = torch.tensor([0.05, 0.6, 0.3, 0.05])
    logits = probs.log()[None].expand(3000, -1).contiguous()
    draws = sample_next_token(logits, 1.0, 0.85, torch.Generator().manual_seed(6))
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and counts[3] == 0  # 0.6 + 0.3 reaches 0.85: the two tails are cut
    share = counts[1].item() / draws.numel()
    assert abs(share - 0.6 / 0.9) < 0.04


def _full_sort_draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """The nucleus draw over a full sort of the vocabulary (what sample_next_token did before its top-k
    candidates): the reference for the same generator state."""
    from student_trainer.model.student import _inverse_cdf_sample

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p, 0.0)
    return order.gather(-1, _inverse_cdf_sample(sorted_probs, generator))[:, 0]


@pytest.mark.parametrize("scale", [6.0, 2.0, 0.0])  # nucleus inside the top 256, inside the top 4,096, the whole vocab
def test_the_nucleus_from_top_k_candidates_draws_what_a_full_sort_draws(scale: float) -> None:
    from student_trainer.model import student as student_module

    logits = scale * torch.randn(4, 49_152, generator=torch.Generator().manual_seed(7))
    probs = torch.softmax(logits / 0.7, dim=-1)
    nucleus = int((probs.sort(descending=True).values.cumsum(-1) < 0.9).sum(-1).max()) + 1
    tried = []
    real_topk = torch.Tensor.topk
    with pytest.MonkeyPatch.context() as patch:  # record which candidate sizes were tried
        patch.setattr(torch.Tensor, "topk", lambda self, k, *a, **kw: tried.append(k) or real_topk(self, k, *a, **kw))
        for seed in range(20):
            got = sample_next_token(logits, 0.7, 0.9, torch.Generator().manual_seed(seed))
            want = _full_sort_draw(logits, 0.7, 0.9, torch.Generator().manual_seed(seed))
            assert torch.equal(got, want), seed
    first = student_module.NUCLEUS_CANDIDATES[0]
    assert (nucleus <= first) == (set(tried) == {first}), (nucleus, set(tried))
