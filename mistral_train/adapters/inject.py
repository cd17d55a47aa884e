"""LoRA in a built model: pick the targets, swap them in place, merge, disable, unload.

One swap function on any built model (no parallel model class): `apply_lora` replaces each
targeted linear by a `LoRALinear` and each `modules_to_save` module by a `TrainableCopy`, then
freezes everything except the adapter parameters and the copies. Module names are transformers'
(`model.layers.0.self_attn.q_proj`), so peft's target names and regexes mean the same here.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from mistral_train.adapters.expert_lora import (
    ExpertLoRA,
    attach,
    expert_adapters,
    find_parameter_targets,
    merge_expert,
    unload_expert,
    unmerge_expert,
)
from mistral_train.adapters.lora import ALL_LINEAR, LoraConfig, LoRALinear
from mistral_train.quant.nf4_experts import routers

# Output heads: never in "all-linear" (as peft). LoRA on lm_head is refused: the chunked loss
# reads `lm_head.weight` directly and would silently skip the adapter; train it with modules_to_save.
OUTPUT_HEADS = ("lm_head", "score")


class TrainableCopy(nn.Module):
    """A `modules_to_save` entry: a trainable copy of `original`, which stays frozen so that
    `disable_adapters` gives back the original module exactly.

    Keys: `<name>.original_module.*` (frozen) and `<name>.modules_to_save.*` (trained; the PEFT
    file stores these as `<name>.*`). Attributes such as `.weight` read from the active module,
    so `model.lm_head.weight` (used by the chunked loss) follows `disabled`.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = copy.deepcopy(original)
        self.modules_to_save.requires_grad_(True)
        self.disabled = False

    @property
    def active(self) -> nn.Module:
        return self.original_module if self.disabled else self.modules_to_save

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})  # via __dict__: safe while unpickling
            if "modules_to_save" not in modules:
                raise
            return getattr(modules["original_module" if self.__dict__.get("disabled") else "modules_to_save"], name)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or anything linear-shaped (a quantized linear): ints `in_features`/`out_features`."""
    if isinstance(module, (LoRALinear, TrainableCopy)):
        return False
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _inside(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def find_targets(model: nn.Module, cfg: LoraConfig) -> tuple[list[str], list[str]]:
    """(LoRA targets, modules_to_save) as module names, validated; the model is not changed.

    Raises ValueError for: a model that already has adapters, a target or modules_to_save name
    that matches nothing (naming what exists), a target that is not linear or is lm_head, a
    module in both lists, and r > min(in, out) of a target (naming the module and its shape).
    """
    if any(isinstance(m, (LoRALinear, TrainableCopy, ExpertLoRA)) for m in model.modules()):
        raise ValueError("the model already has adapters; merge_and_unload() it or start from a plain model")
    modules = {name: m for name, m in model.named_modules() if name}
    linear = [name for name, m in modules.items() if _is_linear(m)]
    linear_kinds = sorted({name.rpartition(".")[2] for name in linear})

    saved: list[str] = []
    for target in cfg.modules_to_save:
        found = [name for name in modules if _matches(name, target)]
        if not found:
            top = sorted({name.split(".")[0] for name in modules} | {n for n in modules if n.count(".") == 1})
            raise ValueError(f"modules_to_save: no module named {target!r} in the model; it has e.g. {top}")
        saved += [name for name in found if not _inside(name, saved)]

    targets = cfg.target_modules
    gates = routers(model)
    if targets == ALL_LINEAR:  # a MoE router only when named, in target_parameters (below)
        chosen = [name for name in linear if name not in OUTPUT_HEADS and not _inside(name, saved) and name not in gates]
        if not chosen:
            raise ValueError("target_modules='all-linear': the model has no linear layer outside its output head")
    elif isinstance(targets, str):
        chosen = [name for name in modules if re.fullmatch(targets, name)]
        if not chosen:
            raise ValueError(
                f"target_modules regex {targets!r} matches no module name (it must match the whole name, "
                f"e.g. {linear[0] if linear else '?'!r}); linear layers here are named {linear_kinds}"
            )
    else:
        chosen, missing = [], []
        for target in targets:
            found = [name for name in modules if _matches(name, target)]
            chosen += found
            if not found:
                missing.append(target)
        if missing:
            raise ValueError(f"target_modules {missing} match no module in the model; its linear layers are named {linear_kinds}")
    chosen = list(dict.fromkeys(chosen))

    for name in chosen:
        module = modules[name]
        if name in gates:  # transformers' router is no linear: peft adapts it as a parameter, and so do we
            raise ValueError(f"target module `{name}` is a MoE router; adapt it by parameter, as peft does on "
                             f"transformers' router: target_parameters=['{name.rpartition('.')[2]}.weight']")
        if not _is_linear(module):
            raise ValueError(
                f"target module `{name}` is a {type(module).__name__}, not a linear layer: LoRA wraps linear layers "
                f"(train it in full with modules_to_save=[{name.rpartition('.')[2]!r}])"
            )
        if name == "lm_head":
            raise ValueError(
                "LoRA on `lm_head` is not supported: the chunked loss reads lm_head.weight directly; use modules_to_save=['lm_head']"
            )
        if _inside(name, saved):
            raise ValueError(f"`{name}` is both a LoRA target and (inside) a modules_to_save entry; choose one")
        out_features, in_features = module.out_features, module.in_features
        if cfg.rank_of(name) > min(in_features, out_features):
            raise ValueError(
                f"r={cfg.rank_of(name)} is larger than min(in, out) of `{name}` (weight shape (out, in) = ({out_features}, {in_features})); "
                f"use r <= {min(in_features, out_features)}"
            )
    return chosen, saved


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap the targets of `cfg` in place; only adapter parameters and modules_to_save copies train.

    The config is kept as `model.lora_config` (save_adapter reads it). Returns `model`.
    Nothing is changed when validation fails (see `find_targets`).
    """
    lora_names, saved_names = find_targets(model, cfg)
    expert_names, weight_names = find_parameter_targets(model, cfg.target_parameters, _is_linear)
    both = sorted(set(weight_names) & set(lora_names))
    if both:
        raise ValueError(f"{both} are named by both target_modules and target_parameters; name each once")
    model.requires_grad_(False)
    for name in lora_names + weight_names:
        layer = LoRALinear(model.get_submodule(name), cfg.rank_of(name), cfg.alpha_of(name), cfg.dropout, cfg.use_rslora,
                           cfg.use_dora)
        layer.reset_adapter(cfg.init)
        layer.by_parameter = name in weight_names  # saved under target_parameters, as peft's ParamWrapper
        _replace(model, name, layer)
    attach(model, expert_names, cfg.rank_of, cfg.alpha_of, cfg.use_rslora, cfg.init)  # LoRA on 3-D expert weights
    for name in saved_names:
        _replace(model, name, TrainableCopy(model.get_submodule(name)))
    model.lora_config = cfg
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRALinear in the model."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def _adapter_modules(model: nn.Module, what: str) -> list[nn.Module]:
    found = [m for m in model.modules() if isinstance(m, (LoRALinear, TrainableCopy, ExpertLoRA))]
    if not found:
        raise ValueError(f"{what}: the model has no adapters (call apply_lora or load_adapter first)")
    return found


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place; forward then runs the base only."""
    for m in _adapter_modules(model, "merge_lora"):
        if isinstance(m, LoRALinear):
            m.merge()
    for name, adapter in expert_adapters(model):
        merge_expert(model, name, adapter)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (up to floating-point rounding)."""
    for m in _adapter_modules(model, "unmerge_lora"):
        if isinstance(m, LoRALinear):
            m.unmerge()
    for name, adapter in expert_adapters(model):
        unmerge_expert(model, name, adapter)
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is exactly the base model (the DPO reference policy):
    LoRA layers run their base only and modules_to_save use the original modules."""
    modules = _adapter_modules(model, "disable_adapters")
    for m in modules:
        if isinstance(m, (LoRALinear, ExpertLoRA)) and m.merged:
            raise ValueError("disable_adapters on a merged model: unmerge_lora() first (the base weight holds the adapter)")
        if isinstance(m, LoRALinear) and m.base_is_residual:
            raise ValueError(
                "disable_adapters with a PiSSA-initialised adapter: the base weight holds the residual W - sBA, "
                "which is not the pretrained model; use a frozen copy or precomputed reference log-probs"
            )
    previous = [m.disabled for m in modules]
    try:
        for m in modules:
            m.disabled = True
        yield model
    finally:
        for m, flag in zip(modules, previous):
            m.disabled = flag


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain model again: each LoRALinear becomes an nn.Linear holding the merged weight (a
    pluggable base is dequantized, so no re-quantisation error), each TrainableCopy its trained
    copy. Every parameter is trainable afterwards, as after `Mistral.from_pretrained`."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, TrainableCopy))]:
        if isinstance(m, TrainableCopy):
            _replace(model, name, m.modules_to_save)
            continue
        dense = m.weight if (m.merged and m.base_layer is None) else None
        if dense is None:
            dtype = m.weight.dtype if m.base_layer is None else m.base_weight().dtype
            dense = nn.Parameter(m.merged_weight().to(dtype))
        bias = m.bias if m.base_layer is None else getattr(m.base_layer, "bias", None)
        linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta")
        linear.weight = dense
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach())
        _replace(model, name, linear)
    for name, adapter in expert_adapters(model):
        unload_expert(model, name, adapter)
    if hasattr(model, "lora_config"):
        del model.lora_config
    model.requires_grad_(True)
    return model
