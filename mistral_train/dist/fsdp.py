"""FSDP2: torch's `fully_shard` applied by us, on CPU (gloo) and CUDA (NCCL) alike.

Accelerate's FSDP paths do not run on CPU (its FSDP2 silently becomes DDP there; STACK-NOTES), so
the one implementation is ours and the CPU tests exercise the code CUDA runs. Each decoder block is
one FSDP unit (gathered for its forward and backward, resharded after); the root unit holds the
embeddings, the final norm and the output head, which may be the embedding weight (tied), so both
uses stay in one unit. Buffers are not sharded: NF4 base weights (uint8 buffers, quant/linear.py)
stay whole on every process, so QLoRA under FSDP2 shards the adapters and the float weights only.

Training state (trained weights and optimizer) is saved with torch.distributed.checkpoint, one file
per process plus metadata; it loads on any number of processes (DCP reshards on load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

FSDP_STATE_DIR = "fsdp2"  # in a checkpoint folder: DCP files of the model and optimizer shards


def fully_shard_model(model: torch.nn.Module, device: torch.device, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard `model` in place over all processes (one unit per decoder block, then the root); returns it.
    Parameters become DTensors; names stay those of the unsharded model."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root's weights (embeddings, head) are used at both ends of the forward: keep them gathered
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Register the sharded parameters again everywhere. A unit gathered by a forward without a backward
    (the root, which keeps its weights gathered, after an evaluation) still holds plain full tensors, which
    neither the optimizer (it holds the DTensor shards) nor DCP would recognise."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name (detached views of the live shards, so a load writes into them).
    Frozen weights are left out: they are the base the run loads from model.path, and NF4 buffers
    carry quant-state keys (`weight.absmax`) that DCP cannot map back to attributes."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def save_fsdp_state(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Every process writes its shards of the trained weights and optimizer states under `folder/fsdp2` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    states = get_optimizer_state_dict(model, _unwrap(optimizer))
    dcp.save({"model": _trained(model), "optim": states}, checkpoint_id=str(Path(folder) / FSDP_STATE_DIR))


def load_fsdp_state(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Inverse of `save_fsdp_state`, on this run's process count (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    optimizer = _unwrap(optimizer)
    reshard(model)
    state = {"model": _trained(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(Path(folder) / FSDP_STATE_DIR))  # in place: the weights are loaded here
    set_optimizer_state_dict(model, optimizer, state["optim"])


def _unwrap(optimizer):
    """The torch optimizer inside Accelerate's wrapper (DCP matches its parameters to the model's)."""
    return getattr(optimizer, "optimizer", optimizer)
