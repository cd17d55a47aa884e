"""The trained model with full weights on the main process, whatever the sharding.

Writers (`save_pretrained`, the PEFT adapter writer) and generation read a model's own tensors. Under
DDP, ZeRO-1/2 and one process every process holds them whole: the live model is returned as is.
Under FSDP2 and ZeRO-3 each process holds a slice, so the main process keeps a weightless copy of
the model's structure, taken before sharding (parameters replaced by empty placeholders, buffers
shared: no engine shards buffers), and fills it, one gathered parameter at a time, when asked.
Gathering is collective: every process calls `FullModel.collect`; only the main process gets a model.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are empty placeholders (no weight memory); ties survive
    because deepcopy's memo maps each shared parameter to one placeholder."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return model.get_submodule(module_path), leaf


class FullModel:
    """Full weights of the trained model on the main process.

    Args:
        accelerator: the run's Accelerator (dist.build_accelerator).
        model: the model before `dist.shard_model` / `dist.prepare`.
    """

    def __init__(self, accelerator, model: nn.Module) -> None:
        from mistral_train.dist.accelerator import strategy_of

        self.accelerator = accelerator
        self.strategy = strategy_of(accelerator)
        self.skeleton = _skeleton(model) if self.strategy.sharded and accelerator.is_main_process else None

    def collect(self, model: nn.Module, trainable_only: bool = False) -> Optional[nn.Module]:
        """The model with full weights on the main process (None elsewhere). Collective when sharded.

        Args:
            model: the prepared model (engine, DDP wrapper or FSDP module).
            trainable_only: gather only trainable parameters (an adapter checkpoint writes nothing else;
                the frozen base stays a placeholder unless gathered before).
        """
        if not self.strategy.sharded:
            return self.accelerator.unwrap_model(model)
        live = self.accelerator.unwrap_model(model)
        if self.strategy.name == "fsdp2":
            from mistral_train.dist.fsdp import reshard

            reshard(live)  # every parameter a DTensor shard again, whatever ran last
        names: dict[int, list[str]] = {}
        for name, param in live.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for name, param in live.named_parameters():  # each shared parameter once
            if trainable_only and not param.requires_grad:
                continue
            full = self._gather(param)
            if self.skeleton is not None:
                gathered = nn.Parameter(full, requires_grad=param.requires_grad)
                for alias in names[id(param)]:  # a tied weight: one Parameter under two names, as before sharding
                    module, leaf = _owner(self.skeleton, alias)
                    setattr(module, leaf, gathered)
        return self.skeleton

    def _gather(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole of one parameter on the main process, in CPU memory (collective)."""
        main = self.accelerator.is_main_process
        if self.strategy.name == "fsdp2":
            full = param.full_tensor()
            return full.detach().cpu().clone() if main else None
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().cpu().clone() if main else None
