"""Objectives: what one micro-batch contributes to the loss. The loop is the same for all.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional, Union

import torch

from mistral_train.losses.ce import IGNORE_INDEX

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


OBJECTIVES = ("pretrain", "sft", "dpo", "reward")  # dpo and reward: train/preference.py


@dataclass(frozen=True)
class Objective:
    """A step function and the unit counter used to normalise it."""

    step: StepFn
    count: Callable[[Batch], int]


def get_objective(name: str, loss_chunk_size: int = 1024) -> Objective:
    """The objective named by `trainer.objective` (pretrain and sft: the same summed CE over labels)."""
    if name in ("pretrain", "sft"):
        return Objective(partial(pretrain_step, loss_chunk_size=loss_chunk_size), count_label_tokens)
    if name in OBJECTIVES:
        raise ValueError(f"trainer.objective {name!r} needs the model and its data: see train/preference.py")
    raise ValueError(f"trainer.objective {name!r} is not available; expected one of {list(OBJECTIVES)}")
