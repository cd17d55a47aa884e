"""Autograd functions that keep less for backward than autograd would (the idea of Liger's and unsloth's kernels,
written in plain torch ops): RMSNorm, SwiGLU (with or without its down projection) and RoPE.

Each forward runs the same ops in the same order as the unfused code (blocks.py's RMSNorm before, transformers'
MistralMLP and apply_rotary_pos_emb), so outputs are bitwise equal; each backward is written by hand from what
the function saved. What each keeps, per token, against what autograd keeps for the unfused ops:

    rms_norm          x and rstd (one float per row)        autograd: x, rstd, x * rstd (fp32; twice x.float()
                                                             under 16-bit inputs, plus the 16-bit cast)
    silu_mul          gate and up                            autograd: gate, silu(gate), up
    silu_mul_linear   gate, up and the weight (a Parameter)  autograd: gate, silu(gate), up and the product
                                                             (the down projection's input)
    rotate            cos and sin (shared by every layer)    autograd: the same; the fused one runs fewer
                                                             full-size temporaries in forward and backward

silu(gate) and the product are recomputed in backward: two element-wise passes over (tokens, intermediate), cheap
next to the matmuls around them. Tested against the unfused functions (gradcheck in float64, fp32 and bf16) in
tests/model/test_fused.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _leading_sum(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum t over the dimensions it was broadcast along to meet `like` (a weight or a table): autograd's sum_to_size."""
    return t.sum_to_size(like.shape)


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs (x.float(), as transformers), float64 kept (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # The unfused order exactly: normalise in fp32, cast back to x's dtype, then scale (transformers' order).
        xf = x.to(_norm_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd  # recomputed: n = x * rstd, (..., H) fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = _leading_sum(grad * normed.to(x.dtype), weight).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n)), with rstd = (mean(x^2) + eps)^-1/2.
            dn = (grad * weight).to(x.dtype).to(rstd.dtype)  # through the cast to x.dtype and back, as autograd goes
            grad_x = (rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _silu_mul_grads(ctx, grad, gate, up, 0, 1)


def _silu_mul_grads(ctx, grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_at: int, up_at: int):
    """(d gate, d up) of silu(gate) * up given d(product): autograd's own ops (mul, silu_backward), so bitwise its result."""
    grad_gate = grad_up = None
    if ctx.needs_input_grad[up_at]:
        grad_up = grad * F.silu(gate)
    if ctx.needs_input_grad[gate_at]:
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    return grad_gate, grad_up


class _SiluMulLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)  # not the product: (tokens, intermediate) less
        # .to: autocast's cast of F.linear's input (a no-op otherwise); the weight comes cast already.
        return F.linear((F.silu(gate) * up).to(weight.dtype), weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        grad_weight = grad_product = None
        if ctx.needs_input_grad[2]:
            product = (F.silu(gate) * up).to(weight.dtype)  # recomputed
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(product.reshape(-1, product.shape[-1]))
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_product = grad.matmul(weight).to(gate.dtype)
        grad_gate, grad_up = (None, None) if grad_product is None else _silu_mul_grads(ctx, grad_product, gate, up, 0, 1)
        return grad_gate, grad_up, grad_weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        half = x.shape[-1] // 2
        # x cos + rotate_half(x) sin, half by half into one buffer: (-a) b == -(a b) and c + (-d) == c - d exactly
        # in IEEE arithmetic, so this equals the unfused expression bit for bit without its three full temporaries.
        out = x * cos
        out[..., :half] -= x[..., half:] * sin[..., :half]
        out[..., half:] += x[..., :half] * sin[..., half:]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # The rotation's transpose: d x = grad cos + R^T(grad sin), R^T(g) = (g2, -g1) for R(x) = (-x2, x1).
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half] += grad[..., half:] * sin[..., half:]
        grad_x[..., half:] -= grad[..., :half] * sin[..., :half]
        return grad_x.sum_to_size(ctx.x_shape), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim, normalised in fp32; saves x and rstd only."""
    return _RMSNorm.apply(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (SwiGLU's product); saves gate and up only."""
    return _SiluMul.apply(gate, up)


def silu_mul_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, weight): SwiGLU and its down projection; saves gate, up (and the weight) only.

    Under autocast the weight is cast outside the function (so its gradient flows back through the cast, as
    autograd's would) and the function runs at the cast dtype, as autocast runs F.linear."""
    device = gate.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _SiluMulLinear.apply(gate, up, weight.to(torch.get_autocast_dtype(device)))
    return _SiluMulLinear.apply(gate, up, weight)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin (half-split RoPE), cos/sin broadcast to x; saves cos and sin only.

    Tables that take a gradient (none do in this package) go through the unfused ops, which return it."""
    if cos.requires_grad or sin.requires_grad:
        return x * cos + _rotate_half(x) * sin
    return _Rotate.apply(x, cos, sin)
