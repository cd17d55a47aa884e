"""dpo_loss: hand-written formulas for sigmoid (with label smoothing), ipo and hinge; shapes; errors.

The hand formulas are computed element by element with `math`, from the summed log-probs the
function takes, so a misplaced beta, a flipped sign, an ignored smoothing or ignored lengths
each change the value. Parity with trl itself is tests/oracle/test_dpo_trl_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from mistral_train.losses import DPO_LOSSES, dpo_loss

# Five pairs of summed completion log-probs (fp64). Margins of both signs and sizes; the chosen
# and rejected completion lengths differ, so per-token averaging changes every ipo value.
PC = [-12.0, -30.5, -7.25, -41.0, -18.0]
PR = [-15.5, -22.0, -9.0, -40.0, -25.5]
RC = [-13.0, -28.0, -8.5, -44.0, -17.0]
RR = [-14.0, -24.5, -8.0, -39.5, -21.0]
CL = [6, 20, 3, 31, 9]
RL = [9, 12, 5, 28, 17]


def _t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def _args():
    return _t(PC), _t(PR), _t(RC), _t(RR)


def _lengths():
    return {"chosen_lengths": torch.tensor(CL), "rejected_lengths": torch.tensor(RL)}


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def _full_needs():
    return {**_lengths(), "chosen_nll": torch.tensor(1.7, dtype=torch.float64)}


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_matches_hand_formula(eps):
    beta = 0.3
    losses, chosen_r, rejected_r = dpo_loss(*_args(), "sigmoid", beta=beta, label_smoothing=eps)
    for i in range(len(PC)):
        z = beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))
        want = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        assert losses[i].item() == pytest.approx(want, abs=1e-12)
        assert chosen_r[i].item() == pytest.approx(beta * (PC[i] - RC[i]), abs=1e-12)
        assert rejected_r[i].item() == pytest.approx(beta * (PR[i] - RR[i]), abs=1e-12)


def test_ipo_matches_hand_formula_on_per_token_log_ratios():
    beta = 0.2
    losses, _, _ = dpo_loss(*_args(), "ipo", beta=beta, **_lengths())
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) / CL[i] - (PR[i] - RR[i]) / RL[i]
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-12)


def test_hinge_matches_hand_formula_on_both_sides_of_the_margin():
    beta = 0.5
    losses, _, _ = dpo_loss(*_args(), "hinge", beta=beta)
    want = [max(0.0, 1 - beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))) for i in range(len(PC))]
    assert 0.0 in want and any(w > 1.0 for w in want)  # the data reach both branches of the hinge
    assert losses.tolist() == pytest.approx(want, abs=1e-12)


def test_simpo_matches_hand_formula_without_reference():
    beta, gamma, eps = 2.0, 0.8, 0.05
    losses, chosen_r, _ = dpo_loss(
        _t(PC), _t(PR), None, None, "simpo", beta=beta, label_smoothing=eps, simpo_gamma=gamma, **_lengths()
    )
    for i in range(len(PC)):
        z = beta * (PC[i] / CL[i] - PR[i] / RL[i] - gamma / beta)
        assert losses[i].item() == pytest.approx(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z), abs=1e-12)
        assert chosen_r[i].item() == pytest.approx(beta * PC[i] / CL[i], abs=1e-12)


def test_bco_pair_shift_by_running_mean():
    beta, delta = 0.1, 0.25
    losses, _, _ = dpo_loss(*_args(), "bco_pair", beta=beta, bco_delta=delta)
    for i in range(len(PC)):
        rc, rr = beta * (PC[i] - RC[i]), beta * (PR[i] - RR[i])
        assert losses[i].item() == pytest.approx(-_log_sigmoid(rc - delta) - _log_sigmoid(-(rr - delta)), abs=1e-12)


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES))
def test_every_loss_is_per_pair_differentiable_with_detached_rewards(loss_type):
    pc, pr, rc, rr = (x.clone().requires_grad_(i < 2) for i, x in enumerate(_args()))
    eps = 0.1 if loss_type == "exo_pair" else 0.0
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, loss_type, label_smoothing=eps, **_full_needs())
    for out in (losses, chosen_r, rejected_r):
        assert out.shape == (len(PC),) and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    losses.sum().backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()


def test_weighted_combination_is_the_weighted_sum():
    kinds, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined, chosen_r, _ = dpo_loss(*_args(), kinds, loss_weights=weights, **_lengths())
    parts = [dpo_loss(*_args(), k, **_lengths())[0] for k in kinds]
    torch.testing.assert_close(combined, sum(w * p for w, p in zip(weights, parts)), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_r, 0.1 * (_t(PC) - _t(RC)), rtol=0, atol=1e-12)


def test_sft_is_one_token_mean_over_the_batch():
    losses, _, _ = dpo_loss(*_args(), "sft", **_lengths())
    assert losses.tolist() == pytest.approx([-sum(PC) / sum(CL)] * len(PC), abs=1e-12)


def test_half_precision_inputs_are_computed_in_fp32():
    args = [x.to(torch.bfloat16) for x in _args()]
    losses, chosen_r, _ = dpo_loss(*args, "orpo", **_full_needs())
    assert losses.dtype == chosen_r.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(loss_type="dpo"), ValueError, ["'dpo'", "sigmoid", "sigmoid_norm", "simpo", "orpo"]),
        (dict(loss_type=[]), ValueError, ["at least one"]),
        (dict(loss_type="ipo"), ValueError, ["'ipo'", "chosen_lengths"]),
        (dict(loss_type="sft"), ValueError, ["'sft'", "chosen_lengths"]),
        (dict(loss_type="orpo", chosen_lengths=torch.ones(5), rejected_lengths=torch.ones(5)), ValueError,
         ["'orpo'", "chosen_nll"]),
        (dict(loss_type="ipo", chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(5)), ValueError,
         ["chosen_lengths", "(5,)"]),
        (dict(chosen_length=torch.ones(5)), TypeError, ["chosen_length", "chosen_lengths"]),
        (dict(loss_type="hinge", label_smoothing=0.1), ValueError, ["ignored", "robust"]),
        (dict(loss_type="exo_pair"), ValueError, ["exo_pair", "label_smoothing"]),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, ["robust", "0.5"]),
        (dict(label_smoothing=1.0), ValueError, ["[0, 1)"]),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, ["1 loss_weights", "2 loss types"]),
    ],
)
def test_errors_name_the_problem(kwargs, error, words):
    with pytest.raises(error) as info:
        dpo_loss(*_args(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_reference_required_unless_reference_free():
    pc, pr, _, _ = _args()
    with pytest.raises(ValueError, match="'sigmoid' needs ref_chosen_logps"):
        dpo_loss(pc, pr, None, None, "sigmoid")
    with pytest.raises(ValueError, match="'ipo' needs ref_chosen_logps"):
        dpo_loss(pc, pr, None, None, ["simpo", "ipo"], **_lengths())
    dpo_loss(pc, pr, None, None, ["simpo", "sft"], **_lengths())  # no reference read


def test_shapes_are_checked():
    pc, pr, rc, rr = _args()
    with pytest.raises(ValueError, match="ref_rejected_logps must be 1-D"):
        dpo_loss(pc, pr, rc, rr[:4])
    with pytest.raises(ValueError, match="policy_chosen_logps must be 1-D"):
        dpo_loss(pc[:, None], pr, rc, rr)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(pc, pr, rc, rr, "orpo", **_lengths(), chosen_nll=torch.ones(3))


def test_needs_passed_as_none_count_as_absent():
    """A training step may pass every needs key; None ones are ignored unless the loss reads them."""
    losses, _, _ = dpo_loss(*_args(), "sigmoid", chosen_nll=None, chosen_lengths=None, discopop_tau=None)
    torch.testing.assert_close(losses, dpo_loss(*_args(), "sigmoid")[0])
    with pytest.raises(ValueError, match="'ipo' needs `chosen_lengths=`"):
        dpo_loss(*_args(), "ipo", chosen_lengths=None, rejected_lengths=torch.ones(5))
