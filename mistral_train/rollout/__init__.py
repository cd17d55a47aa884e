"""Generation for online RL: our batched KV-cache `mistral_train.generate.generate`, or a live vLLM
engine (`VLLMEngine`, optional: vLLM is imported only when an engine is built)."""

from mistral_train.rollout.vllm_engine import VLLMEngine

__all__ = ["VLLMEngine"]
