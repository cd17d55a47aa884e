"""The optimizer (AdamW, or bitsandbytes' 8-bit / paged AdamW) with decoupled weight decay on
matrices only, and a warmup + cosine schedule.

`trainer.optimizer`:
  adamw        torch.optim.AdamW, fused where the parameters allow it (states: 8 bytes/param in fp32)
  adamw_8bit   bitsandbytes' AdamW8bit: block-wise 8-bit moments, 2 bytes/param; runs on CPU too
  paged_adamw  bitsandbytes' PagedAdamW (fp32 moments in CUDA unified memory, paged to the CPU
               under memory pressure): CUDA only
  paged_adamw_8bit   both
bitsandbytes is imported only when one of its optimizers is asked for.

`trainer.bf16_update`: how adamw adds its update to 16-bit (bf16/fp16) trained weights. bf16 keeps 8 bits
of mantissa, so an update below half an ulp of the weight is rounded away: at lr 1e-5 most of a bf16
model's weights never change (tests/train/test_optim.py shows it).
  auto                 kahan when any trained parameter is 16-bit, else plain (fp32 weights need nothing)
  fp32_master          fp32 master weights and fp32 moments (train/master_adamw.py; torch's AdamW maths):
                       +12 B/param beside the 2-byte weight; the closest to an fp32 run
  kahan                torch-optimi's AdamW(kahan_sum=True): moments in the weights' dtype plus a 16-bit
                       compensation buffer holding what rounding dropped (+2 B/param); deterministic, no compile
  stochastic_rounding  torchao's AdamW with bf16 stochastic rounding: fp32 maths, the result rounded up or
                       down with the probability of its distance (unbiased), nothing extra stored; torchao
                       compiles the step per parameter shape (~15 s for the first on a CPU); bf16 only
  plain                torch AdamW straight on the 16-bit weights: small updates are lost; only by name
Under DeepSpeed (`engine_masters`) the engine's bf16 optimizer already steps fp32 master partitions, so
the optimizer handed to it is torch AdamW whatever this says. The 8-bit/paged optimizers offer no
remedy: over 16-bit trained weights they need trainer.bf16_update=plain, by name.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from mistral_train.config import TrainerSpec
from mistral_train.errors import ConfigError


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
BF16_UPDATES = ("auto", "fp32_master", "kahan", "stochastic_rounding", "plain")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def resolve_bf16_update(spec: TrainerSpec, params: list[torch.Tensor], engine_masters: bool = False) -> str:
    """The update rule adamw uses for `spec.bf16_update` over `params` (see the module docstring): auto
    becomes kahan when a parameter is 16-bit, else plain; under an engine that keeps fp32 masters
    (`engine_masters`: DeepSpeed) every choice is plain torch AdamW on the engine's fp32 partitions.

    Raises:
        ConfigError: an unknown name, stochastic_rounding over fp16 weights, or a remedy with an 8-bit/paged
            optimizer over 16-bit weights.
    """
    mode = spec.bf16_update
    if mode not in BF16_UPDATES:
        raise ConfigError(f"trainer.bf16_update={mode}: expected one of {', '.join(BF16_UPDATES)}")
    sixteen = {p.dtype for p in params if p.dtype in SIXTEEN_BIT}
    if engine_masters or not sixteen or mode == "plain":
        return "plain"
    if spec.optimizer != "adamw":
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in sixteen))
        raise ConfigError(f"trainer.optimizer={spec.optimizer} over {names} trained weights: trainer.bf16_update={mode} "
                          "is offered by adamw only; use trainer.optimizer=adamw, or trainer.bf16_update=plain to accept that updates below half an "
                          "ulp of a weight are rounded away")
    if mode == "stochastic_rounding" and torch.float16 in sixteen:
        raise ConfigError("trainer.bf16_update=stochastic_rounding rounds to bf16 only and the trained weights are "
                          "float16: use trainer.bf16_update=kahan or fp32_master (or model.dtype=bfloat16)")
    return "kahan" if mode == "auto" else mode


def _adamw(groups: list[dict], params: list[torch.Tensor], spec: TrainerSpec, mode: str) -> torch.optim.Optimizer:
    """adamw with the update rule `mode` of resolve_bf16_update; eps 1e-8 (torch's) for every rule."""
    betas, fused = (spec.beta1, spec.beta2), _fused_supported(params)
    if mode == "plain":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=betas, fused=fused or None, foreach=None if fused else True)
    if mode == "fp32_master":
        from mistral_train.train.master_adamw import MasterWeightAdamW

        return MasterWeightAdamW(groups, lr=spec.lr, betas=betas, foreach=True)
    if mode == "kahan":
        import optimi

        # optimi picks its Triton kernel on CUDA when triton is installed, else its for-loop (its foreach path
        # is deprecated); weight_decay comes per group
        return optimi.AdamW(groups, lr=spec.lr, betas=betas, eps=1e-8, kahan_sum=True)
    # torchao's AdamW with unquantized moments (in the weights' dtype) and the bf16 stochastic rounding
    from torchao.optim import _AdamW

    return _AdamW(groups, lr=spec.lr, betas=betas, eps=1e-8, bf16_stochastic_round=True)


def build_optimizer(model: torch.nn.Module, spec: TrainerSpec, engine_masters: bool = False) -> torch.optim.Optimizer:
    """The optimizer `spec.optimizer` names over the trainable parameters, with the bf16 update rule
    `spec.bf16_update` (see the module docstring); `engine_masters`: DeepSpeed keeps fp32 masters itself.

    Raises:
        ValueError: an unknown optimizer name, or no trainable parameter.
        ConfigError: a bf16_update the parameters or the optimizer cannot take (resolve_bf16_update).
        RuntimeError: a paged optimizer without CUDA, or a bitsandbytes optimizer without bitsandbytes.
    """
    if spec.optimizer not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer must be one of {OPTIMIZERS}, got {spec.optimizer!r}")
    groups = param_groups(model, spec.weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    mode = resolve_bf16_update(spec, params, engine_masters)
    betas = (spec.beta1, spec.beta2)
    if spec.optimizer == "adamw":
        return _adamw(groups, params, spec, mode)
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
