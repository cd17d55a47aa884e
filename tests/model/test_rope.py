"""Our RoPE against transformers' `MistralRotaryEmbedding` and `apply_rotary_pos_emb`."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

from mistral_train.model.rope import apply_rope, llama4_query_scale, rope_cos_sin, rope_frequencies


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


# YaRN as transformers computes it (modeling_rope_utils._compute_yarn_parameters, through Ministral 3's rotary
# module): each case moves another field; head_dim 128 so the ramp's ends (beta_fast, beta_slow, truncate) fall
# inside the frequencies.
YARN_CASES = {
    "ministral3_published": dict(factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=1.0),
    "mscale_ratio": dict(factor=4.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=1.3),
    "factor_only": dict(factor=8.0, original_max_position_embeddings=8192),  # attention factor 0.1 ln 8 + 1
    "given_attention_factor": dict(factor=32.0, original_max_position_embeddings=4096, attention_factor=0.9,
                                   beta_fast=16.0, beta_slow=2.0),
    "no_truncate": dict(factor=32.0, original_max_position_embeddings=4096, beta_fast=16.0, beta_slow=2.0,
                        truncate=False),
    "factor_null": dict(factor=None, original_max_position_embeddings=4096),  # max / original positions = 8
}


def _hf_yarn(params: dict, head_dim: int = 128, theta: float = 1e6):
    from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding

    config = transformers.Ministral3Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                                           head_dim=head_dim, max_position_embeddings=32768,
                                           rope_parameters={"rope_type": "yarn", "rope_theta": theta, **params})
    return Ministral3RotaryEmbedding(config)


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_frequencies_and_tables_match_transformers(case):
    params = YARN_CASES[case]
    hf = _hf_yarn(params)
    inv_freq, attention_factor = rope_frequencies(128, 1e6, "yarn", params, max_position_embeddings=32768)
    assert attention_factor == pytest.approx(hf.attention_scaling, abs=1e-12)
    torch.testing.assert_close(inv_freq, hf.inv_freq, rtol=0, atol=0)
    positions = torch.stack([torch.arange(12) * 1500, torch.arange(12) + 20_000])  # past the original length
    expected_cos, expected_sin = hf(torch.zeros(1), positions)
    cos, sin = rope_cos_sin(positions, 128, 1e6, torch.float32, "yarn", params, 32768)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=1e-6)


def test_each_yarn_field_changes_the_frequencies():
    """Not vacuous: every field the cases above move changes the result, so matching transformers tests it."""
    base = YARN_CASES["given_attention_factor"]
    reference = rope_frequencies(128, 1e6, "yarn", base, 32768)
    for key, value in {"factor": 16.0, "original_max_position_embeddings": 8192, "beta_fast": 24.0, "beta_slow": 1.0,
                       "truncate": False, "attention_factor": 1.1}.items():
        inv_freq, factor = rope_frequencies(128, 1e6, "yarn", {**base, key: value}, 32768)
        assert not torch.equal(inv_freq, reference[0]) or factor != reference[1], f"`{key}` changed nothing"
    assert not torch.equal(reference[0], rope_frequencies(128, 1e6)[0]), "YaRN equals the default rotary"


@pytest.mark.parametrize("beta,original", [(0.1, 16384), (0.4, 8)])
def test_llama4_query_scale_matches_transformers(beta, original):
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    positions = torch.stack([torch.arange(40), torch.arange(40) * 997 + 3])
    expected = get_llama_4_attn_scale(positions, beta, original)
    got = llama4_query_scale(positions, beta, original)
    assert got.shape == expected.shape == (2, 1, 40, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    below = positions < original  # 1 below the original length, more past it
    assert bool((got[:, 0, :, 0][below] == 1).all()) and bool((got[:, 0, :, 0][~below] > 1).all())
