"""Loss functions: chunked cross-entropy, the DPO family, and the Bradley-Terry reward loss."""

from mistral_train.losses.ce import chunked_cross_entropy
from mistral_train.losses.dpo import DPO_LOSSES, dpo_loss
from mistral_train.losses.reward import reward_loss

__all__ = ["DPO_LOSSES", "chunked_cross_entropy", "dpo_loss", "reward_loss"]
