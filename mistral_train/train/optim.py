"""The optimizer (AdamW, or bitsandbytes' 8-bit / paged AdamW) with decoupled weight decay on
matrices only, and a warmup + cosine schedule.

`trainer.optimizer`:
  adamw        torch.optim.AdamW, fused where the parameters allow it (states: 8 bytes/param in fp32)
  adamw_8bit   bitsandbytes' AdamW8bit: block-wise 8-bit moments, 2 bytes/param; runs on CPU too
  paged_adamw  bitsandbytes' PagedAdamW (fp32 moments in CUDA unified memory, paged to the CPU
               under memory pressure): CUDA only
  paged_adamw_8bit   both
bitsandbytes is imported only when one of its optimizers is asked for.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from mistral_train.config import TrainerSpec


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (>= 2-D: linear and embedding
    weights) and an undecayed one (1-D: norm scales, biases), as decay on norm scales
    only pulls them towards zero without regularising anything useful."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Fused AdamW needs every parameter floating point on one device of a supported type."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


def build_optimizer(model: torch.nn.Module, spec: TrainerSpec) -> torch.optim.Optimizer:
    """The optimizer `spec.optimizer` names over the trainable parameters (see the module docstring).

    Raises:
        ValueError: an unknown optimizer name, or no trainable parameter.
        RuntimeError: a paged optimizer without CUDA, or a bitsandbytes optimizer without bitsandbytes.
    """
    if spec.optimizer not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer must be one of {OPTIMIZERS}, got {spec.optimizer!r}")
    groups = param_groups(model, spec.weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    betas = (spec.beta1, spec.beta2)
    if spec.optimizer == "adamw":
        fused = _fused_supported(params)
        return torch.optim.AdamW(groups, lr=spec.lr, betas=betas, fused=fused or None, foreach=None if fused else True)
    if spec.optimizer.startswith("paged") and not all(p.device.type == "cuda" for p in params):
        raise RuntimeError(f"trainer.optimizer={spec.optimizer} pages optimizer states through CUDA unified memory "
                           "and needs the model on a CUDA device; use adamw or adamw_8bit on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError(f"trainer.optimizer={spec.optimizer} needs bitsandbytes (pip install bitsandbytes)") from err
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[spec.optimizer]
    return cls(groups, lr=spec.lr, betas=betas)


def lr_factor(step: int, spec: TrainerSpec) -> float:
    """Multiplier on `spec.lr` for 0-based optimizer step `step`.

    Linear warmup over `warmup_steps` (step 0 already gets lr / warmup_steps, never 0),
    then cosine from 1 down to `min_lr_ratio`, reached at the last step `max_steps - 1`.
    """
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    decay_steps = max(1, spec.max_steps - 1 - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine


def lr_at(step: int, spec: TrainerSpec) -> float:
    """Learning rate for 0-based optimizer step `step` (a pure function of the spec)."""
    return spec.lr * lr_factor(step, spec)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainerSpec) -> LambdaLR:
    """LambdaLR over `lr_factor`: its step count is saved in checkpoints, so a resumed run
    continues the schedule exactly."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, spec))
