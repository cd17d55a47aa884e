"""Packed rows on CUDA: FlexAttention (and flash-attn's varlen kernel where it is installed) against SDPA with
the dense document mask, forward and gradients; and the model's logits on CUDA against its CPU dense path.
mistral_train/model/attention_backends.py's CPU tests check the arguments through an emulation; here the
kernels themselves run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral_train.model import attention_backends as ab

from tests.cuda._helpers import packed_positions, small_mistral

# flash-attn is optional (an sdist that needs CUDA to build): tested where it imports; gpu_check.sh says which ran
BACKENDS = ["flex"] + (["flash_attn"] if ab.flash_attn_available() else [])
LENGTHS = [[100, 156], [50, 80, 126]]  # two rows of 256 tokens, 2 and 3 documents
H, KV, D = 8, 2, 64


def dense_reference(q, k, v, position_ids, window):
    """SDPA with the (B, 1, T, T) mask: same document, causal, i - j < window."""
    docs = ab.varlen_arguments(position_ids, window).documents
    T = docs.shape[1]
    i = torch.arange(T, device=docs.device)
    mask = (docs[:, :, None] == docs[:, None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def output_and_grads(attend, leaves, g):
    out = attend(*leaves)
    return out, torch.autograd.grad(out, leaves, g.to(out.dtype))


@pytest.mark.parametrize("window", [None, 48], ids=["causal", "window48"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_backend_matches_dense_sdpa(cuda: torch.device, backend: str, window) -> None:
    """Output and q/k/v gradients in bf16 against fp32 SDPA with the dense mask: off by no more than bf16 SDPA
    with the same mask is (~2e-3 relative for the output, ~4e-3 for the gradients on CPU), with a margin."""
    position_ids = packed_positions(LENGTHS).to(cuda)
    B, T = position_ids.shape
    leaves = [torch.randn(B, h, T, D, device=cuda, dtype=torch.bfloat16, requires_grad=True) for h in (H, KV, KV)]
    g = torch.randn(B, H, T, D, device=cuda)
    packed = ab.packed_attention(backend, position_ids, None, window)
    out, grads = output_and_grads(packed.attend, leaves, g)
    dense = lambda q, k, v: dense_reference(q, k, v, position_ids, window)  # noqa: E731
    sdpa_out, sdpa_grads = output_and_grads(dense, leaves, g)
    ref, ref_grads = output_and_grads(dense, [t.detach().float().requires_grad_(True) for t in leaves], g)
    assert rel_error(out, ref) <= 2 * rel_error(sdpa_out, ref) + 1e-3
    for name, got, sdpa, want in zip("qkv", grads, sdpa_grads, ref_grads):
        assert rel_error(got, want) <= 2 * rel_error(sdpa, want) + 2e-3, f"d{name}"


def test_model_on_cuda_takes_the_packed_path_and_matches_its_cpu_logits(cuda: torch.device) -> None:
    model = small_mistral(sliding_window=64)
    position_ids = packed_positions(LENGTHS)
    ids = torch.randint(0, model.config.vocab_size, position_ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, position_ids=position_ids)  # CPU fp32: SDPA with the dense mask
        assert ab.choose_backend(cuda, torch.bfloat16) in ("flash_attn", "flex")
        got = model.to(cuda, torch.bfloat16)(ids.to(cuda), position_ids=position_ids.to(cuda))
    err = float((got.float().cpu() - expected).norm() / expected.norm())
    assert err < 3e-2, f"bf16 packed-path logits off the fp32 dense ones by {err:.3g} (relative)"
