"""KTO's step (trainer.objective=kto): unpaired desirable / undesirable completions, trl 1.16 KTOTrainer's loss.

A batch (data/unpaired.py) holds B examples, prompt + completion with labels on the completion, their
`label` (True: desirable) and, for loss_type `kto`, B mismatched sequences (prompt i, completion i - 1)
under `kl_` keys. Per micro-batch, as trl computes it:
  - the reference's summed completion log-probs of the B sequences and the mismatched ones (first, under
    no_grad, before the policy's graph exists; train/reference.py builds the reference as for DPO);
  - the policy's log-probs of the mismatched sequences, without a graph: they only set the reference point
    z0 = max(0, mean(policy - reference)), which kto_loss detaches anyway (trl's KL forward);
  - the policy's log-probs of the B sequences, then `kto_loss` (losses/kto.py): the mean over the B examples
    of the desirable / undesirable losses, weighted by trainer.kto.desirable_weight / undesirable_weight.
Units are examples: the step returns the micro-batch's mean loss times B, so a window of k equal
micro-batches trains on the mean of their means, as trl's gradient accumulation does.

Logged with trl's names: kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected.
Each is the micro-batch's value (a class mean, as trl logs it) times B, so the loop's division by the
window's examples gives the mean over micro-batches that trl logs; a micro-batch without desirable (or
undesirable) examples adds 0 to that class's metrics, where trl leaves it out of their mean.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from mistral_train.config import RunConfig
from mistral_train.data.unpaired import UnpairedCollate, mismatched_part, num_examples
from mistral_train.errors import ConfigError
from mistral_train.losses.kto import KTO_LOSSES, USES_KL, kto_loss
from mistral_train.train.reference import build_reference, resolve_reference
from mistral_train.train.steps import Batch, Objective, Reference, StepOutput

Gather = Callable[[torch.Tensor], torch.Tensor]


def completion_logprobs(model: torch.nn.Module, batch: Batch, chunk: int) -> torch.Tensor:
    """(n,): each sequence's summed completion log-prob (labels != -100), n = sequence_index.max() + 1."""
    index = batch["sequence_index"]
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), labels=batch["labels"], reduction="sequence",
                 sequence_index=index, num_sequences=int(index.max()) + 1, loss_chunk_size=chunk)[0]


def reference_logprobs(model: torch.nn.Module, batch: Batch, chunk: int) -> torch.Tensor:
    """What the reference scores: (B,) the examples' log-probs, then (B,) the mismatched ones' when present."""
    logps = completion_logprobs(model, batch, chunk)
    mismatched = mismatched_part(batch)
    return logps if mismatched is None else torch.cat([logps, completion_logprobs(model, mismatched, chunk)])


def kto_objective(loss_type: str, beta: float, desirable_weight: float, undesirable_weight: float,
                  reference: Reference, chunk: int, gather: Optional[Gather] = None) -> Objective:
    """The KTO step (module docstring). `reference(model, batch)` -> `reference_logprobs` of the reference
    policy; `gather` maps this process's (1,) KL mean to every process's (None: one process)."""
    uses_kl = loss_type in USES_KL

    def step(model: torch.nn.Module, batch: Batch) -> StepOutput:
        B, label = num_examples(batch), batch["label"].bool()
        mismatched = mismatched_part(batch)
        if uses_kl and mismatched is None:
            raise ValueError(f"loss_type {loss_type!r} needs the mismatched sequences of its batches (kl_input_ids); "
                             "these batches were collated without them")
        ref = reference(model, batch)  # first: under no_grad, before the policy's graph exists
        policy_kl = ref_kl = None
        if uses_kl:
            with torch.no_grad():  # only the detached reference point reads them
                policy_kl = completion_logprobs(model, mismatched, chunk)
            ref_kl = ref[B:]
        logps = completion_logprobs(model, batch, chunk)  # (B,)
        ref = ref[:B]
        loss, stats = kto_loss(logps[label], logps[~label], ref[label], ref[~label], policy_kl, ref_kl,
                               loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                               undesirable_weight=undesirable_weight, gather=gather)
        return StepOutput(loss * B, B, {key: value.detach().float() * B for key, value in stats.items()})

    return Objective(step, num_examples)


def kto_with_reference(cfg: RunConfig, model: torch.nn.Module, data, pad_id: int, accelerator) -> Objective:
    """The objective of a kto run (its entry's builder, train/objectives.py), called right after the model is built
    and before any checkpoint loads into it: the reference is the policy the run STARTS from."""
    spec, kto = cfg.trainer, cfg.trainer.kto
    check_kto(cfg)
    if kto.loss_type not in USES_KL and isinstance(data.train.collate, UnpairedCollate):
        data.swap_collate(replace(data.train.collate, mismatched=False))  # no KL estimate: no mismatched forwards
    kind = resolve_reference(kto, cfg.adapter, "trainer.kto", free=False)  # both KTO losses read a reference
    chunk = spec.loss_chunk_size
    reference = build_reference(kind, model, chunk, score=lambda m, batch: reference_logprobs(m, batch, chunk))
    gather = accelerator.gather if accelerator.num_processes > 1 else None  # z0 averages every process's KL, as trl
    return kto_objective(kto.loss_type, kto.beta, kto.desirable_weight, kto.undesirable_weight, reference, chunk,
                         gather)


def check_kto(cfg: RunConfig) -> None:
    """Raise ConfigError for trainer.kto settings the step cannot use, naming the key."""
    kto = cfg.trainer.kto
    if kto.loss_type not in KTO_LOSSES:
        raise ConfigError(f"trainer.kto.loss_type={kto.loss_type!r}: expected one of {', '.join(KTO_LOSSES)}")
    if kto.loss_type in USES_KL and cfg.trainer.batch_size < 2:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} with trainer.kto.loss_type=kto: the KL "
                          "estimate pairs each prompt with another example's completion, so a micro-batch needs at "
                          "least 2 examples (as trl's KTOTrainer requires)")
    for key in ("desirable_weight", "undesirable_weight", "beta"):
        if not getattr(kto, key) > 0:
            raise ConfigError(f"trainer.kto.{key}={getattr(kto, key)!r}: expected a positive number")
