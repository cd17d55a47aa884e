"""The GRPO loss family (trl 1.16 semantics): group-relative advantages and the clipped policy loss.

Names follow trl's `GRPOConfig` so a trl user finds the same knobs: `loss_type` in GRPO_LOSSES,
`epsilon_low`/`epsilon_high` (trl's `epsilon`/`epsilon_high`), `beta` with the k3 KL estimator,
`importance_sampling_level` ("token" or "sequence"), and through `**needs`: `delta`,
`sapo_temperature_pos`/`_neg`, `vespo_k_pos`/`vespo_lambda_pos`/`vespo_k_neg`/`vespo_lambda_neg`,
`importance_sampling_ratio` (vespo) and `use_bias_correction_kl`.

trl's `mask_truncated_completions` is not an argument here: the caller zeroes the rows of `mask` whose
completion did not end in EOS (`mask = mask * ~truncated[:, None]`), exactly what trl does to its
completion mask before the loss.

Gradient accumulation: `grpo`, `bnpo`, `dr_grpo`, `sapo` and `luspo` return the loss of one micro-batch
(the caller divides by the number of accumulation steps, as trl does); `dapo`, `cispo` and `vespo` divide
by `num_items`, the completion tokens of the whole accumulated batch, so their micro-batch losses sum.
"""

import math

import torch

from mistral_train.errors import ConfigError

GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
REWARD_SCALES = ("group", "batch", "none")

# trl's GRPOConfig defaults for the options only some loss types read.
NEEDS_DEFAULTS: dict[str, object] = {
    "delta": None,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "importance_sampling_ratio": None,
    "use_bias_correction_kl": True,
}
_PPO_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased (Bessel) std ignoring NaN rewards (unscorable completions); NaN with fewer than two values."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim)
    sq_dev = torch.nanmean((x - mean) ** 2, dim=dim)
    var = torch.where(count > 1, sq_dev * count / (count - 1).clamp(min=1), torch.full_like(sq_dev, math.nan))
    return var.sqrt()


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """Advantages of `rewards` (B,), laid out as groups of `num_generations` consecutive completions.

    Each reward minus its group's mean, divided (unless scale="none") by the group's std ("group") or the
    whole batch's std ("batch"), plus 1e-4. NaN rewards (unscorable) are left out of the statistics and get
    advantage 0. Returns (B,).
    """
    if scale not in REWARD_SCALES:
        raise ConfigError(f"scale_rewards={scale!r}: expected one of {', '.join(REWARD_SCALES)}")
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ConfigError(
            f"rewards of shape {tuple(rewards.shape)}: expected (B,) with B a multiple of "
            f"num_generations={num_generations}"
        )
    groups = rewards.view(-1, num_generations)  # (prompts, G)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale != "none":
        if scale == "group":
            std = _nanstd(groups, dim=1).repeat_interleave(num_generations) if num_generations > 1 else None
        else:
            std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else None
        if std is None:  # a single sample has no spread: trl divides by 0 + 1e-4
            std = torch.zeros_like(rewards)
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _take_needs(loss_type: str, needs: dict) -> dict:
    unknown = sorted(set(needs) - set(NEEDS_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"grpo_loss(loss_type={loss_type!r}): unknown option(s) {unknown}; known: {sorted(NEEDS_DEFAULTS)}"
        )
    return {**NEEDS_DEFAULTS, **needs}


@torch.no_grad()
def _vespo_weights(advantages, log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio w; (B, 1), no grad."""
    floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)  # a sum over tokens, not a mean
    if is_ratio is not None:  # ratio of the old policy to the sampler (vLLM): folded into w
        log_w = log_w + is_ratio.log().clamp(floor, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, k_pos, k_neg)
    lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens, or over sequences when x is per sequence (B, 1)."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _per_seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # No clamp: a sequence without tokens gives NaN, which the nan-aware min/max below skip, as trl's does.
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(x: torch.Tensor, pick) -> float:
    """min/max over the values that are not NaN; NaN when every sequence was empty (as trl logs it)."""
    kept = x[~torch.isnan(x)]
    return pick(kept).item() if kept.numel() else math.nan


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: int | float | torch.Tensor | None = None,
    **needs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO-family policy loss on one micro-batch.

    logps, old_logps, ref_logps: per-token log-probs (B, T) of the completions under the policy (with grad),
    the policy that sampled them, and the reference. advantages: (B,) or (B, T). mask: (B, T), 1 on the
    completion tokens that count. Returns (loss, stats) with stats under trl's metric names.
    """
    if loss_type not in GRPO_LOSSES:
        raise ConfigError(f"loss_type={loss_type!r}: expected one of {', '.join(GRPO_LOSSES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ConfigError(f"importance_sampling_level={importance_sampling_level!r}: expected 'token' or 'sequence'")
    if beta != 0.0 and ref_logps is None:
        raise ConfigError(f"grpo_loss: beta={beta} needs ref_logps (the reference policy's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ConfigError("grpo_loss(loss_type='dr_grpo') needs max_completion_length (its constant normaliser)")
    opts = _take_needs(loss_type, needs)
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)

    log_ratio = logps - old_logps  # (B, T)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:  # GSPO: one ratio per sequence, the geometric mean of the token ratios
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_weights)  # (B, T) or (B, 1)

    stats: dict[str, float] = {}
    if loss_type == "cispo":
        # CISPO clips the (detached) weight, never the gradient of the log-prob itself.
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * advantages * logps
        clipped = (ratio > epsilon_high) & (advantages > 0)
        stats["cispo_clip_ratio"] = _masked_mean(clipped.float(), mask).item()
    elif loss_type in _PPO_CLIPPED:
        clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        raw = ratio if opts["delta"] is None else torch.clamp(ratio, max=opts["delta"])  # two-sided clipping
        per_token = -torch.min(raw * advantages, clipped_ratio * advantages)
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        stats["clip_ratio/low_mean"] = _masked_mean(low.float(), mask).item()
        stats["clip_ratio/high_mean"] = _masked_mean(high.float(), mask).item()
        stats["clip_ratio/region_mean"] = _masked_mean((low | high).float(), mask).item()
        stats["clip_ratio/low_min"] = _nan_extreme(_per_seq(low.float(), mask), torch.min)
        stats["clip_ratio/high_max"] = _nan_extreme(_per_seq(high.float(), mask), torch.max)
    elif loss_type == "sapo":
        tau = torch.where(advantages > 0, opts["sapo_temperature_pos"], opts["sapo_temperature_neg"])
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages  # soft gate in place of a clip
    else:  # vespo
        phi = _vespo_weights(
            advantages, log_ratio, mask, opts["importance_sampling_ratio"],
            opts["vespo_k_pos"], opts["vespo_lambda_pos"], opts["vespo_k_neg"], opts["vespo_lambda_neg"],
        )
        per_token = -phi * advantages * logps
        stats["vespo/phi_seq_mean"] = _masked_mean(phi, mask).item()

    if beta != 0.0:
        # k3 estimator of KL(policy || ref): exp(r) - r - 1 with r = ref - policy; >= 0, unbiased under the policy.
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        if opts["use_bias_correction_kl"]:  # samples came from the old policy: reweight by the ratio
            kl = kl * ratio
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask).item()

    masked = per_token * mask  # broadcasts (B, 1) per-sequence terms onto the tokens
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "luspo":
        loss = masked.sum(-1).mean()
    else:  # dapo, cispo, vespo: one token-level normaliser over the whole accumulated batch
        total = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype).to(logps.device)
        loss = masked.sum() / total.clamp(min=1.0)
    return loss, stats
