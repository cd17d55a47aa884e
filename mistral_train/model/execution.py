"""How a decoder block runs in a forward pass: what it recomputes, compiled or eager, offloaded or not.

Activation checkpointing policies (`Mistral.set_gradient_checkpointing(policy, every)`):
    "block"     recompute the whole block in backward; only its input is kept (least memory).
    "attention" recompute norm + attention; the MLP's activations are kept.
    "mlp"       recompute norm + MLP; the attention's activations are kept.
    "every_k"   "block" on every `every`-th block only (layers 0, k, 2k, ...), a memory/speed dial.
`every` applies to every policy: the chosen part is recomputed in layers whose index is a
multiple of `every`. True means "block", False/None/"none" turns recomputation off.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mistral_train.model.attention import AttentionInputs
from mistral_train.model.compile import call_block, compiled_block_call
from mistral_train.model.offload import OffloadActivations

CHECKPOINT_POLICIES = ("none", "block", "attention", "mlp", "every_k")


def checkpoint_plan(policy: Union[str, bool, None], every: int, num_layers: int) -> tuple[Optional[str], list[Optional[str]]]:
    """The policy's canonical name (None when off) and the part each layer recomputes.

    Raises ValueError for an unknown policy, `every` < 1, and "every_k" with every < 2
    (every_k with every=1 is "block": most likely a forgotten `every`).
    """
    if policy is True:
        policy = "block"
    if policy is False or policy is None:
        policy = "none"
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"gradient checkpointing policy must be one of {CHECKPOINT_POLICIES} or a bool, got {policy!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"gradient checkpointing `every` must be an int >= 1, got {every!r}")
    if policy == "every_k" and every < 2:
        raise ValueError(f"policy 'every_k' needs every >= 2 (every={every} checkpoints every block: use 'block')")
    if policy == "none":
        return None, [None] * num_layers
    part = "block" if policy == "every_k" else policy
    return policy, [part if i % every == 0 else None for i in range(num_layers)]


def recomputing(module: nn.Module) -> bool:
    """Recomputation only pays off when a backward will run: training with grad enabled."""
    return module.training and torch.is_grad_enabled()


def run_block(model: nn.Module, block: nn.Module, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """block(x, inputs) with the model's execution options; (B, T, H) -> (B, T, H).

    Compiled only without a KV cache (see compile.py). Offloading wraps the whole call, so a
    block that recomputes everything offloads only the input checkpointing keeps for it.
    """
    options = model.compile_options
    call = compiled_block_call(options) if options is not None and inputs.cache is None else call_block
    if not recomputing(model):
        return call(block, x, inputs)
    offload = model.activation_offload
    context = OffloadActivations(offload.min_bytes, offload.stats, offload.copy_on_cpu) if offload is not None else nullcontext()
    with context:
        if block.recompute == "block":
            return checkpoint(call, block, x, inputs, use_reentrant=False)
        return call(block, x, inputs)
