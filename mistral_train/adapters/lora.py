"""LoRA layers: `LoraConfig` and `LoRALinear` (plain LoRA, rsLoRA, DoRA; default, gaussian and PiSSA init).

    y = base(x) + s * B A x          s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA: y = m / ||W + s B A||_row * (W x + s B A x) + bias, the row norm treated as a constant
          (detached, DoRA paper §4.3, as peft does), so only m, A and B take gradients.

`LoRALinear` owns the base weight, so keys stay `...q_proj.weight`. Two kinds of base:
- a plain `nn.Linear` (exactly that type) is absorbed: its `weight`/`bias` Parameters become
  this module's own (same tensors, no copy); state_dict *and* named_parameters keep their names.
- any other module is a *pluggable base*, e.g. the NF4 linear of `mistral_train.quant`. It is
  kept as the child `base_layer`, and state-dict hooks drop the `base_layer.` infix, so its keys
  stay `q_proj.weight`, `q_proj.weight.absmax`, ... The contract it must meet:
    base(x) -> (..., out_features); gradients flow to x and never to its own weights;
    `in_features`, `out_features` ints; `dequantize() -> (out, in)` float tensor, needed only
    for DoRA (the weight norm), PiSSA init and `merged_weight()` (export).
  In-place merge is refused for it: re-quantising merged weights loses precision (peers' bug).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Our `init` names -> peft's `init_lora_weights` values (what adapter_config.json stores).
#   default : peft True       A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's init), B = 0
#   gaussian: peft "gaussian" A ~ N(0, 1/r), B = 0
#   pissa   : peft "pissa"    A, B from the top-r SVD of W; the base keeps the residual W - s B A
#   none    : peft False      A and B both nn.Linear-random: the adapter starts non-zero (tests)
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "none": False}
ALL_LINEAR = "all-linear"
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")


@dataclass
class LoraConfig:
    """What `apply_lora` injects. Field names follow ours; `peft_format` maps them to peft's.

    target_modules: a list of module names, each matching a module whose name equals it or ends
        in `.name` (["q_proj", "v_proj"]); a string is a regex that must match a full module name
        (`re.fullmatch`, as peft); "all-linear" wraps every linear except the output head.
        Typed Any so Hydra's ConfigStore accepts list-or-string.
    modules_to_save: modules trained in full as a copy, e.g. ["lm_head"], ["embed_tokens"].
    init: "default" | "gaussian" | "pissa" | "none" (see PEFT_INIT above).
    target_parameters: parameters adapted by name, peft's `target_parameters` (each equal to `<module>.<param>` or
        a tail of it): 3-D MoE expert weights such as "mlp.experts.gate_up_proj" (adapters/expert_lora.py), or a
        linear's 2-D weight such as the router "mlp.gate.weight", which no other option adapts. As in peft, they
        need dropout 0, no DoRA and no PiSSA; target_modules may then be empty.
    rank_pattern, alpha_pattern: peft's per-target r and alpha, {regex: value}: a target (module name, or
        `<module>.<param>` for target_parameters) takes the value of the first regex matching a tail of it at a dot
        (peft's get_pattern_key). peft writes them itself for all-linear on a transformers v5 MoE: w1 and w3 fused
        into gate_up_proj get r and alpha doubled there.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    target_parameters: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in PEFT_INIT:
            raise ValueError(f"LoraConfig.init={self.init!r}: expected one of {sorted(PEFT_INIT)}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
            else:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise ValueError(f"LoraConfig.target_modules={targets!r} is not a valid regex ({e})") from e
        else:
            self.target_modules = [str(t) for t in targets]  # also turns an OmegaConf ListConfig into a list
            if not self.target_modules and not self.target_parameters:
                raise ValueError("LoraConfig.target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        self.modules_to_save = [str(m) for m in (self.modules_to_save or [])]
        self.target_parameters = [str(p) for p in (self.target_parameters or [])]
        self.rank_pattern = {str(k): v for k, v in (self.rank_pattern or {}).items()}
        self.alpha_pattern = {str(k): float(v) for k, v in (self.alpha_pattern or {}).items()}
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}]={value!r}: a rank must be a positive int")
        for key in (*self.rank_pattern, *self.alpha_pattern):
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"LoraConfig rank_pattern/alpha_pattern key {key!r} is not a valid regex ({e})") from e
        if self.target_parameters:  # peft's ParamWrapper refuses the same: dropout cannot be factored out of W x
            for key, bad in (("dropout", self.dropout != 0), ("use_dora", self.use_dora), ("init", self.init == "pissa")):
                if bad:
                    raise ValueError(f"LoraConfig.{key}={getattr(self, key)!r} cannot be used with target_parameters "
                                     f"{self.target_parameters} (peft's parameter LoRA has no dropout, DoRA or PiSSA)")

    def rank_of(self, target: str) -> int:
        """r for the target named `target` (rank_pattern, else r)."""
        return _pattern_value(self.rank_pattern, target, self.r)

    def alpha_of(self, target: str) -> float:
        """alpha for the target named `target` (alpha_pattern, else alpha)."""
        return _pattern_value(self.alpha_pattern, target, self.alpha)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _pattern_value(patterns: dict[str, Any], target: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern matching the whole name or a tail of it after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", target):
            return value
    return default


def _base_device(base: nn.Module) -> torch.device:
    for tensor in (*base.parameters(), *base.buffers()):
        return tensor.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update, owning the base weight (see the module docstring).

    Args:
        base: an `nn.Linear` (absorbed) or a pluggable base (kept as `base_layer`).
        r, alpha, dropout, use_rslora, use_dora: as in `LoraConfig`.

    Shapes: x (..., in) -> (..., out); lora_A (r, in); lora_B (out, r); lora_magnitude_vector (out,).
    Adapter parameters are fp32 (like peft's default) and are cast to x's dtype in forward, which
    is parameter-sized; casting x up instead would save an fp32 copy of every activation.
    """

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.alpha, self.use_dora = r, alpha, use_dora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if type(base) is nn.Linear:  # exactly nn.Linear: a subclass (e.g. bnb's Linear4bit) may store packed weights
            self.register_parameter("weight", base.weight)
            self.register_parameter("bias", base.bias)
            self.base_layer: Optional[nn.Module] = None
        else:
            self.base_layer = base
            self.register_state_dict_post_hook(_flatten_base_keys)
            self.register_load_state_dict_pre_hook(_nest_base_keys)
        device = _base_device(base)
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, device=device))
        # No module and no op at all when dropout is 0 (peft keeps an Identity).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.disabled = False  # True: exactly the base layer (the DPO reference policy)
        self.merged = False
        self.base_is_residual = False  # PiSSA moved the top singular directions out of the base
        self._merge_norm: Optional[torch.Tensor] = None  # DoRA's row norm at merge time, for unmerge

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # A pluggable base's `weight`/`bias` are reachable as if this module owned them.
            base = self.__dict__.get("_modules", {}).get("base_layer")  # via __dict__: safe while unpickling
            if name in ("weight", "bias") and base is not None:
                return getattr(base, name)
            raise

    # ---- the base computation and its dense weight
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base: (..., in) -> (..., out). F.linear with a weight that needs no grad saves
        only the weight for backward, never x, so no custom autograd Function is needed."""
        if self.base_layer is not None:
            return self.base_layer(x)
        return F.linear(x, self.weight, self.bias)

    def base_weight(self) -> torch.Tensor:
        """The dense base weight (out, in), detached: ours, or the pluggable base's `dequantize()`."""
        if self.base_layer is None:
            return self.weight.detach()
        if not hasattr(self.base_layer, "dequantize"):
            raise TypeError(f"{type(self.base_layer).__name__} has no dequantize(): DoRA, PiSSA and merging need the dense weight")
        return self.base_layer.dequantize().detach()

    def delta_weight(self) -> torch.Tensor:
        """s * B A, fp32 (out, in)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def _dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row (out,), fp32, without gradient (treated as a constant)."""
        with torch.no_grad():
            return torch.linalg.norm(weight.float() + self.delta_weight(), dim=1)

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.disabled or self.merged:
            return result
        dropping = self.lora_dropout is not None and self.training
        dropped = self.lora_dropout(x) if dropping else x
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        # The cheap order: a rank-r intermediate (..., r), scaled there (r wide, not out wide).
        lora = F.linear(F.linear(dropped, a) * self.scaling, b)  # (..., out)
        if not self.use_dora:
            return result + lora
        weight = self.base_weight().to(x.dtype)
        scale = (self.lora_magnitude_vector / self._dora_norm(weight)).to(x.dtype)  # (out,)
        if not dropping:
            bias = self.bias if self.base_layer is None else getattr(self.base_layer, "bias", None)
            base_no_bias = result if bias is None else result - bias
        else:  # dropout is active: DoRA rescales W applied to the dropped input (peft's rule)
            base_no_bias = F.linear(dropped, weight)
        return result + (scale - 1) * base_no_bias + scale * lora

    # ---- initialisation
    @torch.no_grad()
    def reset_adapter(self, init: str) -> None:
        """Initialise A and B by `init` (see PEFT_INIT), then DoRA's magnitude to ||W + s B A||."""
        if init == "pissa":
            self._pissa_init()
        elif init in ("default", "none"):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "none":
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; expected one of {sorted(PEFT_INIT)}")
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self._dora_norm(self.base_weight()))

    def _pissa_init(self) -> None:
        """PiSSA: W = U S V^T; A = sqrt(S_r/s) V_r^T, B = U_r sqrt(S_r/s), base = W - s B A (fp32 SVD)."""
        if self.base_layer is not None:
            raise ValueError(
                f"PiSSA rewrites the base weight, which a {type(self.base_layer).__name__} base cannot hold exactly: "
                "initialise PiSSA on the full-precision model, then quantise the residual"
            )
        weight = self.weight.float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(s[: self.r] / self.scaling)
        self.lora_A.copy_(root[:, None] * vh[: self.r])
        self.lora_B.copy_(u[:, : self.r] * root[None, :])
        self.weight.copy_((weight - self.delta_weight()).to(self.weight.dtype))
        self.base_is_residual = True

    # ---- merging
    def merged_weight(self) -> torch.Tensor:
        """The dense weight (out, in) this layer computes with, fp32: W + s B A, DoRA-rescaled."""
        weight = self.base_weight().float()
        merged = weight + self.delta_weight()
        if self.use_dora:
            merged = (self.lora_magnitude_vector.float() / self._dora_norm(weight))[:, None] * merged
        return merged.detach()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` in place (for inference and export); forward then skips it."""
        if self.merged:
            return
        if self.base_layer is not None:
            raise ValueError(
                f"cannot merge into a {type(self.base_layer).__name__} base in place (re-quantising loses precision); "
                "use merge_and_unload(), which writes a dense merged nn.Linear"
            )
        if self.use_dora:
            self._merge_norm = self._dora_norm(self.weight)
        self.weight.copy_(self.merged_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to floating-point rounding)."""
        if not self.merged:
            return
        merged = self.weight.float()
        if self.use_dora:
            merged = merged / (self.lora_magnitude_vector.float() / self._merge_norm)[:, None]
            self._merge_norm = None
        self.weight.copy_((merged - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        base = "" if self.base_layer is None else ", pluggable base"
        kind = ", dora" if self.use_dora else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}{kind}{base}"


def _flatten_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: `<prefix>base_layer.<key>` -> `<prefix><key>` (keys as before the swap)."""
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _nest_base_keys(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: the inverse of `_flatten_base_keys`."""
    own = {prefix + name for name in ADAPTER_PARAMS}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in own and not k.startswith(prefix + "base_layer.")]:
        state_dict[prefix + "base_layer." + key[len(prefix):]] = state_dict.pop(key)
