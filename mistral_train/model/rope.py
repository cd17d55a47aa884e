"""Rotary position embeddings (RoPE) as pure functions, in transformers' half-split layout.

Rotary kinds (config.rope_type): "default" (theta^(-2i/d)) and "yarn" (YaRN: low frequencies interpolated by
`factor`, high ones kept, a linear ramp between, and cos/sin scaled by an attention factor), each computed as
transformers' `modeling_rope_utils` computes it. Also the llama-4 query scale by position (Ministral 3).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from mistral_train.model.fused import rotate

# rope_parameters keys YaRN reads (transformers' _compute_yarn_parameters); `max_position_embeddings` is
# written there by Ministral 3's config and read by nobody.
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate", "max_position_embeddings")


def rope_inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(head_dim // 2,) fp32 inverse frequencies theta^(-2i/head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (none for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_frequencies(head_dim: int, theta: float, params: dict[str, Any], max_position_embeddings: int,
                     device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and the factor cos/sin are multiplied by.

    Args:
        params: the rope_parameters' YaRN keys (YARN_KEYS); `factor` null means max / original positions.
        max_position_embeddings: the config's, for that null factor.
    Returns:
        ((head_dim // 2,) fp32 inverse frequencies, attention factor).
    """
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # both set and non-zero, as transformers tests them
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32  # `or`: a 0 falls back too, as in transformers
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength makes `rotations` turns over the original context."""
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    extrapolation, interpolation = 1.0 / wavelengths, 1.0 / (factor * wavelengths)  # transformers' roundings
    keep = 1 - ramp  # 1: high frequency, kept; 0: low frequency, interpolated
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_frequencies(head_dim: int, theta: float, rope_type: str = "default", params: Optional[dict[str, Any]] = None,
                     max_position_embeddings: int = 0, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim // 2,), factor on cos/sin) of a rotary kind."""
    if rope_type == "yarn":
        return yarn_frequencies(head_dim, theta, params or {}, max_position_embeddings, device)
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not computed here (default, yarn)")
    return rope_inverse_frequencies(head_dim, theta, device), 1.0


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, rope_type: str = "default",
    params: Optional[dict[str, Any]] = None, max_position_embeddings: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions.

    Args:
        position_ids: (B, T) or (T,) integer positions.
        rope_type, params, max_position_embeddings: the rotary kind and its parameters (rope_frequencies).
    Returns:
        cos, sin: (B, T, head_dim) (or (T, head_dim)) in `dtype`; computed in fp32 so that
        large positions keep their precision under bf16.
    """
    inv_freq, scale = rope_frequencies(head_dim, theta, rope_type, params, max_position_embeddings, position_ids.device)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        angles = position_ids.float()[..., None] * inv_freq  # (..., T, head_dim // 2)
        angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim)
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def llama4_query_scale(position_ids: torch.Tensor, beta: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Ministral 3's factor on the rotated queries: 1 + beta * ln(1 + floor(position / original)), so attention
    stays sharp past the pretraining context (1 below it).

    Args:
        position_ids: (B, T).
    Returns:
        (B, 1, T, 1) fp32, to broadcast over heads and head_dim.
    """
    scale = 1 + beta * torch.log(1 + torch.floor(position_ids / original_max_position_embeddings))
    return scale[:, None, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by the angles in cos/sin (B, T, head_dim): x cos + rotate_half(x) sin,
    through model/fused.py's `rotate` (bitwise the same; keeps only cos/sin for backward)."""
    return rotate(x, cos.unsqueeze(-3), sin.unsqueeze(-3))  # broadcast over heads
