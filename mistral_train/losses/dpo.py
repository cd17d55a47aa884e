"""DPO-family preference losses under trl's `loss_type` names, plus reference-free SimPO and ORPO.

Every log-prob argument is the SUM of the completion's token log-probs, shape (B,): what a
forward pass gives, and what trl 1.16's DPOTrainer sums before its losses. Losses that work per
token (`ipo`, `sigmoid_norm`, `sft`, `simpo`, `orpo`) divide by the completion lengths in
`needs`, at the point where trl divides by its completion mask, so the value is trl's exactly.

`needs` (keyword arguments beyond the four log-probs; unknown keys are an error):
    chosen_lengths, rejected_lengths: (B,) completion token counts. Both for ipo, sigmoid_norm,
        simpo, orpo; chosen only for sft. Clamped to >= 1, as trl does for ipo/sigmoid_norm (its
        simpo/orpo/sft would give NaN for an empty completion).
    chosen_nll: scalar (or (B,)) NLL of the chosen sequences, for orpo. trl's ORPO averages it
        over prompt AND completion tokens, which summed completion log-probs cannot give.
    discopop_tau: float, default 0.05 (trl's default), for discopop.
    bco_delta: float or 0-d tensor, default 0.0, for bco_pair: BCO's running mean reward. 0.0 is
        trl 1.16's `bco_pair`, which has no shift; pass the mean for the paper's form.
    simpo_gamma: float, default 0.5 (trl CPOConfig's default): SimPO's target margin; the loss
        uses gamma / beta, as trl's CPO trainer does.

`label_smoothing` is used by sigmoid (conservative DPO), robust, exo_pair, aot, aot_unpaired
and simpo. Deliberate difference: trl 1.16 ignores it for `sigmoid`; we apply cDPO there, as older trl
releases did and its CPO trainer still does. Values agree with trl at label_smoothing=0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_DEFAULTS = {"discopop_tau": 0.05, "bco_delta": 0.0, "simpo_gamma": 0.5}
NEEDS_KEYS = ("chosen_lengths", "rejected_lengths", "chosen_nll", *_DEFAULTS)


@dataclass(frozen=True)
class _Pairs:
    """The batch one loss sees: (B,) summed log-probs, fp32 or wider, and the hyper-parameters."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Optional[Tensor]
    ref_rejected: Optional[Tensor]
    beta: float
    label_smoothing: float
    needs: Mapping[str, Any]

    def need(self, key: str, loss: str) -> Any:
        if self.needs.get(key) is not None:  # None counts as absent, so a step may pass every key
            return self.needs[key]
        if key in _DEFAULTS:
            return _DEFAULTS[key]
        raise ValueError(f"loss_type {loss!r} needs `{key}=` in dpo_loss(**needs) (see mistral_train.losses.dpo)")

    def lengths(self, key: str, loss: str) -> Tensor:
        n = torch.as_tensor(self.need(key, loss), device=self.chosen.device).to(self.chosen.dtype)
        if n.shape != self.chosen.shape:
            raise ValueError(f"`{key}` must have shape {tuple(self.chosen.shape)}, got {tuple(n.shape)}")
        return n.clamp(min=1.0)  # an empty completion averages to 0 instead of 0/0

    @property
    def chosen_logratios(self) -> Tensor:  # (B,) log pi(y_w|x) - log pi_ref(y_w|x)
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected - self.ref_rejected

    @property
    def delta(self) -> Tensor:  # (B,) the implicit reward margin over beta
        return self.chosen_logratios - self.rejected_logratios


def _smoothed(p: _Pairs, z: Tensor) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): labels flipped with probability eps."""
    eps = p.label_smoothing
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _sigmoid(p: _Pairs) -> Tensor:
    # DPO, Rafailov et al. 2023 (arXiv 2305.18290); smoothing: cDPO, Mitchell 2023.
    return _smoothed(p, p.beta * p.delta)


def _hinge(p: _Pairs) -> Tensor:
    # SLiC-HF hinge, Zhao et al. 2023 (arXiv 2305.10425).
    return torch.relu(1 - p.beta * p.delta)


def _ipo(p: _Pairs) -> Tensor:
    # IPO, Azar et al. 2023 (arXiv 2310.12036) Eq. 17; per-token log-ratios as trl (confirmed by the authors).
    chosen = p.chosen_logratios / p.lengths("chosen_lengths", "ipo")
    rejected = p.rejected_logratios / p.lengths("rejected_lengths", "ipo")
    return (chosen - rejected - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> Tensor:
    # EXO-pref, Ji et al. 2024 (arXiv 2402.00856) Eq. 16: KL(model pair distribution || [1-eps, eps]).
    z = p.beta * p.delta
    eps = p.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(p: _Pairs) -> Tensor:
    # NCA, Chen et al. 2024 (arXiv 2402.05369): absolute rewards, so the chosen likelihood cannot fall.
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(p: _Pairs) -> Tensor:
    # rDPO, Chowdhury et al. 2024 (arXiv 2403.00409): unbiased under label-flip rate eps.
    z, eps = p.beta * p.delta, p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(p: _Pairs) -> Tensor:
    # BCO, Jung et al. 2024 (arXiv 2404.04656): each reward classified against the shift delta.
    delta = p.need("bco_delta", "bco_pair")
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def _sppo_hard(p: _Pairs) -> Tensor:
    # SPPO, Wu et al. 2024 (arXiv 2405.00675), hard win probability (1 for chosen, 0 for rejected).
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> Tensor:
    # AOT, Melnyk et al. 2024 (arXiv 2406.05882): sorted across the batch, so pairs are not kept.
    policy = torch.sort(p.chosen - p.rejected, dim=0).values
    ref = torch.sort(p.ref_chosen - p.ref_rejected, dim=0).values
    return _smoothed(p, p.beta * (policy - ref))


def _aot_unpaired(p: _Pairs) -> Tensor:
    # AOT unpaired variant (arXiv 2406.05882): chosen and rejected log-ratios sorted separately.
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _smoothed(p, p.beta * (chosen - rejected))


def _apo_zero(p: _Pairs) -> Tensor:
    # APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) Eq. 7: raise chosen, lower rejected.
    return 1 - torch.sigmoid(p.beta * p.chosen_logratios) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> Tensor:
    # APO-down (arXiv 2408.06266) Eq. 8: lower both, the rejected more.
    return torch.sigmoid(p.beta * p.chosen_logratios) + 1 - torch.sigmoid(p.beta * p.delta)


def _discopop(p: _Pairs) -> Tensor:
    # DiscoPOP, Lu et al. 2024 (arXiv 2406.08414) Eq. 5: logistic/exponential blend by the margin.
    z = p.beta * p.delta
    mix = torch.sigmoid(z / p.need("discopop_tau", "discopop"))
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(p: _Pairs) -> Tensor:
    # NLL of the chosen completions (RPO, Pang et al. 2024, arXiv 2404.19733; MPO's SFT term):
    # one token mean over the whole batch, as trl, broadcast to every pair.
    nll = -p.chosen.sum() / p.lengths("chosen_lengths", "sft").sum()
    return nll.expand(p.chosen.shape)


def _sigmoid_norm(p: _Pairs) -> Tensor:
    # Length-normalised DPO (per-token log-ratios, as in Tulu 3, arXiv 2411.15124).
    chosen = p.chosen_logratios / p.lengths("chosen_lengths", "sigmoid_norm")
    rejected = p.rejected_logratios / p.lengths("rejected_lengths", "sigmoid_norm")
    return -F.logsigmoid(p.beta * (chosen - rejected))


def _averages(p: _Pairs, loss: str) -> tuple[Tensor, Tensor]:
    return p.chosen / p.lengths("chosen_lengths", loss), p.rejected / p.lengths("rejected_lengths", loss)


def _simpo(p: _Pairs) -> Tensor:
    # SimPO, Meng et al. 2024 (arXiv 2405.14734): no reference, average log-probs, margin gamma.
    chosen, rejected = _averages(p, "simpo")
    return _smoothed(p, p.beta * (chosen - rejected - p.need("simpo_gamma", "simpo") / p.beta))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, switching at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo(p: _Pairs) -> Tensor:
    # ORPO, Hong et al. 2024 (arXiv 2403.07691) Eqs. 4, 7: NLL minus beta * log sigmoid(log odds ratio).
    chosen, rejected = _averages(p, "orpo")
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    nll = torch.as_tensor(p.need("chosen_nll", "orpo"), device=chosen.device).to(chosen.dtype)
    if nll.dim() and nll.shape != chosen.shape:
        raise ValueError(f"`chosen_nll` must be a scalar or shape {tuple(chosen.shape)}, got {tuple(nll.shape)}")
    return nll - p.beta * F.logsigmoid(log_odds)


DPO_LOSSES: dict[str, Callable[[_Pairs], Tensor]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
    "sft": _sft, "sigmoid_norm": _sigmoid_norm, "simpo": _simpo, "orpo": _orpo,
}
REFERENCE_FREE = frozenset({"sft", "simpo", "orpo"})  # never read the reference log-probs
_SMOOTHED = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"})


def _wide(x: Tensor) -> Tensor:
    # bf16/fp16 log-probs lose the margin in logsigmoid and ORPO's log1mexp: compute in fp32 at least.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check(loss_types: list[str], weights: Sequence[float], label_smoothing: float, needs: Mapping[str, Any]) -> None:
    if not loss_types:
        raise ValueError("loss_type must name at least one loss")
    unknown = [t for t in loss_types if t not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown[0]!r}; known: {', '.join(DPO_LOSSES)}")
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(weights)} loss_weights for {len(loss_types)} loss types {loss_types}")
    extra = sorted(set(needs) - set(NEEDS_KEYS))
    if extra:
        raise TypeError(f"dpo_loss got unexpected needs {extra}; accepted: {', '.join(NEEDS_KEYS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing > 0 and not _SMOOTHED & set(loss_types):
        raise ValueError(f"label_smoothing is ignored by {loss_types}; it is used by {sorted(_SMOOTHED)}")
    if "robust" in loss_types and label_smoothing >= 0.5:
        raise ValueError(f"robust needs label_smoothing (the flip rate) in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Optional[Sequence[float]] = None,
    **needs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss, trl 1.16's formulas, from summed completion log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference; may be None when
            every loss type is reference-free (sft, simpo, orpo).
        loss_type: a name from DPO_LOSSES, or a list of names whose per-pair losses are summed with
            `loss_weights` (default all 1.0), as trl's MPO combination.
        beta: temperature (the regularisation tau for ipo).
        label_smoothing: label-flip rate for the losses listed in the module docstring.
        **needs: extra inputs some losses read; see the module docstring.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,). Take `losses.mean()` for trl's loss.
        Rewards are detached: beta * (policy - ref) log-ratios (trl's DPO logs these for every
        type); for simpo/orpo without a reference-based type, beta * average policy log-probs
        (what trl's CPO/ORPO trainers log).
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    _check(types, weights, label_smoothing, needs)
    needs_ref = [t for t in types if t not in REFERENCE_FREE]
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {needs_ref[0]!r} needs ref_chosen_logps and ref_rejected_logps")
    given = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    for name, t in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), given):
        if t is not None and (t.dim() != 1 or t.shape != policy_chosen_logps.shape):
            raise ValueError(f"{name}_logps must be 1-D (B,) like policy_chosen_logps, got {tuple(t.shape)}")
    chosen, rejected, ref_c, ref_r = (None if t is None else _wide(t) for t in given)
    p = _Pairs(chosen, rejected, ref_c, ref_r, beta, label_smoothing, needs)

    losses = sum(w * DPO_LOSSES[t](p) for t, w in zip(types, weights))
    with torch.no_grad():
        averaged = [t for t in types if t in ("simpo", "orpo")]
        if averaged and not needs_ref:  # CPO/ORPO log beta * average policy log-probs
            chosen_avg, rejected_avg = _averages(p, averaged[0])
            chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
        elif ref_c is not None and ref_r is not None:
            chosen_rewards, rejected_rewards = beta * p.chosen_logratios, beta * p.rejected_logratios
        else:  # sft alone and no reference: beta * summed policy log-probs
            chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    return losses, chosen_rewards, rejected_rewards
