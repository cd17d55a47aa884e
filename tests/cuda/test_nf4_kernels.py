"""bitsandbytes' CUDA NF4 kernels against the fp32 formula: quantize, dequantize, and the 4-bit matmul
(bnb.matmul_4bit's GEMM path and its batch-1 inference GEMV) against x @ dequantized(W).T in fp32; our
NF4Linear (which calls bnb's dequantize kernel on CUDA) forward and input gradient likewise."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from mistral_train.quant import linear as nf4_linear
from mistral_train.quant.linear import NF4Linear
from mistral_train.quant.nf4_format import BLOCKSIZE, quantize_nf4

OUT, IN = 384, 512  # multiples of the 64-value block


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp32."""
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def nf4_layer(cuda: torch.device) -> NF4Linear:
    linear = torch.nn.Linear(IN, OUT, bias=False)
    return NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16, name="w").to(cuda)


def test_our_quantization_is_byte_identical_to_bnb_cuda_kernel(cuda: torch.device) -> None:
    w = torch.randn(OUT, IN)
    ours = quantize_nf4(w, BLOCKSIZE, double_quant=False)
    packed, state = bnbf.quantize_4bit(w.to(cuda), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed.reshape(-1), packed.cpu().reshape(-1))
    torch.testing.assert_close(ours.absmax, state.absmax.cpu())


def test_bnb_dequantize_kernel_equals_our_torch_dequantize(cuda: torch.device) -> None:
    layer = nf4_layer(torch.device("cpu"))
    ours = layer.dequantize(torch.float32)  # our torch code (CPU)
    assert nf4_linear._bitsandbytes() is not None
    layer = layer.to(cuda)
    theirs = layer.dequantize(torch.float32)  # bnb.functional.dequantize_4bit on CUDA (double-quantized absmax)
    assert theirs.is_cuda
    torch.testing.assert_close(theirs.cpu(), ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 256], ids=["gemv-batch1", "gemm"])
def test_bnb_matmul_4bit_matches_dequantized_fp32_matmul(cuda: torch.device, tokens: int) -> None:
    layer = nf4_layer(cuda)
    w32 = layer.dequantize(torch.float32)
    x = torch.randn(1, tokens, IN, device=cuda, dtype=torch.bfloat16)
    expected = x.float() @ w32.T
    with torch.no_grad():  # batch 1 without grad is bnb's inference GEMV kernel
        out = bnb.matmul_4bit(x, layer.weight.t(), quant_state=layer.bnb_quant_state(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert rel_error(out, expected) < 1e-2  # bf16 inputs and output: ~3e-3 expected


def test_nf4_linear_forward_and_input_gradient_on_cuda(cuda: torch.device) -> None:
    layer = nf4_layer(cuda)
    w32 = layer.dequantize(torch.float32)
    x = torch.randn(2, 64, IN, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    x32 = x.detach().float().requires_grad_(True)
    (x32 @ w32.T).backward(g.float())
    assert rel_error(out, x32 @ w32.T) < 1e-2
    assert rel_error(x.grad, x32.grad) < 1e-2
    assert layer.weight.grad is None and not layer.weight.requires_grad  # the packed weight never trains
