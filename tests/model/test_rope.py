"""Our RoPE against transformers' `MistralRotaryEmbedding` and `apply_rotary_pos_emb`."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

from mistral_train.model.rope import apply_rope, rope_cos_sin


def _hf_rope(head_dim: int, theta: float) -> MistralRotaryEmbedding:
    config = transformers.MistralConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                                        head_dim=head_dim, rope_theta=theta)
    return MistralRotaryEmbedding(config)


def _positions() -> torch.Tensor:
    """(3, 12): from zero, offset, and far out where fp32 angle precision matters."""
    return torch.stack([torch.arange(12), torch.arange(12) + 37, torch.arange(12) * 997 + 100_000])


@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
@pytest.mark.parametrize("head_dim", [8, 16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_match_transformers(theta, head_dim, dtype):
    positions = _positions()
    x = torch.zeros(1, dtype=dtype)
    expected_cos, expected_sin = _hf_rope(head_dim, theta)(x, positions)
    cos, sin = rope_cos_sin(positions, head_dim, theta, dtype)
    assert cos.dtype == dtype and sin.dtype == dtype
    assert cos.shape == expected_cos.shape == (3, 12, head_dim)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
@pytest.mark.parametrize("heads", [1, 4])
def test_apply_matches_transformers(theta, heads):
    head_dim = 16
    positions = _positions()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, 12, head_dim, generator=gen)
    k = torch.randn(3, heads, 12, head_dim, generator=gen)
    cos, sin = _hf_rope(head_dim, theta)(q, positions)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = rope_cos_sin(positions, head_dim, theta, q.dtype)
    torch.testing.assert_close(apply_rope(q, ours_cos, ours_sin), expected_q, rtol=0, atol=1e-5)
    torch.testing.assert_close(apply_rope(k, ours_cos, ours_sin), expected_k, rtol=0, atol=1e-5)


def test_rotation_is_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n: the property RoPE exists for."""
    head_dim = 32
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, head_dim, generator=gen), torch.randn(1, 1, 1, head_dim, generator=gen)

    def score(m: int, n: int) -> float:
        cm, sm = rope_cos_sin(torch.tensor([[m]]), head_dim, 10_000.0, torch.float32)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), head_dim, 10_000.0, torch.float32)
        return float((apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
