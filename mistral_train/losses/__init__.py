"""Loss functions: chunked cross-entropy (more to come: DPO family, reward)."""

from mistral_train.losses.ce import chunked_cross_entropy

__all__ = ["chunked_cross_entropy"]
