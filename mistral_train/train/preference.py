"""Preference objectives: DPO (and its loss family) with a reference policy, and reward models.

Both read batches of B pairs collated by data/preference.py: 2B sequences, the B chosen first.

DPO (`trainer.objective=dpo`): one forward of the policy over all 2B sequences gives each one's summed
completion log-prob (computed in chunks, never the full logits); the reference gives the same for the
reference policy; `losses.dpo.dpo_loss` turns the four into per-pair losses. The reference, by
`trainer.dpo.reference`:
  copy             a frozen copy of the starting model (full fine-tuning)
  adapter_off      the same model with its adapters switched off (LoRA/QLoRA: the base model)
  initial_adapter  the adapter the run started from (adapter.path), frozen: when DPO continues an
                   SFT adapter, the reference is that SFT model, not the bare base (trl#1340)
  none             reference-free losses (simpo, orpo)
  auto             initial_adapter when continuing an adapter, adapter_off for a fresh one, copy
                   without adapters, none for reference-free losses
With `precompute_reference`, the reference log-probs are computed once before training and ride in the
batches (`ref_logps`, train/reference_cache.py). The reference pass always runs before the policy's
forward and under no_grad in eval mode, so nothing it touches is saved for the backward.

Logged per pair, with trl's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected.

Reward (`trainer.objective=reward`): a sequence-classification model (one label) scores the rightmost
token of each row whose id is not the pad id, as transformers' MistralForSequenceClassification pools
(and trl's RewardTrainer trains): with the Mistral tokenizers pad == EOS, so that is the answer's last
token before its EOS. `losses.reward.reward_loss` is Bradley-Terry with an optional per-pair margin and
reward centring. Logged: accuracy, reward mean of chosen and rejected.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Optional

import torch

from mistral_train.adapters import disable_adapters, peft_state_dict
from mistral_train.adapters.peft_format import load_adapter_weights_from_tensors
from mistral_train.config import AdapterSpec, DPOSpec, RewardSpec
from mistral_train.data.pair_batches import attach_reference, num_pairs
from mistral_train.losses.dpo import dpo_loss
from mistral_train.losses.reward import reward_loss
from mistral_train.train.reference_cache import load_or_compute
from mistral_train.train.steps import Batch, Objective, StepOutput

REFERENCES = ("auto", "copy", "adapter_off", "initial_adapter", "none")
REFERENCE_FREE = ("simpo", "orpo")
Reference = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (model, batch) -> (2B,) reference log-probs


def sequence_logprobs(model: torch.nn.Module, batch: Batch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, counts), both (2B,): each sequence's summed completion log-prob and its token count."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sequence",
                 sequence_index=batch["sequence_index"], num_sequences=2 * num_pairs(batch),
                 loss_chunk_size=chunk)


def _loss_types(spec: DPOSpec) -> list[str]:
    return [spec.loss_type] if isinstance(spec.loss_type, str) else list(spec.loss_type)


def resolve_reference(spec: DPOSpec, adapter: AdapterSpec) -> str:
    """The reference kind `auto` stands for, checked against the run (see the module docstring)."""
    if spec.reference not in REFERENCES:
        raise ValueError(f"trainer.dpo.reference must be one of {REFERENCES}, got {spec.reference!r}")
    free = all(t in REFERENCE_FREE for t in _loss_types(spec))
    kind = spec.reference
    if kind == "auto":
        kind = "none" if free else "copy" if adapter.kind == "none" else "initial_adapter" if adapter.path else "adapter_off"
    if kind in ("adapter_off", "initial_adapter") and adapter.kind == "none":
        raise ValueError(f"trainer.dpo.reference={kind} needs adapter=lora or qlora; full fine-tuning uses a frozen copy")
    if kind == "initial_adapter" and not adapter.path:
        raise ValueError("trainer.dpo.reference=initial_adapter needs adapter.path, the adapter the run starts from")
    if kind == "none" and not free:
        raise ValueError(f"trainer.dpo.reference=none only suits reference-free losses {REFERENCE_FREE}, "
                         f"not {spec.loss_type!r}")
    return kind


@contextlib.contextmanager
def _reference_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def build_reference(kind: str, model: torch.nn.Module, chunk: int) -> Optional[Reference]:
    """The reference policy as a function of (policy model, batch); None for `none`. Call it on the
    unwrapped model at the start of training, before the first update (it snapshots what it needs)."""
    if kind == "none":
        return None
    if kind == "copy":
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return lambda _model, batch: sequence_logprobs(frozen, batch, chunk)[0]
    if kind == "adapter_off":
        def adapter_off(policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
            with _reference_mode(policy), disable_adapters(_unwrap(policy)):
                return sequence_logprobs(policy, batch, chunk)[0]

        return adapter_off
    start = peft_state_dict(model)  # the adapter the run started from (a copy of a few MB)

    def initial_adapter(policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
        unwrapped = _unwrap(policy)
        with _reference_mode(policy), swapped_adapter(unwrapped, start):
            return sequence_logprobs(policy, batch, chunk)[0]

    return initial_adapter


@contextlib.contextmanager
def swapped_adapter(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run with the adapter tensors `tensors` (PEFT keys) in place of the current ones, then put them back.
    Used under no_grad before the policy's forward, so no saved activation sees the swap."""
    current = peft_state_dict(model)
    load_adapter_weights_from_tensors(model, tensors)
    try:
        yield
    finally:
        load_adapter_weights_from_tensors(model, current)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP and friends keep the model as .module


def dpo_objective(spec: DPOSpec, reference: Optional[Reference], chunk: int) -> Objective:
    """The DPO step (see the module docstring); units are pairs."""
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
        if "orpo" in _loss_types(spec):  # ORPO's NLL term: chosen completion tokens, averaged
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


def preference_objective(cfg, model: torch.nn.Module, data, pad_id: int, accelerator) -> Objective:
    """The objective of a dpo or reward run. Call right after the model is built and on its device, before
    any checkpoint is loaded into it: the reference is the policy the run STARTS from."""
    spec = cfg.trainer
    if spec.objective == "reward":
        return reward_objective(spec.reward)
    kind = resolve_reference(spec.dpo, cfg.adapter)
    reference = build_reference(kind, model, spec.loss_chunk_size)
    if reference is not None and spec.dpo.precompute_reference:
        table, path, computed = load_or_compute(cfg, data, kind, model, reference, pad_id, accelerator.device,
                                                accelerator.autocast, accelerator.is_main_process,
                                                accelerator.wait_for_everyone)
        attach_reference(data, table, cfg.data.packing, spec.max_seq_len, pad_id)
        if accelerator.is_main_process:
            print(f"reference log-probs ({kind}) of {len(table)} pairs {'computed and cached in' if computed else 'read from'} {path}")
        reference = None  # the batches carry them: no reference model is kept while training
    return dpo_objective(spec.dpo, reference, spec.loss_chunk_size)
