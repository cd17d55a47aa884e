"""A pre-allocated KV cache for all layers; a rolling buffer when the model has a sliding window.

Slots hold keys and values by sequence index. With a sliding window of W the cache has W
slots and token i lives in slot i % W, so memory stays fixed however long the generation:
a query at i never needs a key older than i - W + 1.

A *static* cache (`static=True`, for a compiled decode step) handles single-token steps with
fixed shapes and no Python-side state: the slot is computed from the index tensor, written with
`index_copy_`, and attention runs over every slot (empty ones are masked), so the same compiled
graph serves every step. Steps of several tokens (the prefill) take the ordinary path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of every layer, plus which sequence index each slot holds.

    Use per forward step: `kv_index, kv_keep = cache.begin(index, keep)` once, then
    `k, v = cache.update(layer, k_new, v_new)` in each layer.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        rolling: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        static: bool = False,
        value_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # value_dim (default head_dim): latent attention keeps its latent in `k` and its rotary key in `v`
        v_shape = shape[:-1] + (head_dim if value_dim is None else value_dim,)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)
        # Sequence index held by each slot (-1: empty) and whether it is a real (non-pad) token.
        self.register_buffer("slot_index", torch.full((capacity,), -1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot_keep", torch.zeros(batch_size, capacity, dtype=torch.bool, device=device), persistent=False)
        # The slot of the current single-token step of a static cache: written in place each step.
        self.register_buffer("step_slot", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.capacity = capacity
        self.rolling = rolling
        self.static = static
        self._write_slots: Optional[torch.Tensor | slice] = None  # slots this step writes
        self._write_from = 0  # first new token that is written (a long rolling chunk keeps its last W)
        self._concat = False
        self._end = capacity

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, dtype: torch.dtype, device, static: bool = False) -> "KVCache":
        """A cache for `max_length` tokens: a rolling buffer of `sliding_window` slots when that is smaller
        and every layer slides (a full-attention layer needs every token). Latent attention (Mistral 4) caches, per
        token and layer, one latent of kv_lora_rank (as `k`) and one rotary key of qk_rope_head_dim (as `v`)."""
        if config.attention_kind == "latent":
            return cls(config.num_hidden_layers, batch_size, 1, config.kv_lora_rank, max_length, False, dtype, device,
                       static, value_dim=config.qk_rope_head_dim)
        windows = {config.layer_window(i) for i in range(config.num_hidden_layers)}
        window = None if None in windows else max(windows)
        rolling = window is not None and window < max_length
        capacity = window if rolling else max_length
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   capacity, rolling, dtype, device, static)

    def _static_step(self, new: int) -> bool:
        return self.static and new == 1

    def begin(self, index: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Register the new tokens of this step.

        Args:
            index: (Tn,) sequence indices of the new tokens (consecutive).
            keep: (B, Tn) False for padding tokens.
        Returns:
            kv_index (Tk,) and kv_keep (B, Tk) describing the keys `update` will return.
        """
        new = index.shape[0]
        if self._static_step(new):
            # No int() of a tensor here: the caller (generate) checked the length up front.
            self.step_slot.copy_(index % self.capacity if self.rolling else index)
            self.slot_index.index_copy_(0, self.step_slot, index)
            self.slot_keep.index_copy_(1, self.step_slot, keep)
            return self.slot_index, self.slot_keep
        if not self.rolling and int(index[-1]) >= self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; token index {int(index[-1])} does not fit")
        # A chunk of several tokens in a rolling buffer would overwrite keys that its own earlier
        # queries still need: attend over old slots + the whole chunk, then store its tail.
        self._concat = self.rolling and new > 1
        self._write_from = max(0, new - self.capacity) if self.rolling else 0
        written = index[self._write_from :]
        if self.rolling:
            self._write_slots = written % self.capacity
        else:
            # Consecutive slots: a basic slice, whose writes are plain copies (an index tensor would make every
            # layer's write an index_put, a cost each decode step pays 2 x layers times).
            end = int(index[-1]) + 1
            self._write_slots = slice(end - written.shape[0], end)
        if self._concat:
            kv_index = torch.cat((self.slot_index, index))
            kv_keep = torch.cat((self.slot_keep, keep), dim=1)
        self.slot_index[self._write_slots] = written
        self.slot_keep[:, self._write_slots] = keep[:, self._write_from :]
        # A plain cache fills from slot 0: attend only over the filled part.
        self._end = self.capacity if self.rolling else end
        if not self._concat:
            kv_index, kv_keep = self.slot_index[: self._end], self.slot_keep[:, : self._end]
        return kv_index, kv_keep

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, n_kv_heads, Tn, head_dim); return the keys and values to attend over."""
        # Under autocast the projections come out in the autocast dtype: store in the cache's.
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if self._static_step(k.shape[2]):
            self.k[layer].index_copy_(2, self.step_slot, k)
            self.v[layer].index_copy_(2, self.step_slot, v)
            return self.k[layer], self.v[layer]
        if self._concat:
            k_all = torch.cat((self.k[layer], k), dim=2)
            v_all = torch.cat((self.v[layer], v), dim=2)
        self.k[layer][:, :, self._write_slots] = k[:, :, self._write_from :]
        self.v[layer][:, :, self._write_slots] = v[:, :, self._write_from :]
        if self._concat:
            return k_all, v_all
        return self.k[layer, :, :, : self._end], self.v[layer, :, :, : self._end]
