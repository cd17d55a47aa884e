"""sequence_logps: per-sequence summed log-probs from chunks equal the full-logits computation."""

import pytest
import torch

from mistral_train.losses.logps import sequence_logps


def _reference(hidden, weight, labels, owner, n):
    logp = torch.log_softmax((hidden.float() @ weight.float().T), dim=-1)  # (B, T, V): the whole thing
    keep = labels != -100
    token = logp[keep].gather(1, labels[keep][:, None]).squeeze(1)
    return torch.zeros(n, dtype=torch.float32).index_add(0, owner[keep], token)


@pytest.mark.parametrize("chunk", [5, 1024])  # 5 does not divide the token count
@pytest.mark.parametrize("packed", [False, True])
def test_values_and_gradients_equal_full_logits(chunk, packed):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 11, 16, 50
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, H, generator=g).mul(0.3).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompts
    labels[1, 8:] = -100  # padding
    if packed:  # two sequences per row: tokens 0-5 and 6-10
        owner = torch.tensor([[2 * b] * 6 + [2 * b + 1] * 5 for b in range(B)])
        owner[1, 8:] = -1
        n = 2 * B
    else:
        owner, n = torch.arange(B)[:, None].expand(B, T), B
    logps, counts = sequence_logps(hidden, weight, labels, owner if packed else None, n, chunk_size=chunk)
    upstream = torch.randn(n, generator=g)  # every sequence weighs differently, as in DPO
    (logps * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    expected = _reference(hidden, weight, labels, owner, n)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)
    keep = labels != -100
    assert counts.tolist() == [int((keep & (owner == s)).sum()) for s in range(n)]


def test_bf16_with_a_frozen_head_is_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 32, generator=g)
    weight = torch.randn(64, 32, generator=g) * 0.2
    labels = torch.randint(0, 64, (2, 9), generator=g)
    full, _ = sequence_logps(hidden, weight, labels)
    h16 = hidden.bfloat16().requires_grad_()
    low, _ = sequence_logps(h16, weight.bfloat16(), labels, chunk_size=4)
    low.sum().backward()
    assert low.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16 and h16.grad.abs().sum() > 0
    torch.testing.assert_close(low, full, atol=0.5, rtol=0.02)


def test_labels_on_padding_and_out_of_range_are_rejected():
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        sequence_logps(hidden, weight, torch.tensor([[1, 2, 10, -100]]))
    with pytest.raises(ValueError, match="sequence_index -1"):
        sequence_logps(hidden, weight, torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 0, 0, -1]]), 1)
