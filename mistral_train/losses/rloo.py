"""RLOO (trl 1.16 RLOOTrainer semantics): leave-one-out advantages and the sequence-level clipped loss.

RLOO differs from GRPO in three places, all kept here so the objective reads like GRPO's:
- the baseline of a completion is the mean reward of the OTHER completions of its prompt (no std scaling;
  optionally the whole batch's advantages are standardised: `normalize=True`, trl's normalize_advantages);
- the KL to the reference is a reward penalty, not a loss term: beta times the summed first-order log
  ratio (old - ref) of each completion's tokens is subtracted from its reward before the baseline;
- the policy ratio is one per sequence, exp(sum logps - sum old_logps), PPO-clipped, averaged over sequences.
"""

import torch

from mistral_train.errors import ConfigError
from mistral_train.losses.grpo import _nanstd


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False) -> torch.Tensor:
    """Leave-one-out advantages of `rewards` (B,), in groups of `num_generations` consecutive completions.

    A NaN (unscorable) reward is left out of its siblings' baselines and gets advantage 0; so does a
    completion without a scorable sibling. Returns (B,).
    """
    if rewards.dim() != 1 or num_generations < 2 or rewards.numel() % num_generations:
        raise ConfigError(f"rewards of shape {tuple(rewards.shape)}: RLOO needs (B,) in groups of num_generations >= 2 "
                          f"(got num_generations={num_generations})")
    groups = rewards.view(-1, num_generations)  # (prompts, G)
    scorable = (~torch.isnan(groups)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(groups, dim=1, keepdim=True) - groups) / (scorable - 1)  # 0/0 -> NaN: no sibling
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_kl_penalty(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The summed first-order KL estimate (old - ref) over each completion's tokens: (B, T) -> (B,).
    It can be negative per token (unlike GRPO's k3); trl subtracts beta times it from the reward."""
    return ((old_logps - ref_logps) * mask).sum(-1)


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO's policy loss on one micro-batch: per-token log-probs (B, T) summed per sequence under `mask`,
    one ratio per sequence, PPO-clipped, mean over the B sequences. Returns (loss, clip stats with trl's names)."""
    seq_logps, seq_old = (logps * mask).sum(-1), (old_logps * mask).sum(-1)  # (B,)
    ratio = torch.exp(seq_logps - seq_old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
    stats = {"clip_ratio/low_mean": low.mean().item(), "clip_ratio/low_min": low.min().item(),
             "clip_ratio/high_mean": high.mean().item(), "clip_ratio/high_max": high.max().item(),
             "clip_ratio/region_mean": (low + high).clamp(max=1).mean().item()}
    return loss, stats
