"""Multi-head latent attention (MLA, DeepSeek-V2) as transformers' Mistral4 computes it (`attention_kind: latent`).

Queries come through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj, or one q_proj when q_lora_rank is
null); keys and values through one shared latent: kv_a_proj_with_mqa gives a `kv_lora_rank` latent (normed) and one
`qk_rope_head_dim` rotary key shared by every head, and kv_b_proj expands the latent into each head's non-rotary key
(`qk_nope_head_dim`) and value (`v_head_dim`). Only the rope part rotates, in the interleaved-pair layout when
`rope_interleave` (transformers' apply_rotary_pos_emb_interleave: pairs (2i, 2i+1) out as halves). The softmax
scale is qk_head_dim^-1/2 times YaRN's mscale(factor, mscale_all_dim)^2, and the whole query takes the llama-4
scale by position.

The KV cache holds what the latent is before expansion, per token: the normed latent and the rotated shared key
(kv_lora_rank + qk_rope_head_dim numbers, not n_heads * (qk_head_dim + v_head_dim)); kv_b_proj re-expands it
every step. Parameter names are transformers' (`self_attn.q_a_proj.weight`, `self_attn.kv_b_proj.weight`, ...).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistral_train.model.attention import AttentionInputs
from mistral_train.model.rope import _yarn_mscale, apply_rope

# transformers builds q_a_layernorm and kv_a_layernorm with Mistral4RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, heads, T, d) by angle i; the result is laid out as halves
    (rotated evens, then rotated odds), as transformers returns it. cos/sin (B, T, d) hold each angle twice."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(-3), sin[..., :half].unsqueeze(-3)  # (B, 1, T, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def softmax_scale(config) -> float:
    """qk_head_dim^-1/2, times mscale^2 with YaRN's mscale(factor, mscale_all_dim) (transformers' yarn_apply_mscale:
    MLA scales the non-rotary dimensions' logits too)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    mscale_all_dim = config.rope_options.get("mscale_all_dim", 0)
    if config.rope_type != "default" and mscale_all_dim:
        mscale = _yarn_mscale(config.rope_options["factor"], mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


class LatentAttention(nn.Module):
    """Mistral 4's attention; called like blocks.Attention: (B, T, H) and the forward's AttentionInputs -> (B, T, H).

    Args:
        config: a MistralConfig with the latent fields (q_lora_rank, kv_lora_rank, qk_rope_head_dim, ...).
        layer_index: this layer's slot in the KV cache.
        norm: the RMSNorm class (blocks.py's), built as norm(dim, eps).
    """

    def __init__(self, config, layer_index: int, norm: Callable[[int, float], nn.Module]) -> None:
        super().__init__()
        self.window = None  # every earlier token: mistral4 has no sliding window (checked in model_types.py)
        self.layer_index, self.n_heads = layer_index, config.num_attention_heads
        self.rank, self.nope, self.rope, self.v_dim = (config.kv_lora_rank, config.qk_nope_head_dim,
                                                      config.qk_rope_head_dim, config.v_head_dim)
        self.interleaved, self.dropout, self.scale = config.rope_interleave, config.attention_dropout, softmax_scale(config)
        H, qk = config.hidden_size, self.nope + self.rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, config.q_lora_rank, bias=False)
            self.q_a_layernorm = norm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = norm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, H, bias=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_interleaved_rope(x, cos, sin) if self.interleaved else apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope).transpose(1, 2)  # (B, n_heads, T, qk_head_dim)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, T, kv_lora_rank): one "head", as the cache stores it
        q_rot, k_rot = self._rotate(q_rot, inputs.cos, inputs.sin), self._rotate(k_rot[:, None], inputs.cos, inputs.sin)
        if inputs.cache is not None:  # the compressed latent and shared rotary key go in; all cached tokens come out
            latent, k_rot = inputs.cache.update(self.layer_index, latent, k_rot)
        q = torch.cat((q_nope, q_rot), dim=-1)
        if inputs.query_scale is not None:
            q = q * inputs.query_scale.to(q.dtype)
        Tk = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, Tk, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, n_heads, Tk, nope), (B, n_heads, Tk, v_head_dim)
        k = torch.cat((k_nope, k_rot.expand(-1, self.n_heads, -1, -1)), dim=-1)  # (B, n_heads, Tk, qk_head_dim)
        dropout = self.dropout if self.training else 0.0
        if inputs.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, dropout_p=dropout, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))  # out: (B, n_heads, T, v)
