"""NF4 expert stacks: a 3-D expert weight (E, out, in) stored in NF4, bitsandbytes' format, for QLoRA on MoE.

bitsandbytes quantizes any tensor by flattening it into blocks of 64 (`quantize_4bit`), so the stack is one NF4
weight of shape (E, out, in): byte for byte what `bitsandbytes.functional.quantize_4bit(W)` gives for the same W
(tests/oracle/test_moe_adapters_parity.py). transformers 5.25 with a BitsAndBytesConfig leaves Mixtral's fused
expert parameters (and its router) in full precision, as only nn.Linear becomes Linear4bit, so there is no
transformers checkpoint of 4-bit experts to interoperate with; our state dict uses bitsandbytes' naming applied
to the parameter (`mlp.experts.gate_up_proj`, `mlp.experts.gate_up_proj.absmax`, ...).

`NF4ExpertStack` takes the parameter's place on the experts module; model/moe.py's Experts.project calls it with
its grouped matmul. The stack is dequantized inside an autograd function and again in backward, never stored
for backward and never given a gradient (as NF4Linear does for a linear). Routers (`mlp.gate`) stay float.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import torch
from torch import nn

from mistral_train.quant.nf4_format import BLOCKSIZE, NF4Weight, dequantize_nf4, quantize_nf4
from mistral_train.quant.state_dict import QUANT_STATE_KEY, STATE_SUFFIXES, from_state_dict, to_state_dict

PACKED = "_packed"  # where the owner's load pre-hook puts the packed codes for the stack (see _route_packed)
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (M, in) x (E, out, in) -> (M, out), grouped
_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def routers(model: nn.Module) -> set[str]:
    """Names of router linears: a `gate` beside an `experts` module (Mixtral's mlp.gate). They stay float and
    are never in LoRA's all-linear unless named, as transformers' router is no nn.Linear for peft or bitsandbytes."""
    found = set()
    for name, module in model.named_modules():
        if "experts" in module._modules and isinstance(module._modules.get("gate"), nn.Module):
            found.add(f"{name}.gate" if name else "gate")
    return found


class _DequantizeGrouped(torch.autograd.Function):
    """product(x, W) with W dequantized on the fly; W is dequantized again in backward, not stored."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stack: "NF4ExpertStack", product: Product) -> torch.Tensor:
        ctx.stack, ctx.product = stack, product
        return product(x, stack.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # rows of expert e: grad_x = grad_out @ W_e = product(grad_out, W^T) with W^T (E, in, out)
        return ctx.product(grad_out, ctx.stack.dequantize(grad_out.dtype).transpose(1, 2)), None, None


class NF4ExpertStack(nn.Module):
    """A frozen (E, out, in) expert weight in NF4.

    Args:
        weight: the quantized stack (shape (E, out, in)).
        compute_dtype: dtype it is dequantized to and multiplied in.
        name: `<module>.<param>`, for messages.
    """

    def __init__(self, weight: NF4Weight, compute_dtype: torch.dtype, name: str = "") -> None:
        super().__init__()
        if len(weight.shape) != 3:
            raise ValueError(f"{name or 'NF4ExpertStack'}: an expert stack is 3-D (experts, out, in), got {weight.shape}")
        self.expert_shape, self.compute_dtype, self.name = tuple(weight.shape), compute_dtype, name
        self._set_state(weight)

    def _set_state(self, q: NF4Weight) -> None:
        # Non-persistent: _save_to_state_dict writes bitsandbytes' keys under the parameter's own name.
        self.register_buffer("packed", q.packed, persistent=False)
        for key in _STATE:
            self.register_buffer(key, getattr(q, key), persistent=False)
        self.quant_dtype, self.blocksize, self.offset, self.nested_blocksize = q.dtype, q.blocksize, q.offset, q.nested_blocksize

    @classmethod
    def from_tensor(cls, weight: torch.Tensor, compute_dtype: Optional[torch.dtype] = None, name: str = "",
                    double_quant: bool = True) -> "NF4ExpertStack":
        return cls(quantize_nf4(weight.detach(), BLOCKSIZE, double_quant, name=name or "experts"),
                   compute_dtype or weight.dtype, name)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, self.expert_shape, self.quant_dtype, self.quant_map, self.blocksize,
                         self.nested_absmax, self.nested_quant_map, self.offset, self.nested_blocksize)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.expert_shape)

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The stack in full precision, (E, out, in) in `dtype` (default compute_dtype), without gradient."""
        return dequantize_nf4(self.nf4, dtype or self.compute_dtype)

    def forward(self, rows: torch.Tensor, product: Product) -> torch.Tensor:
        """rows (M, in) grouped by expert -> (M, out) in the rows' dtype."""
        return _DequantizeGrouped.apply(rows.to(self.compute_dtype), self, product).to(rows.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.expert_shape}, nf4, compute_dtype={self.compute_dtype}"

    def _apply(self, fn: Any, recurse: bool = True) -> "NF4ExpertStack":
        # follow the device, never the dtype (as NF4Linear): the absmax scales and code tables stay fp32
        for key, buf in list(self._buffers.items()):
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, tensor in to_state_dict(self.nf4, prefix[:-1]).items():  # `...experts.gate_up_proj`, `.absmax`, ...
            destination[key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix[:-1]
        parts = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if prefix + PACKED in parts:  # the packed codes `key` itself, handed down by the owner's pre-hook
            parts[key] = parts.pop(prefix + PACKED)
        if f"{key}.{QUANT_STATE_KEY}" not in parts:
            missing_keys.extend([key] + [f"{key}.{s}" for s in STATE_SUFFIXES if f"{key}.{s}" not in parts])
            return
        try:
            q = from_state_dict(parts, key)
        except ValueError as e:
            error_msgs.append(str(e))
            return
        if tuple(q.shape) != self.expert_shape:
            error_msgs.append(f"`{key}`: stored shape {tuple(q.shape)}, this expert stack is {self.expert_shape}")
            return
        self._set_state(replace(q).to(self.packed.device))


def expert_stacks(model: nn.Module) -> list[tuple[str, str]]:
    """(module, parameter) of every float 3-D expert weight, in model order."""
    return [(name, pname) for name, module in model.named_modules()
            for pname, p in module.named_parameters(recurse=False) if p.ndim == 3]


def quantize_experts(model: nn.Module, compute_dtype: Optional[torch.dtype] = None, double_quant: bool = True) -> list[str]:
    """Replace every float 3-D expert weight by an NF4ExpertStack, in place, one at a time (so peak memory is the
    model plus one stack); returns the `<module>.<param>` names quantized. Routers are 2-D linears: untouched."""
    done = []
    for module_name, pname in expert_stacks(model):
        module = model.get_submodule(module_name)
        weight = getattr(module, pname)
        full = f"{module_name}.{pname}"
        stack = NF4ExpertStack.from_tensor(weight, compute_dtype or weight.dtype, full, double_quant)
        delattr(module, pname)
        setattr(module, pname, stack)
        if not getattr(module, "_routes_nf4_packed", False):
            module.register_load_state_dict_pre_hook(_route_packed)
            module._routes_nf4_packed = True
        done.append(full)
    return done


def _route_packed(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook on the module owning NF4 stacks: torch hands a child only the keys under
    `<child>.`, but bitsandbytes' naming puts the packed codes at `<child>` itself; move them under the child."""
    for name, child in module.named_children():
        if isinstance(child, NF4ExpertStack) and prefix + name in state_dict:
            state_dict[f"{prefix}{name}.{PACKED}"] = state_dict.pop(prefix + name)
