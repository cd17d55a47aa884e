"""The decoder block and its parts: RMSNorm, SwiGLU MLP, GQA + sliding-window attention; the `score` head layer.

Parameter names equal transformers' (`self_attn.q_proj.weight`, `mlp.gate_proj.weight`, ...).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mistral_train.model.attention import AttentionInputs, attend
from mistral_train.model.config import MistralConfig
from mistral_train.model.execution import recomputing
from mistral_train.model.fused import rms_norm, silu_mul, silu_mul_linear
from mistral_train.model.latent_attention import LatentAttention
from mistral_train.model.moe import SparseMoE
from mistral_train.model.routed_experts import SharedRoutedMoE
from mistral_train.model.rope import apply_rope

_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: transformers' order, to the last bit; keeps x and rstd only.
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MistralConfig, intermediate_size: Optional[int] = None) -> None:
        super().__init__()
        width = config.intermediate_size if intermediate_size is None else intermediate_size  # shared experts: theirs
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is not F.silu:
            return self.down_proj(self.act(gate) * up)
        if type(self.down_proj) is nn.Linear and self.down_proj.bias is None:
            return silu_mul_linear(gate, up, self.down_proj.weight)  # the product is recomputed, not kept
        return self.down_proj(silu_mul(gate, up))  # LoRA / NF4 down_proj: it keeps the product it is given


# config.mlp_kind -> its module; the experts take their activation from this table
MLPS = {"dense": MLP, "moe": lambda config: SparseMoE(config, _ACTIVATIONS[config.hidden_act]),
        "shared_moe": lambda config: SharedRoutedMoE(config, _ACTIVATIONS[config.hidden_act],
                                                     MLP(config, config.moe_intermediate_size * config.n_shared_experts))}


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_index: int) -> None:
        super().__init__()
        self.window = config.layer_window(layer_index)  # None: full causal; the caller builds the mask for it
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.attention_dropout
        self.layer_index = layer_index

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)
        if inputs.query_scale is not None:
            q = q * inputs.query_scale.to(q.dtype)
        if inputs.cache is not None:
            k, v = inputs.cache.update(self.layer_index, k, v)
        out = attend(q, k, v, inputs.mask, self.dropout if self.training else 0.0)  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: MistralConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # config.attention_kind: grouped-query, or Mistral Small 4's latent attention (same call, same inputs)
        self.self_attn = LatentAttention(config, layer_index, RMSNorm) if config.attention_kind == "latent" else Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        kind = config.layer_mlp_kind(layer_index)  # dense in a first_k_dense_replace layer
        if kind not in MLPS:
            raise ValueError(f"`mlp_kind` {config.mlp_kind!r} is not one of {sorted(MLPS)}")
        self.mlp = MLPS[kind](config)
        self.recompute: Optional[str] = None  # "block" | "attention" | "mlp": see model/execution.py

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """(B, T, H) -> (B, T, H); recomputes its attention or MLP part in backward when told to
        (the whole-block policy is applied by the caller, around this call)."""
        part = self.recompute if recomputing(self) and inputs.cache is None else None
        if part == "attention":
            # Tensors as checkpoint arguments (not the dataclass): torch.compile traces them cleanly.
            x = x + checkpoint(self._attention, x, inputs.cos, inputs.sin, inputs.mask, inputs.query_scale,
                               use_reentrant=False)
        else:
            x = x + self.self_attn(self.input_layernorm(x), inputs)
        if part == "mlp":
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                   query_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(x), AttentionInputs(cos, sin, mask, query_scale=query_scale))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))


def score_layer(config: MistralConfig, task: str) -> nn.Linear:
    """The classification layer `score`; token classification has a bias unless the config says
    `token_classification_bias: false` (transformers' rule), sequence classification never has one."""
    bias = task == "token_classification" and config.extra.get("token_classification_bias", True)
    return nn.Linear(config.hidden_size, config.num_labels, bias=bias)
