"""kto_loss: the apo_zero_unpaired hand formula, its gradient, dtype widening and the errors.

Parity with trl itself (every loss type, weights, one-class batches, the gathered KL) and KTO's paper
formula are in tests/oracle/test_kto_loss_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from mistral_train.losses import kto_kl_estimate, kto_loss


def _t(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


PC, RC = [-12.0, -30.5, -7.25], [-13.0, -28.0, -8.5]
PU, RU = [-15.5, -22.0], [-14.0, -24.5]
KL_P, KL_R = [-20.0, -11.0], [-25.0, -12.0]  # mean log-ratio +3: would shift kto, must not touch apo


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_apo_zero_unpaired_hand_formula_ignores_the_kl_pairs():
    beta, w_d, w_u = 0.5, 1.25, 0.5
    chosen = [w_d * (1 - _sig(beta * (p - r))) for p, r in zip(PC, RC)]
    rejected = [w_u * _sig(beta * (p - r)) for p, r in zip(PU, RU)]
    expected = (sum(chosen) + sum(rejected)) / 5
    args = (_t(PC), _t(PU), _t(RC), _t(RU))
    kw = dict(loss_type="apo_zero_unpaired", beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    without, stats = kto_loss(*args, **kw)
    with_kl, _ = kto_loss(*args, _t(KL_P), _t(KL_R), **kw)
    assert float(without) == pytest.approx(expected, rel=1e-12)
    assert float(with_kl) == float(without) and float(stats["kl"]) == 0.0


def test_kto_gradient_by_hand():
    """d loss / d policy logp = -w * beta * s(1-s) / n for desirable, +w * beta * s(1-s) / n for undesirable."""
    beta, w_d, w_u = 0.3, 2.0, 0.5
    pc, pu = _t(PC).requires_grad_(True), _t(PU).requires_grad_(True)
    loss, _ = kto_loss(pc, pu, _t(RC), _t(RU), _t(KL_P), _t(KL_R), beta=beta, desirable_weight=w_d,
                       undesirable_weight=w_u)
    loss.backward()
    z0 = 3.0
    for got, p, r in zip(pc.grad.tolist(), PC, RC):
        s = _sig(beta * (p - r - z0))
        assert got == pytest.approx(-w_d * beta * s * (1 - s) / 5, rel=1e-12)
    for got, p, r in zip(pu.grad.tolist(), PU, RU):
        s = _sig(beta * (z0 - (p - r)))
        assert got == pytest.approx(w_u * beta * s * (1 - s) / 5, rel=1e-12)


def test_bf16_log_probs_are_computed_in_fp32():
    args = [_t(x, torch.bfloat16) for x in (PC, PU, RC, RU, KL_P, KL_R)]
    loss, stats = kto_loss(*args)
    assert loss.dtype == torch.float32 and stats["kl"].dtype == torch.float32
    wide, _ = kto_loss(*[a.double() for a in args])
    assert float(loss) == pytest.approx(float(wide), rel=1e-6)


def test_kl_estimate_is_detached_and_clamped():
    p = _t([-3.0, -1.0]).requires_grad_(True)
    assert not kto_kl_estimate(p, _t([-1.0, 0.0])).requires_grad
    assert float(kto_kl_estimate(p, _t([-1.0, 0.0]))) == 0.0  # mean log-ratio -1.5 clamps to 0
    assert float(kto_kl_estimate(p, _t([-4.0, -3.0]))) == pytest.approx(1.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="sigmoid"), "unknown KTO loss_type 'sigmoid'"),
        (dict(policy_kl_logps=None), "needs policy_kl_logps and ref_kl_logps"),
        (dict(ref_chosen_logps=_t([-1.0, -2.0])), "policy_chosen_logps and ref_chosen_logps must be 1-D"),
        (dict(policy_kl_logps=_t([]), ref_kl_logps=_t([])), "at least one mismatched pair"),
        (dict(policy_chosen_logps=_t([]), ref_chosen_logps=_t([]), policy_rejected_logps=_t([]),
              ref_rejected_logps=_t([])), "both are empty"),
    ],
)
def test_errors_name_the_argument(kwargs, message):
    args = dict(policy_chosen_logps=_t(PC), policy_rejected_logps=_t(PU), ref_chosen_logps=_t(RC),
                ref_rejected_logps=_t(RU), policy_kl_logps=_t(KL_P), ref_kl_logps=_t(KL_R))
    with pytest.raises(ValueError, match=message):
        kto_loss(**{**args, **kwargs})
