"""kto_loss equals trl 1.16's KTOTrainer on identical inputs: loss, gradient, logged stats, KL estimate.

How trl is invoked: trl 1.16 has no separate kto_loss method; the loss is written inline in
`KTOTrainer._compute_loss(model, inputs, return_outputs)`, after the policy forwards. We build the
trainer with `object.__new__(KTOTrainer)` (no Trainer.__init__), set the attributes that method reads
(beta, loss_type, desirable/undesirable weights, calculate_KL, precomputed reference log-probs), and
pass a stand-in model: for the batch's `input_ids` it returns the per-token log-probs we chose for the
completions, for `KL_input_ids` those of the mismatched pairs (zero outside each completion, as trl's
fused head returns them). trl then sums them, splits the batch by `label`, estimates and gathers the KL
and computes its loss itself. Our side sums the same per-token tensors and calls `kto_loss`. Compared:
the loss, the gradient w.r.t. every per-token log-prob (the KL ones included: none on either side),
and every metric trl logs from the log-probs (kl, rewards/*, logps/*, rewards/margins).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from mistral_train.losses import KTO_LOSSES, kto_kl_estimate, kto_loss  # noqa: E402

T = 9  # sequence width; trl's shift keeps T - 1 log-prob columns
TOL = dict(rtol=1e-6, atol=1e-6)
# The metrics trl computes from the log-probs alone (entropy, logits/*, num_tokens come from the model).
LOGGED = ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins")


class _Accelerator:
    """One process, or several simulated: the FIRST gather (trl's KL mean) returns every rank's mean."""

    device = torch.device("cpu")

    def __init__(self, other_ranks_kl: Optional[list[float]] = None):
        self.others = other_ranks_kl

    def gather_for_metrics(self, x):
        if self.others is not None:
            others, self.others = torch.tensor(self.others, dtype=x.dtype), None
            return torch.cat((x.reshape(1), others))
        return x


class _Model:
    """A forward pass stand-in: per-token log-probs for the batch, or for the mismatched KL sequences."""

    training = True

    def __init__(self, batch_logps, kl_logps, kl_input_ids):
        self.batch_logps, self.kl_logps, self.kl_input_ids = batch_logps, kl_logps, kl_input_ids

    def __call__(self, input_ids, labels, **kwargs):
        per_token = self.kl_logps if input_ids is self.kl_input_ids else self.batch_logps
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)


def _random_batch(labels: list[bool], seed: int):
    """Per-token log-probs (B, T-1) for the examples and the mismatched pairs, masks (B, T), ref sums (B,)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(labels)

    def mask_and_logps():
        mask = torch.zeros(b, T, dtype=torch.long)
        for row in range(b):
            start = int(torch.randint(1, 4, (1,), generator=gen))
            mask[row, start : start + int(torch.randint(1, T - start + 1, (1,), generator=gen))] = 1
        return mask, -2 * torch.rand(b, T - 1, generator=gen, dtype=torch.float64) * mask[:, 1:]

    mask, per_token = mask_and_logps()
    kl_mask, kl_per_token = mask_and_logps()
    # References a few nats either side, so log-ratios take both signs; the mismatched pairs' mean
    # log-ratio is exactly -2 for even seeds (trl clamps it to 0) and +2 for odd ones (used as is).
    ref = per_token.sum(1) + 3.0 * torch.randn(b, generator=gen, dtype=torch.float64)
    noise = 3.0 * torch.randn(b, generator=gen, dtype=torch.float64)
    ref_kl = kl_per_token.sum(1) + noise - noise.mean() + (2.0 if seed % 2 == 0 else -2.0)
    return dict(labels=torch.tensor(labels), mask=mask, per_token=per_token, kl_mask=kl_mask,
                kl_per_token=kl_per_token, ref=ref, ref_kl=ref_kl)


def _trl(d, loss_type, beta, w_d, w_u, other_ranks_kl=None):
    per_token = d["per_token"].clone().requires_grad_(True)
    kl_per_token = d["kl_per_token"].clone().requires_grad_(True)
    kl_ids = torch.ones_like(d["kl_mask"])
    model = _Model(per_token, kl_per_token, kl_ids)
    trainer = object.__new__(KTOTrainer)  # skips Trainer.__init__: no model, data or accelerator set-up
    trainer.__dict__.update(
        accelerator=_Accelerator(other_ranks_kl), model=model, beta=beta, loss_type=loss_type,
        desirable_weight=w_d, undesirable_weight=w_u, calculate_KL=loss_type != "apo_zero_unpaired",
        precompute_ref_logps=True, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "input_ids": torch.zeros_like(d["mask"]), "attention_mask": torch.ones_like(d["mask"]),
        "completion_mask": d["mask"], "label": d["labels"], "ref_logps": d["ref"],
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": d["kl_mask"],
        "ref_KL_logps": d["ref_kl"],
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in LOGGED}
    return loss.detach(), per_token.grad, kl_per_token.grad, metrics


def _ours(d, loss_type, beta, w_d, w_u, gather=None):
    per_token = d["per_token"].clone().requires_grad_(True)
    kl_per_token = d["kl_per_token"].clone().requires_grad_(True)
    sums, kl_sums = per_token.sum(1), kl_per_token.sum(1)  # zeros outside the completions
    lab = d["labels"]
    loss, stats = kto_loss(
        sums[lab], sums[~lab], d["ref"][lab], d["ref"][~lab], kl_sums, d["ref_kl"], loss_type=loss_type,
        beta=beta, desirable_weight=w_d, undesirable_weight=w_u, gather=gather,
    )
    loss.backward()
    kl_grad = kl_per_token.grad if kl_per_token.grad is not None else torch.zeros_like(kl_per_token)
    return loss.detach(), per_token.grad, kl_grad, {k: float(v) for k, v in stats.items()}


def _assert_match(ours, trl):
    loss, grad, kl_grad, stats = ours
    t_loss, t_grad, t_kl_grad, t_stats = trl
    torch.testing.assert_close(loss, t_loss.to(loss.dtype), **TOL)
    torch.testing.assert_close(grad, t_grad, **TOL)
    assert t_kl_grad is None and not kl_grad.any()  # the KL estimate is detached on both sides
    assert stats.keys() == t_stats.keys()
    for key in stats:
        assert math.isclose(stats[key], t_stats[key], rel_tol=1e-6, abs_tol=1e-6), (key, stats[key], t_stats[key])


MIXED = [True, False, False, True, True, False, True]
CASES = [
    (loss_type, labels, beta, w_d, w_u)
    for loss_type in KTO_LOSSES
    for labels, beta, w_d, w_u in [
        (MIXED, 0.1, 1.0, 1.0),
        (MIXED, 0.5, 1.33, 0.7),  # unequal weights
        ([True] * 5, 0.3, 2.0, 0.5),  # desirable only
        ([False] * 4, 0.3, 2.0, 0.5),  # undesirable only
    ]
]


@pytest.mark.parametrize("loss_type, labels, beta, w_d, w_u", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_loss_gradient_and_stats_match_trl(loss_type, labels, beta, w_d, w_u, seed):
    d = _random_batch(labels, seed)
    _assert_match(_ours(d, loss_type, beta, w_d, w_u), _trl(d, loss_type, beta, w_d, w_u))


def test_batches_cover_both_kl_signs_so_the_clamp_is_exercised():
    """The parity seeds include a negative KL mean (clamped to 0) and a positive one (used as is)."""
    kls = [_trl(_random_batch(MIXED, s), "kto", 0.1, 1.0, 1.0)[3]["kl"] for s in (0, 1)]
    assert kls[0] == 0.0 and kls[1] == pytest.approx(2.0, abs=1e-9), kls


@pytest.mark.parametrize("other_ranks", [[4.0, -1.5], [-30.0]])
def test_kl_gathered_across_ranks_matches_trl(other_ranks):
    """With other processes' KL means, both average every rank's mean, then clamp (trl's order)."""
    d = _random_batch(MIXED, 0)

    def gather(local):
        return torch.cat((local.reshape(1), torch.tensor(other_ranks, dtype=local.dtype)))

    ours = _ours(d, "kto", 0.2, 1.0, 1.0, gather=gather)
    _assert_match(ours, _trl(d, "kto", 0.2, 1.0, 1.0, other_ranks_kl=other_ranks))
    local = float((d["kl_per_token"].sum(1) - d["ref_kl"]).mean())
    assert ours[3]["kl"] == pytest.approx(max(0.0, (local + sum(other_ranks)) / (1 + len(other_ranks))), abs=1e-12)


def test_kl_estimate_matches_trl_logged_kl():
    """kto_kl_estimate alone equals the `kl` trl logs for the same mismatched pairs."""
    for seed in (0, 1):
        d = _random_batch(MIXED, seed)
        trl_kl = _trl(d, "kto", 0.1, 1.0, 1.0)[3]["kl"]
        ours = kto_kl_estimate(d["kl_per_token"].sum(1), d["ref_kl"])
        assert float(ours) == pytest.approx(trl_kl, rel=1e-6, abs=1e-6)


def test_kto_hand_formula_from_the_paper():
    """Eq. 7 of arXiv 2402.01306 element by element with `math`: lambda_y - v(x, y), averaged over examples."""
    pc, rc = [-12.0, -30.5, -7.25], [-13.0, -28.0, -8.5]
    pu, ru = [-15.5, -22.0], [-14.0, -24.5]
    kl_p, kl_r = [-20.0, -11.0, -9.0, -30.0, -17.0], [-21.5, -10.0, -9.5, -31.0, -18.5]
    beta, lam_d, lam_u = 0.25, 1.5, 0.75
    z0 = max(0.0, sum(a - b for a, b in zip(kl_p, kl_r)) / len(kl_p))
    assert z0 > 0  # the reference point shifts every term

    def sig(z):
        return 1 / (1 + math.exp(-z))

    values = [lam_d * sig(beta * ((p - r) - z0)) for p, r in zip(pc, rc)]
    values += [lam_u * sig(beta * (z0 - (p - r))) for p, r in zip(pu, ru)]
    lambdas = [lam_d] * len(pc) + [lam_u] * len(pu)
    expected = sum(lam - v for lam, v in zip(lambdas, values)) / len(values)

    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    loss, stats = kto_loss(t(pc), t(pu), t(rc), t(ru), t(kl_p), t(kl_r), beta=beta,
                           desirable_weight=lam_d, undesirable_weight=lam_u)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(stats["kl"]) == pytest.approx(z0, rel=1e-12)
    assert float(stats["rewards/chosen"]) == pytest.approx(beta * sum(p - r for p, r in zip(pc, rc)) / 3, rel=1e-12)
