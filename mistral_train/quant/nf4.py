"""NF4 base weights for QLoRA: swap a model's linears for NF4Linear, and back.

Typical use:

    model = Mistral.from_pretrained(path, dtype=torch.bfloat16, quantize="nf4")  # quantized while reading
    model = quantize_model(model)          # or: quantize a model already in memory
    apply_lora(model, ...)                 # adapters wrap the NF4Linear layers (see NF4Linear)

A quantized model's `config.extra["quantization_config"]` holds the dict transformers writes
for `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` and its
state dict uses bitsandbytes' keys, so `model.save_pretrained(path)` writes a 4-bit folder
that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads (with bitsandbytes),
and that `Mistral.from_pretrained(path)` reads back as NF4.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from mistral_train.quant.linear import NF4Linear
from mistral_train.quant.nf4_experts import NF4ExpertStack, quantize_experts, routers
from mistral_train.quant.nf4_format import DTYPE_NAMES

DEFAULT_SKIP = ("lm_head", "score")  # output heads stay in full precision (transformers does the same)


def quantization_config(compute_dtype: torch.dtype, double_quant: bool = True) -> dict[str, Any]:
    """The `quantization_config` entry transformers writes in config.json for a bnb NF4 model."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """True when a module name equals or ends with a skip entry at a dot boundary ("lm_head")."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the `nn.Linear` modules `quantize_model` would swap, in model order."""
    skip, gates = tuple(skip), routers(model)  # a MoE router stays float unless the caller quantizes it by hand
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not is_skipped(name, skip) and name not in gates]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, skip: Iterable[str] = DEFAULT_SKIP, double_quant: bool = True
) -> nn.Module:
    """Swap every `nn.Linear` (except `skip`) for an NF4Linear, in place; returns the model.

    Quantize before adding LoRA adapters. Each weight is quantized and its float copy
    released before the next, so peak memory is the model plus one layer's weight.

    Args:
        compute_dtype: dtype the NF4 layers dequantize to and compute in.
        skip: module names (or trailing name parts) left in full precision.
        double_quant: 8-bit quantize the block scales too (QLoRA's double quantization).
    """
    for name in quantizable_linears(model, skip):
        linear = model.get_submodule(name)
        set_module(model, name, NF4Linear.from_linear(linear, compute_dtype, name, double_quant))
        del linear
    quantize_experts(model, compute_dtype, double_quant)  # 3-D MoE expert weights (quant/nf4_experts.py)
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "extra", None), dict):
        config.extra["quantization_config"] = quantization_config(compute_dtype, double_quant)
    return model


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Swap every NF4Linear back for an `nn.Linear` holding its dequantized weight, in place.

    For merging adapters into a full-precision copy and exporting it: the result saves as
    a plain HF folder (the `quantization_config` entry is removed from the config).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            weight = module.dequantize(dtype or module.compute_dtype)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype))
            set_module(model, name, linear)
        elif isinstance(module, NF4ExpertStack):
            parent, _, param = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            delattr(owner, param)
            setattr(owner, param, nn.Parameter(module.dequantize(dtype or module.compute_dtype)))
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "extra", None), dict):
        config.extra.pop("quantization_config", None)
    return model


def nf4_storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of all NF4 weights (NF4Linear and MoE expert stacks), each distinct tensor counted once."""
    seen: dict[int, int] = {}
    params = 0
    for module in model.modules():
        if isinstance(module, (NF4Linear, NF4ExpertStack)):
            packed = module.weight if isinstance(module, NF4Linear) else module.packed
            params += module.nf4.numel
            for t in (packed, *(getattr(module, n) for n in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"))):
                if t is not None:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()), params
