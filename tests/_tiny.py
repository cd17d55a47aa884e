"""Tiny Mistral models and HF folders built in code (the tests never download a model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.config import ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from tests._tokenizers import with_tokenizer_model

# The optimizer and loop tests' small model: two layers, grouped KV heads, no sliding window.
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, sliding_window=None)


def small_run(root: Path, name: str, **trainer: Any) -> RunConfig:
    """A training run of a SMALL-shaped model (its vocabulary the bundled tokenizer's) on the bundled corpus in
    `root`/`name`, with `trainer` (TrainerSpec names); no progress bar, no plot."""
    model = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return RunConfig(model=model, trainer=TrainerSpec(**trainer), run=RunSpec(name=name, dir=str(root)),
                     tracking=TrackingSpec(progress_bar=False, plot=False))


def tiny_model(**overrides: Any) -> Mistral:
    """A fresh (default-initialised) Mistral of the SMALL shape with `overrides` (MistralConfig names)."""
    return Mistral(MistralConfig(**{**SMALL, **overrides}))


def save_tiny_folder(folder: Path, seed: int = 0, tokenizer: Optional[str] = None, **config: Any) -> Path:
    """An HF folder of a fresh Mistral of `config` (MistralConfig names), initialised after
    torch.manual_seed(seed); with `tokenizer` (a bundled version: "v1"...) its tokenizer.model too."""
    torch.manual_seed(seed)
    Mistral(MistralConfig(**config)).save_pretrained(folder)
    if tokenizer is not None:
        with_tokenizer_model(folder, tokenizer)
    return Path(folder)
