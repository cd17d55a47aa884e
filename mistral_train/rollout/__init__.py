"""Generation for online RL: `sampling.generate_completions` draws a GRPO/RLOO rollout (num_generations completions
per prompt) with our batched KV-cache `mistral_train.generate.generate`, or from a live vLLM engine (`VLLMEngine`,
optional: vLLM is imported only when an engine is built). Callers that tests may feed fixed completions to look
`generate_completions` up through the module (`sampling.generate_completions`), not this package's name."""

from mistral_train.rollout.sampling import Completions, generate_completions
from mistral_train.rollout.vllm_engine import VLLMEngine

__all__ = ["Completions", "VLLMEngine", "generate_completions"]
