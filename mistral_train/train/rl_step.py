"""The GRPO and RLOO training step: per-token log-probs of sampled completions, then trl's loss.

A training micro-batch (built at rollout time by train/online.py) holds N completions:
  prompt_ids (N, T) left-padded, prompt_mask (N, T); completion_ids (N, C) right-padded, completion_mask
  (N, C) 1 on completion tokens through EOS (0 on a truncated row when mask_truncated_completions);
  advantages (N,); old_logps (N, C) when the window is reused (num_iterations > 1, and always for RLOO);
  ref_logps (N, C) for GRPO with beta > 0; `share` (scalar): the weight that turns this micro-batch's
  statistics into the window's mean (see below); `metric/<name>` scalars: the rollout's metrics.

Units, so that the loop's normalisation (loss_sum / units of the window, times the processes) is trl's:
- dapo, cispo, vespo: trl divides the token sum by the completion tokens of the whole window over all
  processes; so loss_sum is the token sum and the units are completion tokens (counted at rollout).
- every other GRPO type and RLOO: trl divides each micro-batch's loss by gradient_accumulation_steps (and
  DDP averages processes); so loss_sum is the micro-batch's loss and the unit is one micro-batch.
Every statistic is the micro-batch's value times `share` = window units / micro-batches of the window, so
the loop's sum / units is the plain mean over micro-batches, as trl averages its logged values.
"""

from __future__ import annotations

import torch

from mistral_train.config import GRPOSpec
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.losses.grpo import grpo_loss
from mistral_train.losses.rloo import rloo_loss
from mistral_train.train.steps import Batch, StepOutput

TOKEN_NORMALISED = ("dapo", "cispo", "vespo")  # trl: token sum / completion tokens of the whole window
METRIC = "metric/"  # prefix of the rollout metrics a micro-batch carries


def completion_logps(model: torch.nn.Module, batch: Batch, temperature: float, chunk: int) -> torch.Tensor:
    """Per-token log-probs (N, C) of the completion tokens under `model` at the sampling temperature
    (trl divides the logits by it before the log-softmax); 0 where completion_mask is 0.

    One forward over prompt + completion. Positions count real tokens only, as generation placed them, so
    a left-padded prompt is scored as it was sampled. The model's per-sequence reduction gives one value per
    token when every labelled token is its own "sequence": no (N, T, V) logits are formed.
    """
    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (N, T + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    N, T, C = input_ids.shape[0], prompt_mask.shape[1], completion_mask.shape[1]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, T:] = batch["completion_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
    token_index = torch.arange(N * (T + C), device=input_ids.device).view(N, T + C)  # each token its own sequence
    logps, _ = model(input_ids, attention_mask=attention_mask, position_ids=positions, labels=labels,
                     reduction="sequence", sequence_index=token_index, num_sequences=N * (T + C),
                     loss_chunk_size=chunk, temperature=temperature)
    return logps.view(N, T + C)[:, T:]  # (N, C): the log-prob of completion token c given what precedes it


def _loss_options(spec: GRPOSpec) -> dict:
    options = dict(spec.loss_options)
    if spec.delta is not None:
        options["delta"] = spec.delta
    return options


def grpo_step(spec: GRPOSpec, chunk: int):
    """The GRPO step function (model, batch) -> StepOutput, per the module docstring."""
    token_units = spec.loss_type in TOKEN_NORMALISED
    epsilon_high = spec.epsilon if spec.epsilon_high is None else spec.epsilon_high

    def step(model: torch.nn.Module, batch: Batch) -> StepOutput:
        mask = batch["completion_mask"]
        logps = completion_logps(model, batch, spec.temperature, chunk)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old  # one pass per rollout: the ratio is 1, its gradient is not 0
        loss, stats = grpo_loss(
            logps, old, batch["advantages"], mask, loss_type=spec.loss_type, epsilon_low=spec.epsilon,
            epsilon_high=epsilon_high, beta=spec.beta, ref_logps=batch.get("ref_logps"),
            importance_sampling_level=spec.importance_sampling_level,
            max_completion_length=spec.max_completion_length, num_items=1 if token_units else None,
            **_loss_options(spec))
        units = mask.sum() if token_units else 1
        return StepOutput(loss, units, _stats(stats, batch))

    return step


def rloo_step(spec: GRPOSpec, chunk: int):
    """The RLOO step function: sequence-level clipped ratio against the rollout's log-probs (always kept);
    the KL already sits in the advantages (a reward penalty), so no reference is read here."""
    epsilon_high = spec.epsilon if spec.epsilon_high is None else spec.epsilon_high

    def step(model: torch.nn.Module, batch: Batch) -> StepOutput:
        mask = batch["completion_mask"]
        logps = completion_logps(model, batch, spec.temperature, chunk)
        loss, stats = rloo_loss(logps, batch["old_logps"], batch["advantages"], mask.to(logps.dtype),
                                epsilon_low=spec.epsilon, epsilon_high=epsilon_high)
        return StepOutput(loss, 1, _stats(stats, batch))

    return step


def _stats(loss_stats: dict[str, float], batch: Batch) -> dict[str, torch.Tensor]:
    """The loss's and the rollout's statistics, each times the micro-batch's share (module docstring)."""
    share = batch["share"].float()
    out = {key: share * float(value) for key, value in loss_stats.items()}
    out.update({key[len(METRIC):]: share * value.float() for key, value in batch.items() if key.startswith(METRIC)})
    return out


def count_units(spec: GRPOSpec):
    """Units of a training micro-batch (the Objective's `count`): its completion tokens or 1 (module docstring)."""
    if spec.loss_type in TOKEN_NORMALISED:
        return lambda batch: int(batch["completion_mask"].sum())
    return lambda batch: 1
