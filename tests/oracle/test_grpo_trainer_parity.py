"""Our GRPO steps equal `trl.GRPOTrainer` 1.16's, with the same completions fed to both sides.

One tiny transformers Mistral (order-one random weights, the real 32000-token vocabulary) is saved to a folder;
trl trains it with its GRPOTrainer, we train it with fit(trainer.objective=grpo). Neither side samples: a fixed
table of completions replaces trl's `_generate_single_turn` and our `rollout.sampling.generate_completions`,
prompts are tokenized by our chat template on both sides, and trl's generation-batch shuffle is off
(tests/oracle/_trl_rl.py says why). Both use AdamW at a constant lr, no warmup, the same clipping, 2 prompts x 2
completions per micro-batch, 2 micro-batches per step, 3 steps. Compared per step: the loss, the pre-clip grad norm
and the metrics both log (reward, reward_std, rewards/<name>/mean, kl, clip ratios); at the end every weight.

trl's step 1 is also checked against a hand formula: at step 1 the policy is the one that "generated", so every
ratio is 1 and the KL to the reference is 0, and the loss is -A weighted as each loss type normalises:
dapo sum_i A_i L_i / sum_i L_i over the window; bnpo the same per micro-batch, averaged; dr_grpo
sum_i A_i L_i / (B * max_completion_length) per micro-batch, averaged; grpo the mean of A_i (0 for centred groups).
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.conftest import make_hf, tiny_kwargs  # noqa: E402
from tests.oracle._trl_helpers import hf_tokenizer  # noqa: E402
from tests.oracle._trl_rl import (  # noqa: E402
    ACCUM, BATCH, G, MAX_COMPLETION, REWARD_FUNCS, REWARD_WEIGHTS, ROWS, compare, completion_table, model_folder,
    our_run, prompt_ids_of, rewards_of, rows_in_our_order, trl_run, write_rows,
)

LR = 2e-2  # large enough that the ratios leave [1 - eps, 1 + eps] on a second pass (clipping is exercised)
# logged by both sides, besides the loss and grad norm (compare() checks them all)
REQUIRED = ("reward", "reward_std", *(f"rewards/{f.__name__}/mean" for f in REWARD_FUNCS),
            "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
            "completions/clipped_ratio")

# (loss_type, scale_rewards, beta, num_iterations, extra GRPOSpec settings)
CASES = [
    ("dapo", "group", 0.0, 1, {}),
    ("dapo", "group", 0.04, 2, {"epsilon_high": 0.28}),
    ("grpo", "group", 0.04, 2, {"importance_sampling_level": "sequence"}),  # GSPO
    ("bnpo", "batch", 0.0, 2, {"delta": 1.5}),
    ("dr_grpo", "none", 0.04, 1, {}),
    ("dapo", "batch", 0.0, 2, {"temperature": 0.7, "mask_truncated_completions": True}),
]


def _id(case) -> str:
    loss_type, scale, beta, iterations, extra = case
    return ",".join([loss_type, scale, f"beta={beta}", f"it={iterations}", *(f"{k}={v}" for k, v in extra.items())])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder with tokenizer.model, trl's tokenizer, the completion table), built once: neither side
    writes into the folder."""
    root = tmp_path_factory.mktemp("grpo_parity")
    folder = model_folder(make_hf, tiny_kwargs, root / "init")
    tokenizer = hf_tokenizer(root / "tokenizer")
    return folder, tokenizer, completion_table(ROWS, tokenizer.eos_token_id)


def trl_config(loss_type: str, scale: str, beta: float, iterations: int, extra: dict) -> dict:
    return dict(learning_rate=LR, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
                max_grad_norm=1.0, loss_type=loss_type, scale_rewards=scale, beta=beta, num_iterations=iterations,
                **extra)


def hand_step_one(loss_type: str, scale: str, table: dict, eos_id: int, mask_truncated: bool = False,
                  rows: list[dict] = ROWS) -> float:
    """Step 1's loss from the paper definitions: ratio 1, KL 0, so each token's loss is -A of its sequence."""
    window = rows[: BATCH * ACCUM // G]
    rewards = (rewards_of(window, table, eos_id) * torch.tensor(REWARD_WEIGHTS)).nansum(1)  # (8,): None adds 0
    groups = rewards.view(-1, G)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    std = {"group": groups.std(1).repeat_interleave(G), "batch": rewards.std().expand(len(rewards)),
           "none": None}[scale]
    adv = centred if std is None else centred / (std + 1e-4)
    completions = [ids for row in window for ids in table[tuple(prompt_ids_of(row))]]
    lengths = torch.tensor([float(len(ids)) for ids in completions])
    if mask_truncated:  # a truncated completion (no EOS) has no tokens in the loss
        lengths = lengths * torch.tensor([float(ids[-1] == eos_id) for ids in completions])
    if loss_type == "dapo":
        return float(-(adv * lengths).sum() / lengths.sum())
    micro = [slice(i, i + BATCH) for i in range(0, len(adv), BATCH)]
    if loss_type == "bnpo":
        return float(sum(-(adv[m] * lengths[m]).sum() / lengths[m].sum() for m in micro) / ACCUM)
    if loss_type == "dr_grpo":
        return float(sum(-(adv[m] * lengths[m]).sum() / (BATCH * MAX_COMPLETION) for m in micro) / ACCUM)
    assert loss_type == "grpo"
    return float(-adv[lengths > 0].sum() / len(adv))


def test_trl_step_one_equals_the_hand_formula(setup, tmp_path):
    """The trl side is what the harness claims, on its own: the fixed completions reach trl's loss in the
    window's order (no shuffle), rewards are the plain functions' (None included) on trl's own decoding, and its
    logged step-1 loss is the hand value. (Every parity case below checks its own step 1 by hand as well.)"""
    folder, tokenizer, table = setup
    logs, weights, _ = trl_run("grpo", folder, tokenizer, ROWS, tmp_path / "trl", table,
                               **trl_config("dapo", "group", 0.0, 1, {}))
    want = hand_step_one("dapo", "group", table, tokenizer.eos_token_id)
    assert abs(want) > 0.01, "the window does not tell the normalisations apart"
    assert logs[0]["loss"] == pytest.approx(want, abs=1e-6)
    # trl's decoding (transformers' tokenizer) gives the texts ours does
    rewards = rewards_of(ROWS[:4], table, tokenizer.eos_token_id,
                         lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    assert torch.isnan(rewards[:, 1]).any()  # the None path is taken
    assert logs[0]["rewards/exact_answer/mean"] == pytest.approx(float(rewards[:, 0].mean()), abs=1e-6)
    assert logs[0]["rewards/brevity/mean"] == pytest.approx(float(rewards[:, 1].nanmean()), abs=1e-6)
    assert logs[0]["reward"] == pytest.approx(float((rewards * torch.tensor(REWARD_WEIGHTS)).nansum(1).mean()),
                                              abs=1e-6)
    assert logs[0]["completions/clipped_ratio"] == 0.25  # one truncated completion in four
    assert [entry["step"] for entry in logs] == [1, 2, 3] and logs[1]["loss"] != logs[0]["loss"]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_grpo_steps_match_trl_grpo_trainer(setup, tmp_path, case):
    """3 steps of fit(trainer.objective=grpo) equal trl's GRPOTrainer: per-step loss, grad norm and logged
    metrics (1e-4), and every final weight (1e-4)."""
    folder, tokenizer, table = setup
    loss_type, scale, beta, iterations, extra = case
    ours, our_weights, calls = our_run(
        "grpo", folder, write_rows(tmp_path / "prompts.jsonl"), tmp_path / "ours", table,
        dict(loss_type=loss_type, scale_rewards=scale, beta=beta, num_iterations=iterations, reference="copy",
             **extra),
        lr=LR, beta1=0.9, beta2=0.95, weight_decay=0.0, grad_clip=1.0)
    rows = rows_in_our_order(calls, windows=-(-3 // iterations))
    theirs, trl_weights, _ = trl_run("grpo", folder, tokenizer, rows, tmp_path / "trl", table, **trl_config(*case))
    assert theirs[0]["loss"] == pytest.approx(hand_step_one(
        loss_type, scale, table, tokenizer.eos_token_id, extra.get("mask_truncated_completions", False), rows),
        abs=1e-6)
    compare(ours, theirs, our_weights, trl_weights, load_file(folder / "model.safetensors"), _id(case), REQUIRED)
    # the comparison reaches what the case is about: a second pass clips, the KL term is live
    assert max(r["grad_norm"] for r in theirs) > 1.0  # gradient clipping (at 1.0 on both sides) acted
    if iterations > 1:
        assert theirs[1]["clip_ratio/region_mean"] > 0.1
    if beta > 0:
        assert ours[1]["kl"] > 0.1 and theirs[1]["kl"] > 0.1
