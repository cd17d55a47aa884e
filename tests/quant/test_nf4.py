"""NF4 weights and NF4Linear without any reference library: format, error bounds, autograd.
The model swap and quantized loading/saving are in test_nf4_loading.py; parity with
bitsandbytes/transformers in tests/oracle/test_nf4_bnb_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_train.quant import NF4Linear, dequantize_nf4, quantize_nf4
from mistral_train.quant.nf4_format import NF4_LEVELS

HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2  # worst rounding, in units of absmax


def _weight(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def _brute_force_nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Reference: nearest NF4 level per value over flattened blocks, exact fp32 absmax."""
    flat = w.float().reshape(-1)
    out = torch.empty_like(flat)
    levels = torch.tensor(NF4_LEVELS)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        absmax = block.abs().max()
        nearest = (block[:, None] / absmax - levels[None]).abs().argmin(dim=1)
        out[start : start + blocksize] = levels[nearest] * absmax
    return out.view(w.shape)


@pytest.mark.parametrize("shape", [(128, 64), (64, 256), (32, 96), (33, 65), (7,), (3, 5, 64)])
def test_dequantize_is_nearest_level_and_within_bound(shape):
    """Without double quant every value decodes to its nearest NF4 level times the exact
    block absmax (odd shapes too: blocks run over the flattened tensor); with double quant
    the error stays within half the widest level gap plus the absmax's own 8-bit error."""
    w = _weight(shape)
    single = dequantize_nf4(quantize_nf4(w, double_quant=False))
    reference = _brute_force_nf4(w)
    # Only exact ties between two levels may round differently; random floats have none.
    assert torch.allclose(single, reference, rtol=0, atol=1e-7), (single - reference).abs().max()
    q = quantize_nf4(w)
    double = dequantize_nf4(q)
    flat = F.pad(w.reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    absmax = flat.abs().amax(1)
    absmax_error = (q.block_absmax() - absmax).abs()
    assert (absmax_error <= absmax * 0.01).all(), "8-bit absmax off by more than 1%"
    bound = (absmax * HALF_GAP + absmax_error * 1.0 + 1e-7)[:, None].expand(-1, 64).reshape(-1)[: w.numel()]
    assert ((double - w).abs().reshape(-1) <= bound).all()
    assert double.shape == w.shape


def test_odd_last_dim_is_blocked_over_the_flattened_tensor():
    """bitsandbytes' CPU dequantize is wrong when the last dim is not a multiple of 64
    (STACK-NOTES trap 2); our dequantize of a (32, 96) weight equals that of its flattening."""
    w = _weight((32, 96), seed=3)
    as_matrix = dequantize_nf4(quantize_nf4(w))
    as_vector = dequantize_nf4(quantize_nf4(w.reshape(-1)))
    assert torch.equal(as_matrix.reshape(-1), as_vector)
    layer = NF4Linear(quantize_nf4(w), compute_dtype=torch.float32, name="odd")
    x = torch.randn(4, 96)
    assert torch.equal(layer(x), F.linear(x, as_matrix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_configurable(dtype):
    w = _weight((64, 128), seed=1)
    layer = NF4Linear(quantize_nf4(w), compute_dtype=dtype)
    assert layer.dequantize().dtype == dtype
    assert torch.equal(layer.dequantize(), dequantize_nf4(quantize_nf4(w), torch.float32).to(dtype))
    x = torch.randn(2, 3, 128)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 64)  # back in the input's dtype
    torch.testing.assert_close(out, F.linear(x.to(dtype), layer.dequantize()).float())


def test_bad_inputs_fail_with_names_and_shapes():
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*\(64,\)"):
        NF4Linear(quantize_nf4(_weight((64,))), name="layers.0.q_proj")
    with pytest.raises(ValueError, match=r"w_empty.*\(0, 64\)"):
        quantize_nf4(torch.zeros(0, 64), name="w_empty")
    with pytest.raises(ValueError, match=r"w_nan.*NaN"):
        quantize_nf4(torch.full((64, 64), float("nan")), name="w_nan")
    with pytest.raises(ValueError, match=r"int8"):
        quantize_nf4(torch.zeros(64, 64, dtype=torch.int8))
    layer = NF4Linear(quantize_nf4(_weight((64, 128))), name="mlp.up_proj")
    with pytest.raises(ValueError, match=r"mlp\.up_proj.*96.*128"):
        layer(torch.randn(2, 96))


def test_forward_and_input_gradient_equal_a_dense_linear():
    w, bias = _weight((64, 128), seed=2), torch.randn(64)
    layer = NF4Linear(quantize_nf4(w), bias, compute_dtype=torch.float32)
    dense = layer.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(3, 5, 64)
    layer(x).backward(grad_out)
    F.linear(x_ref, dense, bias).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, grad_out @ dense, rtol=0, atol=1e-6)  # grad_input = grad_out @ W
    assert list(layer.parameters()) == [layer.bias] and not layer.bias.requires_grad
    assert layer.weight.dtype == torch.uint8 and layer.weight.grad is None


def test_gradients_flow_after_an_eval_forward_without_grad():
    """STACK-NOTES trap 1: bitsandbytes repacks a 4-bit weight in an eval forward whose input
    needs no grad, and later training forwards lose their gradients. Ours must not care:
    adapters before and after the NF4 layer (and one beside it, as LoRA) get exactly the
    gradients of a dense twin, and the packed weight is untouched and never has a gradient."""
    torch.manual_seed(0)
    base = NF4Linear(quantize_nf4(_weight((128, 128), seed=4)), compute_dtype=torch.float32)
    dense = nn.Linear(128, 128, bias=False).requires_grad_(False)
    dense.weight.copy_(base.dequantize())
    packed = base.weight.clone()
    base.eval()
    with torch.no_grad():
        base(torch.randn(1, 128))
    base(torch.randn(4, 128))  # no grad needed, grad mode on
    base.train()
    x = torch.randn(4, 128)
    grads = []
    for layer in (base, dense):
        torch.manual_seed(1)
        before, beside, after = nn.Linear(128, 128), nn.Linear(128, 128, bias=False), nn.Linear(128, 8)
        h = before(x)
        after(layer(h) + beside(h)).square().mean().backward()
        grads.append([p.grad for m in (before, beside, after) for p in m.parameters()])
    for ours, reference in zip(*grads):
        assert ours is not None and ours.abs().sum() > 0
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert torch.equal(base.weight, packed) and base.weight.shape == packed.shape
    assert all(b.grad is None and not b.requires_grad for b in base.buffers())


def test_to_dtype_moves_nothing_but_the_bias_and_keeps_fp32_scales():
    layer = NF4Linear(quantize_nf4(_weight((64, 128))), torch.zeros(64), compute_dtype=torch.float32)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.nested_absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), before)


def test_works_without_bitsandbytes(tmp_path):
    """The package never needs bitsandbytes on CPU: hide it and run a quantized forward/backward."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch\n"
        "from mistral_train.quant import NF4Linear, quantize_nf4\n"
        "layer = NF4Linear(quantize_nf4(torch.randn(64, 128)), compute_dtype=torch.float32)\n"
        "x = torch.randn(2, 128, requires_grad=True)\n"
        "layer(x).sum().backward()\n"
        "assert x.grad is not None\n"
        "try:\n    layer.bnb_quant_state()\nexcept ImportError as e:\n    print('ok', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
