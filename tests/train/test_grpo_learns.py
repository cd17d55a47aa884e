"""GRPO learns what it is rewarded for: the real rollout (our sampling on the live policy), the real step and
the loop's backward_window, on a tiny random model (vocabulary 64). The reward is read from the sampled ids
(the share of completion tokens below id 32: about 0.5 by chance, spread within every group). Its mean climbs
within a few optimizer steps, and falls when the reward is negated. A sign error in the advantages, log-probs
scored for tokens other than those sampled (a shift, a misplaced left-padded prompt), sampling from a model
other than the one trained, or a step that never reaches the weights would leave it flat or move it the wrong
way. (The recipe-level claim, tiny_grpo raising held-out exact match, is tests/test_rl_recipes.py's.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mistral_train.config import GRPOSpec
from mistral_train.rollout.rewards import RewardSet
from mistral_train.train.loop import backward_window
from mistral_train.train.online import Rollout, online_objective
from tests._tiny import tiny_model
from tests.train.test_online import EOS, PAD, prompt_batches

LOW = 32  # half of tests._tiny's vocabulary of 64


class LowIds:
    """Stand-in RewardSet: sign x the share of a completion's tokens with an id below LOW."""

    names = ["low_ids"]
    weights = torch.tensor([1.0])
    combine = RewardSet.combine  # the real weighted nansum

    def __init__(self, sign: float):
        self.sign = sign

    def score(self, prompts, completions, rows, completion_ids, **_):
        return torch.tensor([[self.sign * sum(i < LOW for i in ids) / max(len(ids), 1)] for ids in completion_ids])


def _mean_rewards(sign: float, steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    model = tiny_model()
    spec = GRPOSpec(num_generations=8, max_completion_length=6, temperature=1.0, loss_type="dapo", beta=0.0)
    rows = [{"prompt": f"q{i}", "fields": {}} for i in range(8)]
    rollout = Rollout(spec, False, LowIds(sign), lambda ids: "x" * len(ids), rows, EOS, PAD, None, lambda m: m,
                      lambda t: t, torch.device("cpu"), contextlib.nullcontext, 16, seed=0)
    objective = online_objective(spec, False, 16, rollout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    batches, rewards = prompt_batches(8, prompts=4), []
    for _ in range(steps):
        window, units, _ = objective.draw(model, batches, 1)
        rewards.append(float(window[0]["metric/reward"]))
        backward_window(model, objective, window, contextlib.nullcontext, n_tokens=units)
        optimizer.step()
        optimizer.zero_grad()
    return rewards


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_raises_the_training_reward_it_is_given(sign):
    rewards = _mean_rewards(sign)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert 0.3 < sign * first < 0.7, rewards  # chance level: the reward has room to climb
    assert last > first + 0.15, rewards  # the reward it was given rose (sign -1: low ids fell)
