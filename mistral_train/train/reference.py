"""DPO's reference policy: which one a run uses, built as a function of (policy, batch), or precomputed.

The reference, by `trainer.dpo.reference`:
  copy             a frozen copy of the starting model (full fine-tuning)
  adapter_off      the same model with its adapters switched off (LoRA/QLoRA: the base model)
  initial_adapter  the adapter the run started from (adapter.path), frozen: when DPO continues an
                   SFT adapter, the reference is that SFT model, not the bare base (trl#1340)
  none             reference-free losses (simpo, orpo)
  auto             initial_adapter when continuing an adapter, adapter_off for a fresh one, copy
                   without adapters, none for reference-free losses
With `precompute_reference`, the reference log-probs are computed once before training and ride in the
batches (`ref_logps`, train/reference_cache.py). The reference pass always runs before the policy's
forward and under no_grad in eval mode, so nothing it touches is saved for the backward. The DPO step
itself is train/steps.py's `dpo_objective`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch

from mistral_train.adapters import disable_adapters, peft_state_dict
from mistral_train.adapters.peft_format import load_adapter_weights_from_tensors
from mistral_train.config import AdapterSpec, DPOSpec
from mistral_train.data.pair_batches import attach_reference
from mistral_train.train.reference_cache import load_or_compute
from mistral_train.train.steps import Batch, Objective, Reference, dpo_objective, loss_types, sequence_logprobs

REFERENCES = ("auto", "copy", "adapter_off", "initial_adapter", "none")
REFERENCE_FREE = ("simpo", "orpo")
def resolve_reference(spec: DPOSpec, adapter: AdapterSpec, key: str = "trainer.dpo", free: Optional[bool] = None) -> str:
    """The reference kind `auto` stands for, checked against the run (see the module docstring). `key` names the
    spec in errors; `free`: whether the loss needs no reference (default: DPO's reference-free loss types)."""
    if spec.reference not in REFERENCES:
        raise ValueError(f"{key}.reference must be one of {REFERENCES}, got {spec.reference!r}")
    free = all(t in REFERENCE_FREE for t in loss_types(spec)) if free is None else free
    kind = spec.reference
    if kind == "auto":
        kind = "none" if free else "copy" if adapter.kind == "none" else "initial_adapter" if adapter.path else "adapter_off"
    if kind in ("adapter_off", "initial_adapter") and adapter.kind == "none":
        raise ValueError(f"{key}.reference={kind} needs adapter=lora or qlora; full fine-tuning uses a frozen copy")
    if kind == "initial_adapter" and not adapter.path:
        raise ValueError(f"{key}.reference=initial_adapter needs adapter.path, the adapter the run starts from")
    if kind == "none" and not free:
        raise ValueError(f"{key}.reference=none only suits reference-free losses {REFERENCE_FREE}, "
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


def build_reference(kind: str, model: torch.nn.Module, chunk: int,
                    score: Optional[Reference] = None) -> Optional[Reference]:
    """The reference policy as a function of (policy model, batch); None for `none`. Call it on the
    unwrapped model at the start of training, before the first update (it snapshots what it needs).
    `score(model, batch)` is what the reference computes: default DPO's per-sequence log-probs (2B,);
    GRPO passes its per-token completion log-probs (train/rl_step.py)."""
    if kind == "none":
        return None
    if score is None:
        score = lambda m, batch: sequence_logprobs(m, batch, chunk)[0]  # noqa: E731
    if kind == "copy":
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return lambda _model, batch: score(frozen, batch)
    if kind == "adapter_off":
        def adapter_off(policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
            with _reference_mode(policy), disable_adapters(_unwrap(policy)):
                return score(policy, batch)

        return adapter_off
    start = peft_state_dict(model)  # the adapter the run started from (a copy of a few MB)

    def initial_adapter(policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
        unwrapped = _unwrap(policy)
        with _reference_mode(policy), swapped_adapter(unwrapped, start):
            return score(policy, batch)

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


def dpo_with_reference(cfg, model: torch.nn.Module, data, pad_id: int, accelerator) -> Objective:
    """The objective of a dpo run (its entry's builder, train/objectives.py). Called right after the model is
    built and on its device, before any checkpoint is loaded into it: the reference is the policy the run
    STARTS from."""
    spec = cfg.trainer
    kind = resolve_reference(spec.dpo, cfg.adapter)
    reference = build_reference(kind, model, spec.loss_chunk_size)
    if reference is not None and spec.dpo.precompute_reference:
        table, path, computed = load_or_compute(cfg, data, kind, model, reference, accelerator.device,
                                                accelerator.autocast, accelerator.is_main_process,
                                                accelerator.wait_for_everyone)
        attach_reference(data, table)  # one collate swap: training and held-out batches carry ref_logps
        if accelerator.is_main_process:
            print(f"reference log-probs ({kind}) of {len(table)} pairs {'computed and cached in' if computed else 'read from'} {path}")
        reference = None  # the batches carry them: no reference model is kept while training
    return dpo_objective(spec.dpo, reference, spec.loss_chunk_size)
