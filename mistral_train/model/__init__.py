"""The Mistral model: config, RoPE, attention, KV cache, blocks and heads."""

from mistral_train.model.config import MistralConfig
from mistral_train.model.kv_cache import KVCache
from mistral_train.model.mistral import Mistral

__all__ = ["MistralConfig", "Mistral", "KVCache"]
