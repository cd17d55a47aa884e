"""NF4Linear: a frozen NF4 weight that behaves like `nn.Linear` in forward and backward.

The weight is dequantized inside a custom autograd function, so:
- the input always gets its gradient (grad_input = grad_out @ W), in train or eval mode,
  whatever happened before: LoRA adapters around this layer and anything upstream train;
- the packed weight is a uint8 buffer, never an autograd input, so it can never take a gradient.

On CPU (and on CUDA without bitsandbytes) dequantization is our own torch code. On CUDA with
bitsandbytes installed, its dequantize kernel is used instead. We never call bitsandbytes'
CPU matmul paths: its `Linear4bit` repacks weights in an eval forward on AVX512-BF16 CPUs and
then runs an op without autograd (STACK-NOTES, trap 1).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mistral_train.quant.nf4_format import BLOCKSIZE, NF4Weight, dequantize_nf4, quantize_nf4
from mistral_train.quant.state_dict import QUANT_STATE_KEY, STATE_SUFFIXES, from_state_dict, to_state_dict

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@lru_cache(maxsize=1)
def _bitsandbytes() -> Any:
    """bitsandbytes.functional, or None when it is not installed (it is optional)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


class _DequantizeMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized on the fly; W is recomputed in backward, not stored."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:  # x: (..., in) -> (..., out)
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None  # (..., out) @ (out, in)


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored in NF4 (bitsandbytes format) and frozen.

    Args:
        weight: the quantized (out_features, in_features) weight.
        bias: optional (out_features,) bias, kept frozen like the weight.
        compute_dtype: dtype of the dequantized weight and of the matmul; the output is cast
            back to the input's dtype (as bitsandbytes' Linear4bit does).
        name: the module's name, for error messages.

    State dict: bitsandbytes' keys (`weight` packed uint8 plus `weight.absmax`, ...), so a
    model's `state_dict()` is what transformers saves for a 4-bit model.
    """

    def __init__(
        self, weight: NF4Weight, bias: Optional[torch.Tensor] = None, compute_dtype: torch.dtype = torch.bfloat16, name: str = ""
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"{name or 'NF4Linear'}: a linear weight must be 2-D (out, in), got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.name = name
        self._set_state(weight)
        if bias is not None:
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: Optional[torch.dtype] = None, name: str = "", double_quant: bool = True
    ) -> "NF4Linear":
        """Quantize an `nn.Linear` (weight dtype kept as the quant state's dtype)."""
        weight = linear.weight.detach()
        q = quantize_nf4(weight, BLOCKSIZE, double_quant, name=name or "linear")
        return cls(q, linear.bias, compute_dtype or weight.dtype, name)

    def _set_state(self, q: NF4Weight) -> None:
        # `weight` is persistent so load_state_dict checks and copies the packed codes; the
        # quant state goes through _save/_load_from_state_dict under bitsandbytes' key names.
        self.register_buffer("weight", q.packed, persistent=True)
        for name in _STATE_BUFFERS:
            self.register_buffer(name, getattr(q, name), persistent=False)
        self.quant_dtype, self.blocksize, self.offset = q.dtype, q.blocksize, q.offset
        self.nested_blocksize = q.nested_blocksize

    @property
    def nf4(self) -> NF4Weight:
        """The quantized weight and its state, as an NF4Weight (views of this module's buffers)."""
        return NF4Weight(
            self.weight, self.absmax, (self.out_features, self.in_features), self.quant_dtype, self.quant_map,
            self.blocksize, self.nested_absmax, self.nested_quant_map, self.offset, self.nested_blocksize,
        )  # fmt: skip

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full-precision weight, (out_features, in_features) in `dtype` (default compute_dtype).

        Never tracks gradients: merging an adapter adds its delta to this fresh tensor.
        """
        dtype = dtype or self.compute_dtype
        bnb = _bitsandbytes() if self.weight.is_cuda else None
        if bnb is not None:
            return bnb.dequantize_4bit(self.weight, self.bnb_quant_state(dtype))
        return dequantize_nf4(self.nf4, dtype)

    def bnb_quant_state(self, dtype: Optional[torch.dtype] = None) -> Any:
        """This weight's state as a `bitsandbytes.functional.QuantState` (needs bitsandbytes)."""
        bnb = _bitsandbytes()
        if bnb is None:
            raise ImportError(f"{self.name or 'NF4Linear'}: bitsandbytes is not installed")
        state2, offset = None, None
        if self.nested_absmax is not None:
            state2 = bnb.QuantState(self.nested_absmax, code=self.nested_quant_map, blocksize=self.nested_blocksize, dtype=torch.float32)
            offset = torch.tensor(self.offset, dtype=torch.float32, device=self.weight.device)
        return bnb.QuantState(
            self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.quant_map,
            blocksize=self.blocksize, quant_type="nf4", dtype=dtype or self.compute_dtype, offset=offset, state2=state2,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'NF4Linear'}: input last dim {x.shape[-1]} != in_features {self.in_features}")
        out = _DequantizeMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4{nested}, compute_dtype={self.compute_dtype}"

    def storage_bytes(self) -> int:
        """Bytes of the packed weight and its quant state (shared code tables counted in full)."""
        return self.nf4.storage_bytes()

    def _apply(self, fn: Any, recurse: bool = True) -> "NF4Linear":
        # Buffers follow the module's device but never its dtype: `model.to(torch.bfloat16)`
        # must not round the fp32 absmax scales or code tables (the uint8 codes are immune anyway).
        buffers = dict(self._buffers)
        for name, buf in buffers.items():
            if buf is not None:
                moved = fn(buf)
                buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)  # the bias, if any
        finally:
            self._buffers.update(buffers)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # `weight` (packed) and `bias`
        for key, tensor in to_state_dict(self.nf4, prefix + "weight").items():
            if key != prefix + "weight":
                destination[key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list
    ) -> None:
        key = prefix + "weight"
        parts = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if f"{key}.{QUANT_STATE_KEY}" not in parts:
            missing_keys.extend(f"{key}.{s}" for s in STATE_SUFFIXES if f"{key}.{s}" not in parts)
        else:
            try:
                q = from_state_dict(parts, key)
            except ValueError as e:
                error_msgs.append(str(e))
                return
            if q.shape != (self.out_features, self.in_features):
                error_msgs.append(f"`{key}`: stored shape {q.shape}, this layer is {(self.out_features, self.in_features)}")
                return
            device = self.weight.device
            self._set_state(replace(q, packed=self.weight).to(device))  # keep our buffer: super() copies into it
        known = {f"{key}.{s}" for s in STATE_SUFFIXES}
        stray = [k for k in parts if k != key and k not in known]
        if strict:
            unexpected_keys.extend(stray)
        trimmed = {k: v for k, v in state_dict.items() if k not in known and k not in stray}
        super()._load_from_state_dict(trimmed, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
