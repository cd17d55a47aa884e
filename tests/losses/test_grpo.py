"""grpo_loss and group_advantages against hand formulas written from the papers' definitions.

GRPO (Shao et al. 2024, eq. 3): per sequence, the mean over its tokens of min(r*A, clip(r, 1-e, 1+e)*A),
minus beta*KL with the k3 estimator; then the mean over sequences. BNPO: one mean over every token of the
batch. Dr. GRPO (Liu et al. 2025): the token sum over G * max_completion_length. DAPO (Yu et al. 2025):
decoupled clip (e_low, e_high) and the token sum over the tokens of the whole accumulated batch.
Each formula is a plain Python loop over tokens, independent of the vectorised code it checks.
"""

import math

import pytest
import torch

from mistral_train.errors import ConfigError
from mistral_train.losses import group_advantages, grpo_loss

B, T, MAX_LEN = 8, 6, 7


def _inputs():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = [6, 5, 1, 4, 6, 3, 2, 6]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    return logps, old, ref, adv, mask, lengths


def _token_objective(lp, old, ref, a, eps_low, eps_high, beta):
    """The per-token quantity each paper minimises: -(clipped surrogate) + beta * k3 KL."""
    r = math.exp(lp - old)
    surrogate = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    return -surrogate + beta * kl


def _hand(kind, logps, old, ref, adv, mask, lengths, eps_low=0.2, eps_high=0.2, beta=0.0, num_items=None):
    per_seq = []
    for i, n in enumerate(lengths):
        per_seq.append([_token_objective(logps[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item(),
                                         eps_low, eps_high, beta) for t in range(n)])
    total_tokens = sum(lengths)
    if kind == "grpo":
        return sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    if kind == "bnpo":
        return sum(map(sum, per_seq)) / total_tokens
    if kind == "dr_grpo":
        return sum(map(sum, per_seq)) / (len(per_seq) * MAX_LEN)
    return sum(map(sum, per_seq)) / (num_items or total_tokens)  # dapo


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("kind", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_equals_paper_formula(kind, beta):
    logps, old, ref, adv, mask, lengths = _inputs()
    eps_low, eps_high = (0.2, 0.28) if kind == "dapo" else (0.2, 0.2)
    num_items = 50 if kind == "dapo" else None
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type=kind, epsilon_low=eps_low, epsilon_high=eps_high,
                        beta=beta, ref_logps=ref, max_completion_length=MAX_LEN, num_items=num_items,
                        use_bias_correction_kl=False)  # the papers' KL has no importance weight
    want = _hand(kind, logps, old, ref, adv, mask, lengths, eps_low, eps_high, beta, num_items)
    assert loss.item() == pytest.approx(want, abs=1e-10)


def test_grpo_gradient_is_the_unclipped_tokens_ratio_times_advantage():
    """d/d logp of -min(rA, clip(r)A) is -rA where the unclipped term is the min, 0 where the clip binds."""
    logps, old, _, adv, mask, lengths = _inputs()
    leaf = logps.clone().requires_grad_(True)
    grpo_loss(leaf, old, adv, mask, loss_type="grpo")[0].backward()
    want = torch.zeros(B, T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for t in range(n):
            r, a = math.exp(logps[i, t].item() - old[i, t].item()), adv[i].item()
            clip_binds = (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
            want[i, t] = 0.0 if clip_binds else -r * a / n / B
    torch.testing.assert_close(leaf.grad, want, rtol=0, atol=1e-12)
    assert (want == 0).logical_and(mask.bool()).any()  # some token was clipped, so the test sees the clip


def test_dapo_micro_batches_sum_to_the_full_batch_loss():
    """num_items spans the accumulated batch: the two halves' losses add up to the whole batch's."""
    logps, old, _, adv, mask, _ = _inputs()
    whole, _ = grpo_loss(logps, old, adv, mask)
    n = int(mask.sum())
    halves = sum(grpo_loss(logps[s], old[s], adv[s], mask[s], num_items=n)[0] for s in (slice(0, 4), slice(4, 8)))
    assert halves.item() == pytest.approx(whole.item(), abs=1e-12)


def test_truncated_completions_masked_by_the_caller_do_not_count():
    """trl's mask_truncated_completions zeroes the rows without EOS; doing that to `mask` drops them."""
    logps, old, _, adv, mask, _ = _inputs()
    truncated = torch.tensor([False, True, False, False, True, False, False, False])
    masked = mask * ~truncated[:, None]
    leaf = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(leaf, old, adv, masked, loss_type="bnpo")
    loss.backward()
    kept = ~truncated
    want, _ = grpo_loss(logps[kept], old[kept], adv[kept], mask[kept], loss_type="bnpo")
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    assert leaf.grad[truncated].abs().sum() == 0


def test_group_advantages_hand_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    got = group_advantages(rewards, 4, scale="group")
    want = []
    for group in (rewards[:4].tolist(), rewards[4:].tolist()):
        mean = sum(group) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 3)  # unbiased, as trl
        want += [(x - mean) / (std + 1e-4) for x in group]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    none = group_advantages(rewards, 4, scale="none")
    torch.testing.assert_close(none, rewards - rewards.view(2, 4).mean(1).repeat_interleave(4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="ppo"), "loss_type='ppo'"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level='batch'"),
        (dict(beta=0.1), "needs ref_logps"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(sapo_temprature_pos=1.0), "sapo_temprature_pos"),
    ],
)
def test_bad_options_fail_naming_the_option(kwargs, message):
    logps, old, _, adv, mask, _ = _inputs()
    with pytest.raises(ConfigError, match=message):
        grpo_loss(logps, old, adv, mask, **kwargs)


def test_bad_advantage_inputs_fail_naming_the_problem():
    with pytest.raises(ConfigError, match="scale_rewards='groups'"):
        group_advantages(torch.zeros(8), 4, scale="groups")
    with pytest.raises(ConfigError, match="multiple of num_generations=3"):
        group_advantages(torch.zeros(8), 3)
