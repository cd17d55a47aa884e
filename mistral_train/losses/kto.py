"""KTO: a loss over unpaired desirable / undesirable completions, under trl 1.16's `loss_type` names.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7) scores each completion alone against a
reference point z0, the policy/reference KL, estimated from MISMATCHED (prompt, completion) pairs
(completion i+1's text after prompt i), so it carries no signal about the examples themselves:
    r(x, y) = log pi(y|x) - log pi_ref(y|x)
    desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))
    z0 = max(0, mean over ranks of (mean over the mismatched pairs of r)), detached.
The loss is the plain mean over every example of its weighted loss (trl's `nanmean` of the
concatenation), not a weight-normalised mean: the weights rebalance unequal class sizes.

`apo_zero_unpaired` (APO-zero, D'Oosterlinck et al. 2024, arXiv 2408.06266, unpaired form) needs
no KL: desirable 1 - sigmoid(beta * r), undesirable sigmoid(beta * r), with the same weights.

Every log-prob is the SUM of a completion's token log-probs, shape (n,), as in `dpo_loss`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mistral_train.losses.dpo import _wide

Tensor = torch.Tensor

KTO_LOSSES = ("kto", "apo_zero_unpaired")
USES_KL = frozenset({"kto"})  # apo_zero_unpaired never reads the mismatched pairs


def kto_kl_estimate(
    policy_kl_logps: Tensor, ref_kl_logps: Tensor, gather: Optional[Callable[[Tensor], Tensor]] = None
) -> Tensor:
    """KTO's reference point z0: the mean log-ratio over the mismatched pairs, detached, >= 0.

    Each process averages its own pairs; `gather` (e.g. `accelerator.gather_for_metrics`) maps that
    (1,) mean to every process's mean, and those means are averaged before the clamp, as trl does.
    The clamp comes after the average: a negative local estimate still pulls the global one down.
    """
    _check_same("policy_kl_logps", policy_kl_logps, "ref_kl_logps", ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("the KL estimate needs at least one mismatched pair (policy_kl_logps is empty)")
    local = (_wide(policy_kl_logps) - _wide(ref_kl_logps)).mean().detach().reshape(1)
    every_rank = local if gather is None else gather(local)
    return every_rank.mean().clamp(min=0)


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must be 1-D of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _per_example(loss_type: str, beta: float, chosen_r: Tensor, rejected_r: Tensor, kl: Tensor) -> tuple[Tensor, Tensor]:
    """Unweighted per-example losses (desirable, undesirable) from the log-ratios r."""
    if loss_type == "kto":
        return 1 - F.sigmoid(beta * (chosen_r - kl)), 1 - F.sigmoid(beta * (kl - rejected_r))
    return 1 - F.sigmoid(beta * chosen_r), F.sigmoid(beta * rejected_r)  # apo_zero_unpaired


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    policy_kl_logps: Optional[Tensor] = None,
    ref_kl_logps: Optional[Tensor] = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    gather: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO-family loss over one batch of unpaired examples, trl 1.16's KTOTrainer formulas.

    Args:
        policy_chosen_logps, ref_chosen_logps: (n_d,) summed log-probs of the desirable completions
            (label True) under the policy and the reference; n_d may be 0.
        policy_rejected_logps, ref_rejected_logps: (n_u,) the same for the undesirable ones; may be empty.
        policy_kl_logps, ref_kl_logps: (m,) summed log-probs of the mismatched pairs (trl's `KL_*`
            sequences, usually one per example); required for `kto`, unused by `apo_zero_unpaired`.
            The policy side may carry a graph: the estimate is detached.
        loss_type: "kto" or "apo_zero_unpaired".
        beta: the temperature on the log-ratios.
        desirable_weight, undesirable_weight: lambda_D and lambda_U, multiplying each class's losses.
        gather: maps this process's (1,) KL mean to every process's means (see `kto_kl_estimate`).
    Returns:
        (loss, stats). loss: 0-d, the mean over all n_d + n_u weighted example losses. stats: detached
        0-d tensors under trl's metric names for this process's examples: "kl" always;
        "rewards/chosen", "logps/chosen" when n_d > 0; "rewards/rejected", "logps/rejected" when
        n_u > 0; "rewards/margins" when both (rewards are beta * r, averaged per class).
    """
    if loss_type not in KTO_LOSSES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; known: {', '.join(KTO_LOSSES)}")
    _check_same("policy_chosen_logps", policy_chosen_logps, "ref_chosen_logps", ref_chosen_logps)
    _check_same("policy_rejected_logps", policy_rejected_logps, "ref_rejected_logps", ref_rejected_logps)
    n_d, n_u = policy_chosen_logps.numel(), policy_rejected_logps.numel()
    if n_d + n_u == 0:
        raise ValueError("kto_loss needs at least one desirable or undesirable example; both are empty")
    if loss_type in USES_KL:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs policy_kl_logps and ref_kl_logps (the mismatched pairs)")
        kl = kto_kl_estimate(policy_kl_logps, ref_kl_logps, gather)
    else:
        kl = torch.zeros((), dtype=_wide(policy_chosen_logps).dtype, device=policy_chosen_logps.device)

    chosen, rejected = _wide(policy_chosen_logps), _wide(policy_rejected_logps)
    chosen_r, rejected_r = chosen - _wide(ref_chosen_logps), rejected - _wide(ref_rejected_logps)
    chosen_losses, rejected_losses = _per_example(loss_type, beta, chosen_r, rejected_r, kl)
    loss = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses)).mean()

    stats = {"kl": kl.detach()}
    with torch.no_grad():
        for name, logps, r, n in (("chosen", chosen, chosen_r, n_d), ("rejected", rejected, rejected_r, n_u)):
            if n:  # trl logs a class's metrics only when the batch has examples of it
                stats[f"rewards/{name}"] = (beta * r).nansum() / n
                stats[f"logps/{name}"] = logps.nansum() / n
        if n_d and n_u:
            stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return loss, stats
