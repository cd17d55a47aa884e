"""Small models and packed rows for tests/cuda."""

from __future__ import annotations

import torch

from mistral_train import Mistral, MistralConfig


def small_mistral(seed: int = 0, **overrides: object) -> Mistral:
    """A small Mistral (fp32, CPU) with seeded default init: big enough for the CUDA kernels' real paths
    (head_dim 64, paged optimizer states over 50k values), small enough for seconds per test."""
    kwargs = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=None, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Mistral(MistralConfig(**{**kwargs, **overrides}))


def packed_positions(lengths: list[list[int]]) -> torch.Tensor:
    """(B, T) position ids that restart at every document: rows of documents of `lengths` (equal row sums)."""
    rows = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
    return torch.stack(rows)
