"""grpo_loss / group_advantages against trl 1.16's own GRPOTrainer code, on identical random inputs.

trl computes the loss inside `GRPOTrainer._compute_loss(self, model, inputs)`; we call that method unbound
with a SimpleNamespace `self` carrying only the attributes it reads, and a `_get_per_token_logps_and_entropies`
that hands back our leaf tensor of log-probs, so the value and the gradient come from trl's own code.
Advantages come the same way from `_generate_and_score_completions`, generation and reward functions stubbed.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from mistral_train.losses import GRPO_LOSSES, group_advantages, grpo_loss
from tests.oracle._trl_rl import trl_score_window

B, T, MAX_LEN = 8, 6, 7
NEED_DEFAULTS = dict(delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                     vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, use_bias_correction_kl=True)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside 1 +- 0.2
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[3] = 0.0  # a zero-spread group's advantage: the sign tests (> 0, >= 0) must treat it as trl does
    old[7] = logps[7] - 4.0  # far off-policy (sequence log-ratio 24): clips bind, vespo's weight underflows
    lengths = torch.tensor([6, 5, 1, 4, 6, 3, 2, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    is_ratio = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return logps, old, ref, adv, mask, is_ratio


def _trl(loss_type, logps, old, ref, adv, mask, *, eps_low, eps_high, beta, level, num_items, is_ratio, **needs):
    """trl's loss, gradient w.r.t. logps, and the metrics it logged."""
    leaf = logps.clone().requires_grad_(True)
    args = SimpleNamespace(steps_per_generation=1, **{**NEED_DEFAULTS, **needs})
    metrics = {"train": defaultdict(list)}
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=args, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=metrics, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda t: t, reduce=lambda t, reduction: t,
                                    gather_for_metrics=lambda t: t),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(num_items)),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    logged = {k: v[0] for k, v in metrics["train"].items() if k != "entropy"}
    return loss.detach(), leaf.grad, logged


CASES = [
    dict(),
    dict(level="sequence"),
    dict(beta=0.04),
    dict(beta=0.04, use_bias_correction_kl=False),
    dict(beta=0.04, level="sequence"),
    dict(eps_low=0.1, eps_high=0.28),
    dict(delta=1.3),
    dict(num_items=57),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("loss_type", GRPO_LOSSES)
def test_loss_gradient_and_stats_equal_trl(loss_type, case):
    logps, old, ref, adv, mask, is_ratio = _inputs()
    case = dict(case)
    eps_low, eps_high = case.pop("eps_low", 0.2), case.pop("eps_high", 0.2)
    if loss_type == "cispo":  # CISPO's epsilon_high is the cap on the weight itself (trl suggests ~5)
        eps_high = 1.3
    beta, level = case.pop("beta", 0.0), case.pop("level", "token")
    num_items = case.pop("num_items", int(mask.sum()))
    vespo_is = is_ratio if loss_type == "vespo" else None
    if loss_type == "sapo":
        case.update(sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)
    if loss_type == "vespo":
        case.update(vespo_k_pos=1.5, vespo_lambda_neg=2.5)
    want, want_grad, want_stats = _trl(loss_type, logps, old, ref, adv, mask, eps_low=eps_low, eps_high=eps_high,
                                       beta=beta, level=level, num_items=num_items, is_ratio=vespo_is, **case)

    ours_in = logps.clone().requires_grad_(True)
    if vespo_is is not None:
        case["importance_sampling_ratio"] = vespo_is
    loss, stats = grpo_loss(ours_in, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                            beta=beta, ref_logps=ref, importance_sampling_level=level, max_completion_length=MAX_LEN,
                            num_items=num_items, **case)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, want_grad, rtol=0, atol=1e-6)
    assert want_grad.abs().sum() > 0  # the comparison is not between two zero gradients
    assert set(stats) == set(want_stats)
    for key, value in want_stats.items():
        assert stats[key] == pytest.approx(value, abs=1e-6), key


def test_inputs_exercise_both_clip_sides():
    """The parity above means something only if the random ratios clip on both sides with both signs."""
    logps, old, _, adv, mask, _ = _inputs()
    _, stats = grpo_loss(logps, old, adv, mask, loss_type="grpo")
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0


def _trl_advantages(rewards: torch.Tensor, num_generations: int, scale: str) -> torch.Tensor:
    """trl's advantages of `rewards` as the one reward function's column (generation stubbed; the group / batch
    statistics and the NaN handling are trl's own code)."""
    out, _ = trl_score_window(rewards.unsqueeze(1), torch.ones(1, dtype=rewards.dtype), ["r"], num_generations, scale)
    return out["advantages"]


@pytest.mark.parametrize("num_generations", [4, 2])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale, num_generations):
    rewards = torch.randn(B, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rewards[:num_generations] = 0.5  # one group with no spread: trl's 1e-4 keeps it finite (advantage 0)
    rewards[num_generations + 1] = float("nan")  # an unscorable completion: out of the stats, advantage 0
    want = _trl_advantages(rewards, num_generations, scale)
    got = group_advantages(rewards, num_generations, scale=scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert want.abs().max() > 0.1 and got[num_generations + 1] == 0
