"""Loss functions: chunked cross-entropy, the DPO family, the Bradley-Terry reward loss, the GRPO family with its
group advantages, and KTO."""

from mistral_train.losses.ce import chunked_cross_entropy
from mistral_train.losses.dpo import DPO_LOSSES, dpo_loss
from mistral_train.losses.grpo import GRPO_LOSSES, group_advantages, grpo_loss
from mistral_train.losses.kto import KTO_LOSSES, kto_kl_estimate, kto_loss
from mistral_train.losses.reward import reward_loss

__all__ = [
    "DPO_LOSSES", "GRPO_LOSSES", "KTO_LOSSES", "chunked_cross_entropy", "dpo_loss", "group_advantages", "grpo_loss",
    "kto_kl_estimate", "kto_loss", "reward_loss",
]
