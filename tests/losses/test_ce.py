"""Chunked cross-entropy equals F.cross_entropy over the full logits, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral_train.losses.ce import chunked_cross_entropy

N, H, V = 29, 16, 50  # 29 tokens: no chunk size below divides it


def _data(seed: int = 0, ignore_fraction: float = 0.3, shape=(N,)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    labels = torch.randint(0, V, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_fraction] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels, reduction):
    logits = hidden.reshape(-1, H) @ weight.T
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction=reduction)


def _value_and_grads(fn, hidden, weight, labels, scale=1.0):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = fn(hidden, weight, labels)
    (scale * loss).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 1000])
def test_value_and_gradients_match_full_logits(reduction, chunk_size):
    hidden, weight, labels = _data()
    assert (labels == -100).any() and (labels != -100).any()
    got = _value_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size, reduction), hidden, weight, labels)
    expected = _value_and_grads(lambda h, w, y: _reference(h, w, y, reduction), hidden, weight, labels)
    for what, g, e in zip(("loss", "d/d hidden", "d/d weight"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} (chunk {chunk_size}): {m}")


def test_batched_shape_and_upstream_gradient_scale():
    """(B, T, H) input, and a loss scaled before backward (gradient accumulation does this)."""
    hidden, weight, labels = _data(seed=1, shape=(3, 11))
    got = _value_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, 5, "mean"), hidden, weight, labels, scale=0.37)
    expected = _value_and_grads(lambda h, w, y: _reference(h, w, y, "mean"), hidden, weight, labels, scale=0.37)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert got[1].shape == hidden.shape


def test_frozen_head_gives_hidden_gradient_only():
    hidden, weight, labels = _data(seed=2)
    h = hidden.clone().requires_grad_(True)
    chunked_cross_entropy(h, weight, labels, 6).backward()
    h_ref = hidden.clone().requires_grad_(True)
    _reference(h_ref, weight, labels, "mean").backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _ = _data(seed=3)
    labels = torch.full((N,), -100)
    loss, grad_hidden, grad_weight = _value_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, 8), hidden, weight, labels)
    assert float(loss) == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


def test_bf16_is_close_to_fp32_reference():
    hidden, weight, labels = _data(seed=4)
    got = chunked_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, 7)
    assert got.dtype == torch.float32
    expected = _reference(hidden.bfloat16().float(), weight.bfloat16().float(), labels, "mean")
    assert abs(float(got) - float(expected)) < 2e-2 * float(expected)


@pytest.mark.parametrize("bad", [V, -1, -5])
def test_out_of_range_label_rejected(bad):
    hidden, weight, labels = _data(seed=5)
    labels[0] = bad
    with pytest.raises(ValueError, match=str(V)):
        chunked_cross_entropy(hidden, weight, labels, 4)


def test_unknown_reduction_rejected():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(hidden, weight, labels, 4, reduction="none")


@pytest.mark.parametrize("chunk_size", [4, 7, 1000])
def test_bf16_value_and_gradients_match_full_bf16_logits(chunk_size):
    """In bf16 the reference is what a bf16 model computes without chunking: the head matmul in bf16, then
    cross-entropy over the whole (N, V) logits in fp32. The loss agrees to 1e-5. The gradients are bf16,
    so both sides round (ours casts the unscaled softmax - onehot, the reference the mean-scaled one);
    measured against fp32 arithmetic on the same bf16 inputs, ours stays within bf16 rounding of it and
    within 1.5x of the unchunked bf16 computation's own error."""
    hidden, weight, labels = _data(seed=6)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    got = _value_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size, "mean"), h16, w16, labels)
    full = lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)  # noqa: E731
    expected = _value_and_grads(full, h16, w16, labels)
    truth = _value_and_grads(full, h16.float(), w16.float(), labels)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for what, g, e, t in zip(("d/d hidden", "d/d weight"), got[1:], expected[1:], truth[1:]):
        assert g.dtype == torch.bfloat16
        ours, theirs = (g.float() - t).abs().max(), (e.float() - t).abs().max()
        assert ours <= theirs * 1.5 + 1e-6, f"{what}: ours off by {ours:.2e}, unchunked bf16 by {theirs:.2e}"
        assert ours <= 2**-7 * t.abs().max(), f"{what}: ours off by {ours:.2e}, more than bf16 rounding"
