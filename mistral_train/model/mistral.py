"""The Mistral decoder (embeddings, blocks, final norm) and its heads; the blocks live in blocks.py.

Parameter names equal transformers' (`model.layers.N.self_attn.q_proj.weight`, ...), so
HF checkpoints load with the identity key map and LoRA/NF4 swaps keep keys stable.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from mistral_train.losses.ce import IGNORE_INDEX, chunked_cross_entropy
from mistral_train.losses.logps import sequence_logps
from mistral_train.model.attention import build_attention_mask, documents_from_positions
from mistral_train.model import attention_backends, hf
from mistral_train.model.blocks import MLP, Attention, AttentionInputs, Block, RMSNorm, score_layer
from mistral_train.model.compile import CompileOptions, compile_blocks, uncompile_blocks
from mistral_train.model.config import MistralConfig
from mistral_train.model.execution import checkpoint_plan, run_block
from mistral_train.model.kv_cache import KVCache
from mistral_train.model.moe import record_aux_loss
from mistral_train.model.offload import DEFAULT_MIN_BYTES, OffloadOptions
from mistral_train.model.rope import llama4_query_scale, rope_cos_sin

__all__ = ["Mistral", "Backbone", "Block", "Attention", "AttentionInputs", "MLP", "RMSNorm", "score_layer", "TASKS"]
TASKS = ("causal_lm", "sequence_classification", "token_classification")


class Backbone(nn.Module):
    """Embeddings, decoder blocks and the final norm (transformers' `MistralModel`)."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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
        # Execution options (set_gradient_checkpointing, set_compile, set_activation_offloading):
        # how blocks run, never what they compute.
        self.gradient_checkpointing: Optional[str] = None  # the policy name, None when off
        self.compile_options: Optional[CompileOptions] = None
        self.activation_offload: Optional[OffloadOptions] = None
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

    def set_gradient_checkpointing(self, policy: Union[str, bool, None] = True, every: int = 1) -> None:
        """Recompute activations in the backward pass instead of storing them (training only).

        Args:
            policy: "block" (or True), "attention", "mlp", "every_k", or "none" (or False);
                see model/execution.py for what each keeps.
            every: apply the policy to layers 0, every, 2*every, ... ("every_k" needs >= 2).
        """
        name, parts = checkpoint_plan(policy, every, len(self.model.layers))
        for block, part in zip(self.model.layers, parts):
            block.recompute = part
        self.gradient_checkpointing = name

    def set_compile(self, enabled: bool = True, mode: Optional[str] = None, dynamic: Optional[bool] = True) -> None:
        """Compile each decoder block with torch.compile (one compile shared by all layers) or
        go back to eager; see model/compile.py. Call after adapters and quantization are applied."""
        if enabled:
            compile_blocks(self, mode, dynamic)
        else:
            uncompile_blocks(self)

    def set_activation_offloading(self, enabled: bool = True, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        """Keep each block's saved activations in CPU memory between forward and backward
        (training only; tensors under `min_bytes` stay put); see model/offload.py."""
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"activation offloading `min_bytes` must be an int >= 0, got {min_bytes!r}")
        self.activation_offload = OffloadOptions(min_bytes) if enabled else None

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
        config = self.config
        cos, sin = rope_cos_sin(position_ids, config.rotary_dim, config.rope_theta, x.dtype, config.rope_type,
                                config.rope_options, config.max_position_embeddings)
        query_scale = None
        if config.query_scaling == "llama4":  # Ministral 3: queries sharpened past the pretraining length
            query_scale = llama4_query_scale(position_ids, config.rope_options["llama_4_scaling_beta"],
                                             config.rope_options["original_max_position_embeddings"])
        keep = attention_mask.bool() if attention_mask is not None else None
        kv_index, kv_keep, documents = index, keep, None
        if cache is not None:
            step_keep = keep if keep is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            kv_index, kv_keep = cache.begin(index, step_keep)
        elif keep is None:
            documents = documents_from_positions(position_ids)
        plain = cache is None and keep is None and documents is None  # causal, unless a window cuts it
        # Packed or windowed rows on CUDA: flash-attn varlen or FlexAttention; the dense mask is for the CPU,
        # padding, the KV cache and latent attention (attention_backends.py).
        backend = "sdpa"
        if cache is None and keep is None and config.attention_kind != "latent":
            backend = attention_backends.choose_backend(device, x.dtype, config.attention_dropout)
        inputs = {}  # one mask per attention window the layers use (each layer's kind: config.layer_window)
        for w in {block.self_attn.window for block in self.model.layers}:
            fast = plain and (w is None or w >= T)  # None: SDPA's causal fast path
            if fast:
                mask = None
            elif backend != "sdpa":
                mask = attention_backends.packed_attention(backend, position_ids, documents, w)
            else:
                mask = build_attention_mask(index, kv_index, w, kv_keep, documents, documents)
            inputs[w] = AttentionInputs(cos, sin, mask, cache, query_scale)
        for block in self.model.layers:
            x = run_block(self, block, x, inputs[block.self_attn.window])  # compiled, recomputed, offloaded: as set
        record_aux_loss(self, keep)  # experts: the load-balancing loss of a training forward, padding excluded
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
        sequence_index: Optional[torch.Tensor] = None,
        num_sequences: Optional[int] = None,
        temperature: float = 1.0,
    ):
        """Logits, a loss, per-sequence log-probs, or hidden states.

        Returns:
            - with `labels` (causal LM): scalar cross-entropy over labels != -100, labels aligned
              with input_ids and shifted inside; `reduction="sum"` for token-normalised accumulation.
            - with `labels` and `reduction="sequence"`: (logps, counts), both (S,): the summed log-prob
              of each sequence's labelled tokens and how many there are (DPO); `sequence_index` (B, T)
              numbers the sequences of packed rows (-1 on padding), default one sequence per row.
              Computed in chunks inside forward, so sharded weights (ZeRO-3, FSDP) are in place.
              `temperature` divides the logits first (GRPO scores completions at the sampling temperature).
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
            if reduction == "sequence":
                owner = None if sequence_index is None else F.pad(sequence_index[:, 1:], (0, 1), value=-1)
                if temperature != 1.0:  # logits / t == (hidden / t) @ W.T: scale the (N, H) side, not the head
                    hidden = hidden / temperature
                return sequence_logps(hidden, self.lm_head.weight, shifted, owner, num_sequences, loss_chunk_size)
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
        """Load an HF Mistral folder (config.json + safetensors) or a native one (params.json +
        consolidated.safetensors); see model/hf.py and model/native.py."""
        return hf.load_pretrained(cls, path, dtype=dtype, task=task, quantize=quantize)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB") -> None:
        """Write an HF folder that transformers loads with the same logits; see model/hf.py."""
        hf.save_pretrained(self, path, max_shard_size=max_shard_size)
