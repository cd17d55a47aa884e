"""Attention masks and grouped-query attention through SDPA.

A mask is built once per forward from token *indices* (place in the sequence or cache),
not from position ids, exactly as transformers does: causal, optionally limited to a
sliding window, optionally confined to padding-free keys and to one packed document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch
import torch.nn.functional as F

from mistral_train.model.kv_cache import KVCache

class PackedAttention(Protocol):
    """attention_backends.PackedAttention as attend() uses it; named by its shape, not imported, because
    attention_backends imports this module (documents_from_positions)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor: ...


@dataclass
class AttentionInputs:
    """What every layer's attention needs, computed once per forward."""

    cos: torch.Tensor  # (B, T, head_dim)
    sin: torch.Tensor
    # (B|1, 1, T, Tk) bool; None means plain causal; a PackedAttention for packed rows on CUDA (attention_backends.py)
    mask: Optional[Union[torch.Tensor, PackedAttention]]
    cache: Optional[KVCache] = None
    query_scale: Optional[torch.Tensor] = None  # (B, 1, T, 1) on the rotated queries (Ministral 3), or None


def build_attention_mask(
    q_index: torch.Tensor,
    kv_index: torch.Tensor,
    sliding_window: Optional[int] = None,
    kv_keep: Optional[torch.Tensor] = None,
    q_document: Optional[torch.Tensor] = None,
    kv_document: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean mask, True where a query may attend to a key.

    Args:
        q_index: (Tq,) index of each query token in the sequence.
        kv_index: (Tk,) index of each key token (the same numbering).
        sliding_window: a query at i sees keys j with i - window < j <= i (transformers' rule).
        kv_keep: (B, Tk) False for padding keys and empty cache slots.
        q_document, kv_document: (B, Tq), (B, Tk) document ids of packed rows.
    Returns:
        (B or 1, 1, Tq, Tk) bool.
    """
    q, k = q_index[:, None], kv_index[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    mask = allowed[None, None]
    if kv_keep is not None:
        mask = mask & kv_keep[:, None, None, :]
    if q_document is not None:
        mask = mask & (q_document[:, None, :, None] == kv_document[:, None, None, :])
    # A query with nothing to attend to (a left-padding token) would give NaN on some SDPA
    # backends; let it attend everywhere instead. Its output is never used.
    return mask | ~mask.any(dim=-1, keepdim=True)


def documents_from_positions(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Document id of every token of packed rows: a new document starts wherever the
    position does not continue the previous one by +1 (transformers' convention).

    Args:
        position_ids: (B, T).
    Returns:
        (B, T) int document ids, or None when every row holds a single document.
    """
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    documents = (steps != 1).cumsum(dim=-1)
    if bool((documents[:, -1] == 0).all()):
        return None
    return documents


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[Union[torch.Tensor, PackedAttention]],
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    Args:
        q: (B, n_heads, Tq, head_dim); k, v: (B, n_kv_heads, Tk, head_dim).
        mask: bool (B|1, 1, Tq, Tk), or None for plain causal attention with Tq == Tk, or a
            PackedAttention (packed rows on CUDA: flash-attn varlen or FlexAttention, no dense mask).
    Returns:
        (B, n_heads, Tq, head_dim)
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        return mask.attend(q, k, v, dropout_p)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
