"""Generation for online RL: our batched KV-cache `mistral_train.generate.generate`, or a live vLLM
engine (`VLLMEngine`, optional: vLLM is imported only when an engine is built); and the reward functions
that score the completions (`build_rewards` -> `RewardSet`, rewards.py: import paths, built-ins, reward models)."""

from mistral_train.rollout.rewards import RewardError, RewardSet, build_rewards
from mistral_train.rollout.vllm_engine import VLLMEngine

__all__ = ["VLLMEngine", "build_rewards", "RewardSet", "RewardError"]
