"""The Mistral decoder: RMSNorm, SwiGLU MLP, GQA + sliding-window attention, and its heads.

Parameter names equal transformers' (`model.layers.N.self_attn.q_proj.weight`, ...), so
HF checkpoints load with the identity key map and LoRA/NF4 swaps keep keys stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mistral_train.losses.ce import IGNORE_INDEX, chunked_cross_entropy
from mistral_train.model.attention import attend, build_attention_mask, documents_from_positions
from mistral_train.model.config import MistralConfig
from mistral_train.model.kv_cache import KVCache
from mistral_train.model.rope import apply_rope, rope_cos_sin

TASKS = ("causal_lm", "sequence_classification", "token_classification")
_ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: transformers' order, to the last bit.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class AttentionInputs:
    """What every layer's attention needs, computed once per forward."""

    cos: torch.Tensor  # (B, T, head_dim)
    sin: torch.Tensor
    mask: Optional[torch.Tensor]  # (B|1, 1, T, Tk) bool; None means plain causal
    cache: Optional[KVCache] = None


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_index: int) -> None:
        super().__init__()
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
        if inputs.cache is not None:
            k, v = inputs.cache.update(self.layer_index, k, v)
        out = attend(q, k, v, inputs.mask, self.dropout if self.training else 0.0)  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, config: MistralConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, decoder blocks and the final norm (transformers' `MistralModel`)."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def score_layer(config: MistralConfig, task: str) -> nn.Linear:
    """The classification layer `score`; token classification has a bias unless the config says
    `token_classification_bias: false` (transformers' rule), sequence classification never has one."""
    bias = task == "token_classification" and config.extra.get("token_classification_bias", True)
    return nn.Linear(config.hidden_size, config.num_labels, bias=bias)


def _classifier_dropout(config: MistralConfig) -> float:
    """transformers' token-classification dropout: classifier_dropout, else hidden_dropout, else 0.1."""
    for key in ("classifier_dropout", "hidden_dropout"):
        if config.extra.get(key) is not None:
            return float(config.extra[key])
    return 0.1


class Mistral(nn.Module):
    """A Mistral decoder with one head: causal LM, sequence or token classification.

    Args:
        config: the architecture.
        task: "causal_lm" (`lm_head`), "sequence_classification" or "token_classification" (`score`).
    """

    def __init__(self, config: MistralConfig, task: str = "causal_lm") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.config, self.task = config, task
        self.model = Backbone(config)
        if task == "causal_lm":
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.score = score_layer(config, task)
            self.head_dropout = nn.Dropout(_classifier_dropout(config) if task == "token_classification" else 0.0)
        self.gradient_checkpointing = False
        self.apply(self.init_weights)

    def init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = enabled

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.task == "causal_lm" else self.score.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        cache_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final normed hidden states (B, T, H).

        Args:
            input_ids: (B, T).
            attention_mask: (B, T) 1 for real tokens, 0 for padding (with a cache: this step's tokens only).
            position_ids: (B, T) RoPE positions; default is the token index. Without an attention
                mask, positions that restart mark packed documents that do not attend to each other.
            cache, cache_index: a KVCache and the (T,) sequence indices of these tokens in it.
        """
        B, T = input_ids.shape
        device = input_ids.device
        index = cache_index if cache_index is not None else torch.arange(T, device=device)
        if position_ids is None:
            position_ids = index[None].expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        keep = attention_mask.bool() if attention_mask is not None else None
        window = self.config.sliding_window
        if cache is not None:
            step_keep = keep if keep is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            kv_index, kv_keep = cache.begin(index, step_keep)
            mask = build_attention_mask(index, kv_index, window, kv_keep)
        else:
            documents = documents_from_positions(position_ids) if keep is None else None
            if keep is None and documents is None and (window is None or window >= T):
                mask = None  # plain causal: SDPA's fast path
            else:
                mask = build_attention_mask(index, index, window, keep, documents, documents)
        inputs = AttentionInputs(cos, sin, mask, cache)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, inputs, use_reentrant=False)
            else:
                x = block(x, inputs)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        reduction: str = "mean",
        loss_chunk_size: int = 1024,
        return_hidden: bool = False,
        cache: Optional[KVCache] = None,
        cache_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits, a loss, or hidden states.

        Returns:
            - with `labels` (causal LM): scalar cross-entropy over labels != -100, labels aligned
              with input_ids and shifted inside; `reduction="sum"` for token-normalised accumulation.
            - with `return_hidden`: final hidden states (B, T, H).
            - otherwise logits: (B, T, V) causal LM, (B, num_labels) sequence classification
              (last non-pad token), (B, T, num_labels) token classification.
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache, cache_index)
        if return_hidden:
            return hidden
        if labels is not None:
            if self.task != "causal_lm":
                raise ValueError(f"`labels` computes the causal-LM loss; a {self.task} model returns logits for your loss")
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # token t predicts label t+1
            return chunked_cross_entropy(hidden, self.lm_head.weight, shifted, loss_chunk_size, reduction)
        if self.task == "causal_lm":
            return self.lm_head(hidden)
        if self.task == "token_classification":
            return self.score(self.head_dropout(hidden))
        return self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), self._last_token(input_ids)])

    def _last_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the last non-pad token of each row (the rightmost, so left padding works too)."""
        pad = self.config.pad_token_id
        if pad is None:
            if input_ids.shape[0] != 1:
                raise ValueError("sequence classification of a batch needs `pad_token_id` in the config")
            return torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (index * (input_ids != pad)).argmax(dim=-1)

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, task: str = "causal_lm", quantize: Optional[str] = None) -> "Mistral":
        """Load an HF Mistral folder (config.json + safetensors); see checkpoint/hf.py."""
        from mistral_train.checkpoint.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, task=task, quantize=quantize)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB") -> None:
        """Write an HF folder that transformers loads with the same logits; see checkpoint/hf.py."""
        from mistral_train.checkpoint.hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
