"""Our RLOO steps equal `trl.RLOOTrainer` 1.16's, with the same completions fed to both sides.

The set-up is test_grpo_trainer_parity.py's (tests/oracle/_trl_rl.py): one saved tiny transformers Mistral, a
fixed completion table instead of sampling on both sides, our chat template for the prompts, trl reading the rows
in the order our rollouts drew them, AdamW at a constant lr, clipping, 2 prompts x 2 completions per micro-batch,
2 micro-batches per step, 3 steps. RLOO differs from GRPO in what is compared: leave-one-out advantages, the KL as
a reward penalty (beta times the summed first-order log-ratio to the reference, taken at rollout time), and one
PPO-clipped ratio per sequence, averaged over sequences.

trl's step 1 is checked by hand too: with two completions per prompt the leave-one-out advantages of a group
are +-(r1 - r2), the ratios are 1 and the KL penalty is 0, so the loss is exactly 0 and the logged reward is the
plain functions' weighted mean; the gradient is not 0 (grad norm > 0).
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.conftest import make_hf, tiny_kwargs  # noqa: E402
from tests.oracle._trl_helpers import hf_tokenizer  # noqa: E402
from tests.oracle._trl_rl import (  # noqa: E402
    REWARD_FUNCS, REWARD_WEIGHTS, ROWS, compare, completion_table, model_folder, our_run, rewards_of,
    rows_in_our_order, trl_run, write_rows,
)

LR = 2e-2  # the second pass over a rollout moves the sequence ratios outside [0.8, 1.2]: clipping is exercised
REQUIRED = ("reward", "reward_std", *(f"rewards/{f.__name__}/mean" for f in REWARD_FUNCS),
            "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length")

# (beta, num_iterations, extra settings with the same name in RLOOConfig and our GRPOSpec)
CASES = [
    (0.05, 1, {}),  # trl's default beta
    (0.0, 2, {"normalize_advantages": True}),
    (0.05, 2, {"epsilon_high": 0.28, "mask_truncated_completions": True}),
]


def _id(case) -> str:
    beta, iterations, extra = case
    return ",".join([f"beta={beta}", f"it={iterations}", *(f"{k}={v}" for k, v in extra.items())])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rloo_parity")
    folder = model_folder(make_hf, tiny_kwargs, root / "init")
    tokenizer = hf_tokenizer(root / "tokenizer")
    return folder, tokenizer, completion_table(ROWS, tokenizer.eos_token_id)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_rloo_steps_match_trl_rloo_trainer(setup, tmp_path, case):
    """3 steps of fit(trainer.objective=rloo) equal trl's RLOOTrainer: per-step loss, grad norm and logged
    metrics (1e-4), and every final weight (1e-4)."""
    folder, tokenizer, table = setup
    beta, iterations, extra = case
    ours, our_weights, calls = our_run(
        "rloo", folder, write_rows(tmp_path / "prompts.jsonl"), tmp_path / "ours", table,
        dict(beta=beta, num_iterations=iterations, reference="copy", **extra),
        lr=LR, beta1=0.9, beta2=0.95, weight_decay=0.0, grad_clip=1.0)
    rows = rows_in_our_order(calls, windows=-(-3 // iterations))
    theirs, trl_weights, _ = trl_run(
        "rloo", folder, tokenizer, rows, tmp_path / "trl", table, learning_rate=LR, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, beta=beta, num_iterations=iterations,
        **extra)
    # trl's step 1 by hand (module docstring)
    rewards = rewards_of(rows[:4], table, tokenizer.eos_token_id,
                         lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) @ torch.tensor(REWARD_WEIGHTS)
    assert theirs[0]["loss"] == pytest.approx(0.0, abs=1e-7) and theirs[0]["grad_norm"] > 0.1
    assert theirs[0]["reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)
    compare(ours, theirs, our_weights, trl_weights, load_file(folder / "model.safetensors"), _id(case), REQUIRED)
    # the comparison reaches what the case is about: a second pass clips, the KL penalty is live
    assert max(r["grad_norm"] for r in theirs) > 1.0  # gradient clipping (at 1.0 on both sides) acted
    if iterations > 1:
        assert theirs[1]["clip_ratio/region_mean"] > 0.1
    if beta > 0:  # trl logs RLOO's KL when it generates: the first rollout after an update
        later = next(i for i in range(1, len(theirs)) if "kl" in theirs[i])
        assert abs(theirs[later]["kl"]) > 1e-3 and ours[later]["kl"] == pytest.approx(theirs[later]["kl"], abs=1e-4)
