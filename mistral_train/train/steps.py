"""Steps: what one micro-batch contributes to the loss. The loop is the same for every objective
(train/objectives.py: which step each objective takes).

A step function maps (model, batch) to a `StepOutput`: the loss summed over the batch's units
(label tokens for language modelling, pairs for preference objectives), how many units there
are, and statistics summed over the same units (DPO's rewards, a reward model's accuracy) that
the loop logs as means. A count function gives `n_units` without running the model, so the loop
can total a whole accumulation window before any backward pass and normalise every micro-batch by it.

`pretrain` and `sft` share the step: summed next-token cross-entropy over the batch's labels.
They differ in their data (text.py rows with every token trained; sft.py examples with the
assistant spans trained, packed or padded), never in the loss, so the same optimisation that
pretrains also fine-tunes. Batch keys the model does not read (`pad_mask`, kept for metrics) are
dropped here.

DPO and reward models read batches of B pairs (data/preference.py: 2B sequences, the B chosen first);
their units are pairs. DPO's reference policy is train/reference.py's; its log-probs arrive as a function
or ride in the batch (`ref_logps`). Logged per pair, with trl's names: rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected. The reward model (a one-label
sequence-classification head) scores each row's last non-pad token, as transformers pools and trl's
RewardTrainer trains: Bradley-Terry (losses/reward.py) with an optional per-pair margin and reward
centring; logged: accuracy, reward mean of chosen and rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional, Union

import torch

from mistral_train.config import DPOSpec, RewardSpec
from mistral_train.data.pair_batches import num_pairs
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.losses.dpo import dpo_loss
from mistral_train.losses.reward import reward_loss

Batch = dict[str, torch.Tensor]


class StepOutput(NamedTuple):
    loss_sum: torch.Tensor  # scalar, differentiable: the loss summed over the batch's units
    n_units: Union[torch.Tensor, int]
    stats: Optional[dict[str, torch.Tensor]] = None  # detached sums over the same units, logged as means


StepFn = Callable[[torch.nn.Module, Batch], StepOutput]


def count_label_tokens(batch: Batch) -> int:
    """Tokens that carry a loss: labels after the shift (the first label predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pretrain_step(model: torch.nn.Module, batch: Batch, loss_chunk_size: int = 1024) -> StepOutput:
    """Next-token prediction on `input_ids` (B, T) with `labels` (B, T), -100 where ignored.

    Packed batches (with `position_ids` restarting per document) must not carry an attention_mask:
    given one, the model would stop reading document boundaries from the positions.

    Returns the summed cross-entropy (scalar, differentiable) and the label-token count.
    """
    if "position_ids" in batch and "attention_mask" in batch:
        raise ValueError("a packed batch (position_ids) must not carry an attention_mask: it would hide the "
                         "document boundaries; padding in packed rows is its own document")
    loss_sum = model(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        reduction="sum",
        loss_chunk_size=loss_chunk_size,
    )
    return StepOutput(loss_sum, (batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class Objective:
    """A step function and the unit counter used to normalise it.

    `draw`, set by objectives that make their own batches (GRPO/RLOO rollouts, train/online.py), replaces the
    loop's `next_window`: draw(model, batches, grad_accum_steps, num_processes, process_index) -> the same
    triple. Such an objective carries state a resume needs: `state_dict()` (tensors and plain values, saved in
    the checkpoint) and `load_state_dict(state)`."""

    step: StepFn
    count: Callable[[Batch], int]
    draw: Optional[Callable[..., tuple[list[Batch], int, list[Batch]]]] = None
    state_dict: Optional[Callable[[], dict]] = None
    load_state_dict: Optional[Callable[[dict], None]] = None


def language_model(loss_chunk_size: int = 1024) -> Objective:
    """pretrain and sft: the summed next-token cross-entropy over labels, per label token."""
    return Objective(partial(pretrain_step, loss_chunk_size=loss_chunk_size), count_label_tokens)


def sequence_logprobs(model: torch.nn.Module, batch: Batch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, counts), both (2B,): each sequence's summed completion log-prob and its token count."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sequence",
                 sequence_index=batch["sequence_index"], num_sequences=2 * num_pairs(batch),
                 loss_chunk_size=chunk)


def loss_types(spec: DPOSpec) -> list[str]:
    return [spec.loss_type] if isinstance(spec.loss_type, str) else list(spec.loss_type)


Reference = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (model, batch) -> (2B,) reference log-probs


def dpo_objective(spec: DPOSpec, reference: Optional[Reference], chunk: int) -> Objective:
    """The DPO step: one forward of the policy over the 2B sequences; the reference's log-probs from
    `ref_logps` in the batch, else from `reference` (None: reference-free losses); units are pairs."""
    def step(model: torch.nn.Module, batch: Batch) -> StepOutput:
        B = num_pairs(batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif reference is not None:
            ref = reference(model, batch)  # first: under no_grad, before the policy's graph exists
        else:
            ref = None
        logps, counts = sequence_logprobs(model, batch, chunk)
        chosen, rejected = logps[:B], logps[B:]
        needs = dict(chosen_lengths=counts[:B], rejected_lengths=counts[B:], simpo_gamma=spec.simpo_gamma,
                     discopop_tau=spec.discopop_tau)
        if "orpo" in loss_types(spec):  # ORPO's NLL term: chosen completion tokens, averaged
            needs["chosen_nll"] = -chosen.sum() / counts[:B].sum().clamp(min=1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, None if ref is None else ref[:B], None if ref is None else ref[B:],
            loss_type=spec.loss_type, beta=spec.beta, label_smoothing=spec.label_smoothing,
            loss_weights=spec.loss_weights, **needs)
        stats = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                 "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                 "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
        return StepOutput(losses.sum(), B, {k: v.detach().float() for k, v in stats.items()})

    return Objective(step, num_pairs)


def reward_objective(spec: RewardSpec) -> Objective:
    """The reward model's step: Bradley-Terry over the B pairs of a padded batch; units are pairs."""
    def step(model: torch.nn.Module, batch: Batch) -> StepOutput:
        B = num_pairs(batch)
        if "attention_mask" not in batch:
            raise ValueError("a reward model needs padded pair batches (data.packing=false): it scores one token per row")
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"]).squeeze(-1).float()  # (2B,)
        loss, accuracy = reward_loss(scores[:B], scores[B:], margin=batch.get("margin"),
                                     center_rewards_coefficient=spec.center_rewards_coefficient)
        stats = {"accuracy": accuracy * B, "rewards/chosen": scores[:B].sum(), "rewards/rejected": scores[B:].sum()}
        return StepOutput(loss * B, B, {k: v.detach() for k, v in stats.items()})

    return Objective(step, num_pairs)
