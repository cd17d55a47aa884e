"""NF4 while reading a checkpoint: what `model/hf.py` calls for `quantize="nf4"`.

Two sources, one result (NF4Linear layers in a model built on the meta device):
- a float folder: each decoder linear weight is quantized the moment it is read, so peak
  memory is the quantized model plus one float tensor, never the whole float model;
- a folder transformers saved with a bitsandbytes 4-bit `quantization_config`: the packed
  weight and its quant state entries are collected per layer and assembled when complete.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from mistral_train.quant.linear import NF4Linear
from mistral_train.quant.nf4 import quantizable_linears, quantization_config, set_module
from mistral_train.quant.nf4_experts import quantize_experts
from mistral_train.quant.nf4_format import DTYPE_NAMES, quantize_nf4
from mistral_train.quant.state_dict import STATE_SUFFIXES, from_state_dict

QUANTIZE_MODES = ("nf4",)


def prequantized_config(extra: dict[str, Any], source: str) -> Optional[dict[str, Any]]:
    """The folder's `quantization_config` when it describes bnb NF4 weights; None without one.

    Raises ValueError (naming `source` and the key) for any other quantization: 8-bit, FP4,
    GPTQ/AWQ and friends cannot be read as NF4.
    """
    qc = extra.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"{source}: `quantization_config.quant_method` is {method!r}; only bitsandbytes NF4 can be loaded")
    if not qc.get("load_in_4bit", qc.get("_load_in_4bit", False)):
        raise ValueError(f"{source}: `quantization_config` is not 4-bit (load_in_8bit checkpoints are not supported)")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{source}: `quantization_config.bnb_4bit_quant_type` is {qc.get('bnb_4bit_quant_type')!r}, only 'nf4' is supported")
    return qc


class NF4Loading:
    """Routes the quantized tensors of a checkpoint into NF4Linear layers of `model`.

    Args:
        model: the model on the meta device (its decoder linears get replaced).
        prequantized: the folder's bnb `quantization_config` (assemble stored NF4), or None
            (quantize float weights as they are read).
        dtype: `load_pretrained`'s dtype; also the compute dtype when given.
    """

    def __init__(self, model: nn.Module, prequantized: Optional[dict[str, Any]], dtype: Optional[torch.dtype]) -> None:
        self.model, self.prequantized, self.dtype = model, prequantized, dtype
        # Linears with a bias are left in full precision (Mistral has none; keeps loading simple).
        self.targets = {n for n in quantizable_linears(model) if model.get_submodule(n).bias is None}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.done: set[str] = set()
        self.compute_dtype: Optional[torch.dtype] = dtype
        if prequantized is not None and dtype is None:
            name = prequantized.get("bnb_4bit_compute_dtype")
            self.compute_dtype = {v: k for k, v in DTYPE_NAMES.items()}.get(name) if isinstance(name, str) else None

    def _owner(self, key: str) -> Optional[str]:
        """The target layer whose weight `key` is (or is part of), else None."""
        head, sep, tail = key.partition(".weight")
        if not sep or head not in self.targets or (tail and tail[1:] not in STATE_SUFFIXES and not tail.startswith(".quant_state.")):
            return None
        return head

    def offer(self, key: str, f: Any, file: str) -> bool:
        """Take `key` from the open safetensors file `f` if it is a quantized weight; True when taken."""
        name = self._owner(key)
        if name is None:
            return False
        if self.prequantized is None:
            if key != name + ".weight":
                raise KeyError(f"{file}: `{key}` is 4-bit quant state, but config.json has no bitsandbytes `quantization_config`")
            self._quantize(name, f.get_tensor(key), file)
            return True
        if key == name + ".weight" and f.get_slice(key).get_dtype() != "U8":
            return False  # a layer the checkpoint kept in full precision: loads as a plain weight
        self.pending.setdefault(name, {})[key] = f.get_tensor(key)
        self._assemble_if_complete(name, file)
        return True

    def _quantize(self, name: str, tensor: torch.Tensor, file: str) -> None:
        expected = tuple(self.model.get_submodule(name).weight.shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{file}: `{name}.weight` has shape {tuple(tensor.shape)}, the model expects {expected}")
        if self.dtype is not None:
            tensor = tensor.to(self.dtype)
        q = quantize_nf4(tensor, name=f"{file}: `{name}.weight`")
        self._install(name, NF4Linear(q, None, self.compute_dtype or tensor.dtype, name))

    def _assemble_if_complete(self, name: str, file: str) -> None:
        parts = self.pending[name]
        key = name + ".weight"
        if key not in parts or not any(k.startswith(key + ".quant_state.") for k in parts):
            return
        needed = {"absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if b"nested_offset" in _meta_bytes(parts, key) else set())
        if any(f"{key}.{s}" not in parts for s in needed):
            return
        try:
            q = from_state_dict(parts, key)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e
        expected = tuple(self.model.get_submodule(name).weight.shape)
        if q.shape != expected:
            raise ValueError(f"{file}: `{key}` was quantized from shape {q.shape}, the model expects {expected}")
        del self.pending[name]
        self._install(name, NF4Linear(q, None, self.compute_dtype or q.dtype, name))

    def _install(self, name: str, layer: NF4Linear) -> None:
        set_module(self.model, name, layer)
        self.done.add(name)
        if self.compute_dtype is None:
            self.compute_dtype = layer.compute_dtype  # later layers compute like the first

    def finish_experts(self) -> list[str]:
        """After the expert stacks are assembled (model/expert_layout.py fuses them at the end of a read): store them
        in NF4 too, in the linears' compute dtype; the routers stay float. Returns the stacks' names."""
        return quantize_experts(self.model, self.compute_dtype)

    def finish(self, folder: str) -> set[str]:
        """Check nothing is half-loaded; record the quantization in the config.

        Returns the parameter names now loaded (`<layer>.weight`), for the caller's missing-key check.
        """
        if self.pending:
            name, parts = next(iter(self.pending.items()))
            raise KeyError(f"{folder}: 4-bit weight `{name}.weight` is incomplete, the checkpoint has only {sorted(parts)}")
        config = getattr(self.model, "config", None)
        if self.done and config is not None and "quantization_config" not in config.extra:
            config.extra["quantization_config"] = quantization_config(self.compute_dtype or torch.float32)
        return {name + ".weight" for name in self.done}


def _meta_bytes(parts: dict[str, torch.Tensor], key: str) -> bytes:
    meta = next(v for k, v in parts.items() if k.startswith(key + ".quant_state."))
    return bytes(meta.to(torch.uint8).tolist())
