"""Rotary position embeddings (RoPE) as pure functions, in transformers' half-split layout."""

from __future__ import annotations

import torch


def rope_inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(head_dim // 2,) fp32 inverse frequencies theta^(-2i/head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions.

    Args:
        position_ids: (B, T) or (T,) integer positions.
    Returns:
        cos, sin: (B, T, head_dim) (or (T, head_dim)) in `dtype`; computed in fp32 so that
        large positions keep their precision under bf16.
    """
    inv_freq = rope_inverse_frequencies(head_dim, theta, position_ids.device)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        angles = position_ids.float()[..., None] * inv_freq  # (..., T, head_dim // 2)
        angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by the angles in cos/sin (B, T, head_dim)."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
