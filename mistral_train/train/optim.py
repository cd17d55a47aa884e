"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

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


def build_optimizer(model: torch.nn.Module, spec: TrainerSpec) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused when the parameters allow it, else foreach."""
    groups = param_groups(model, spec.weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    fused = _fused_supported(params)
    return torch.optim.AdamW(
        groups,
        lr=spec.lr,
        betas=(spec.beta1, spec.beta2),
        fused=fused or None,
        foreach=None if fused else True,
    )


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
