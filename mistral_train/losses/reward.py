"""Bradley-Terry loss of a reward model on preference pairs, as trl's RewardTrainer computes it."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def _scores(x: torch.Tensor, name: str) -> torch.Tensor:
    # A sequence-classification head with one label returns (B, 1); trl squeezes that last dim.
    if x.dim() == 2 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.dim() != 1:
        raise ValueError(f"{name} must be (B,) or (B, 1), got {tuple(x.shape)}")
    return x


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[Union[float, torch.Tensor]] = None,
    center_rewards_coefficient: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged, plus an optional centring penalty.

    Bradley-Terry pairwise loss (Ouyang et al. 2022, arXiv 2203.02155); the margin is Llama 2's
    (arXiv 2307.09288); the centring term coef * mean((r_c + r_r)^2) is Eq. 2 of Eisenstein et al.
    2023 (arXiv 2312.09244), keeping rewards near zero mean so they can be compared across prompts.

    Args:
        chosen_rewards, rejected_rewards: (B,) or (B, 1) scalar rewards of each pair's completions.
        margin: None, a float, or (B,) per-pair margins the chosen reward must exceed.
        center_rewards_coefficient: None (no penalty) or the penalty weight (trl suggests 0.01).
    Returns:
        (loss, accuracy): 0-d tensors. Accuracy is the detached fraction of pairs with
        r_chosen > r_rejected strictly (a tie counts as wrong, as in trl); it ignores the margin.
    """
    chosen = _scores(chosen_rewards, "chosen_rewards")
    rejected = _scores(rejected_rewards, "rejected_rewards")
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen_rewards {tuple(chosen.shape)} and rejected_rewards {tuple(rejected.shape)} differ")
    diff = chosen - rejected  # (B,)
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        if margin.dim() and margin.shape != diff.shape:
            raise ValueError(f"margin must be a scalar or shape {tuple(diff.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    with torch.no_grad():
        accuracy = (chosen > rejected).float().mean()
    return loss, accuracy
