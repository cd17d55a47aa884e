"""LoRA on 3-D expert weights (E, out, in): peft's parameter-target LoRA (`target_parameters`, its ParamWrapper).

peft adapts a stacked expert weight W (E, out, in) with ONE pair of linears over all experts:

    lora_A (E*r, in)   rows e*r .. e*r+r-1 are expert e's A_e (r, in)          (expert-major)
    lora_B (out, r*E)  column j*E + e is column j of expert e's B_e (out, r)    (rank-major, experts interleaved)
    W_e + s * B_e A_e  for each expert e, s = alpha / r (rsLoRA: alpha / sqrt(r))

(peft's ParamWrapper.get_delta_weight: A.reshape(E, r, in), B.reshape(out, r, E), einsum "o r e, e r i -> e o i".)
We keep A and B in exactly that layout, so peft's file is our state, and compute the same function without
forming the (E, out, in) delta: each expert's rows go through their own A_e then B_e (two grouped matmuls of
width r), added to the base product. Parameter names are transformers' in-memory ones (mlp.experts.gate_up_proj).

The adapter sits beside the weight as the expert module's child `<param>_lora`; model/moe.py's Experts.project
calls it. peft nests one wrapper per targeted parameter of a module, in the module's parameter order, the last
outermost: the disk key of parameter i gets one `base_layer.` per targeted parameter after it (`depth`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

LORA_SUFFIX = "_lora"  # the adapter of expert weight `gate_up_proj` is the child `gate_up_proj_lora`


# product(x (M, in), stack (E, out, in)) -> (M, out): model/moe.py's grouped matmul for the current grouping
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertLoRA(nn.Module):
    """The low-rank update of one expert weight of shape (E, out, in), in peft's layout (module docstring).

    Args:
        num_experts, out_features, in_features: the weight's shape.
        r, alpha, use_rslora: as in LoraConfig.
        parameter: the adapted weight's name on its module ("gate_up_proj").
        depth: how many of the module's targeted weights come after this one (peft's `base_layer.` nesting).
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, r: int, alpha: float,
                 use_rslora: bool = False, parameter: str = "", depth: int = 0, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.r, self.alpha, self.parameter, self.depth = r, alpha, parameter, depth
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.zeros(num_experts * r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * num_experts, device=device))
        self.disabled = False  # True: exactly the base weight (the DPO reference policy)
        self.merged = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert (A (E, r, in), B (E, out, r)) views of the peft-layout parameters."""
        a = self.lora_A.reshape(self.num_experts, self.r, self.in_features)
        b = self.lora_B.reshape(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        return a, b

    def forward(self, rows: torch.Tensor, base_out: torch.Tensor, product: Product) -> torch.Tensor:
        """base_out (M, out) plus s * B_e A_e x for each row x (M, in) of expert e (grouped as `product` groups)."""
        if self.disabled or self.merged:
            return base_out
        a, b = self.factors()
        mid = product(rows, a.to(rows.dtype)) * self.scaling  # (M, r): scaled where it is r wide
        return base_out + product(mid, b.to(rows.dtype).contiguous())

    def delta_weight(self) -> torch.Tensor:
        """s * B_e A_e for every expert, fp32 (E, out, in): peft's get_delta_weight."""
        a, b = self.factors()
        return self.scaling * torch.bmm(b.float(), a.float())

    @torch.no_grad()
    def reset(self, init: str) -> None:
        """peft's reset_lora_parameters for its nn.Linear pair: A kaiming-uniform(a=sqrt(5)) over its (E*r, in)
        matrix, B zero ("default"/"gaussian" as peft: A ~ N(0, 1/r)); "none": B random too (tests)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "none":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (f"{self.parameter}: experts={self.num_experts}, out={self.out_features}, in={self.in_features}, "
                f"r={self.r}, scaling={self.scaling:g}")


def expert_weights(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every 3-D expert weight, `<module>.<param>` -> (module, param), in model order. A weight stored in NF4 is
    a module in the parameter's place that carries its `shape` (quant/nf4_experts.py)."""
    found: dict[str, tuple[str, str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 3:
                found[f"{name}.{pname}" if name else pname] = (name, pname)
        for cname, child in module.named_children():
            if len(getattr(child, "expert_shape", ())) == 3:
                found[f"{name}.{cname}" if name else cname] = (name, cname)
    return found


def expert_shape(module: nn.Module, param: str) -> tuple[int, int, int]:
    """(E, out, in) of expert weight `param` of `module`, a Parameter or an NF4 stack."""
    weight = getattr(module, param)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else tuple(weight.expert_shape)


def expert_adapters(model: nn.Module) -> list[tuple[str, ExpertLoRA]]:
    """(`<module>.<param>`, adapter) for every ExpertLoRA, named by the weight it adapts."""
    return [(f"{name.rpartition('.')[0]}.{m.parameter}".lstrip("."), m) for name, m in model.named_modules()
            if isinstance(m, ExpertLoRA)]


def attach(model: nn.Module, targets: list[str], rank_of: Callable[[str], int], alpha_of: Callable[[str], float],
           use_rslora: bool, init: str) -> None:
    """Put an ExpertLoRA beside each expert weight in `targets` (`<module>.<param>` names from expert_weights), of
    rank `rank_of(name)` and alpha `alpha_of(name)` (LoraConfig's, with its rank and alpha patterns)."""
    weights = expert_weights(model)
    per_module: dict[str, list[str]] = {}
    for key in weights:  # model order = each module's parameter order, as peft nests
        if key in targets:
            per_module.setdefault(weights[key][0], []).append(weights[key][1])
    for module_name, params in per_module.items():
        module = model.get_submodule(module_name)
        for i, param in enumerate(params):
            E, out, inp = expert_shape(module, param)
            weight = getattr(module, param)
            device = weight.device if isinstance(weight, torch.Tensor) else next(weight.buffers()).device
            key = f"{module_name}.{param}"
            adapter = ExpertLoRA(E, out, inp, rank_of(key), alpha_of(key), use_rslora, param, depth=len(params) - 1 - i,
                                 device=device)
            adapter.reset(init)
            setattr(module, param + LORA_SUFFIX, adapter)


@torch.no_grad()
def merge_expert(model: nn.Module, name: str, adapter: ExpertLoRA) -> None:
    """Fold the adapter into its float expert weight in place (refused for an NF4 stack: re-quantising loses
    precision; merge_and_unload dequantises it instead)."""
    module_name, _, param = name.rpartition(".")
    weight = getattr(model.get_submodule(module_name) if module_name else model, param)
    if adapter.merged:
        return
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"cannot merge into the NF4 expert weight `{name}` in place (re-quantising loses precision); "
                         "use merge_and_unload(), which writes a dense merged weight")
    weight.add_(adapter.delta_weight().to(weight.dtype))
    adapter.merged = True


@torch.no_grad()
def unmerge_expert(model: nn.Module, name: str, adapter: ExpertLoRA) -> None:
    module_name, _, param = name.rpartition(".")
    if adapter.merged:
        weight = getattr(model.get_submodule(module_name) if module_name else model, param)
        weight.sub_(adapter.delta_weight().to(weight.dtype))
        adapter.merged = False


@torch.no_grad()
def unload_expert(model: nn.Module, name: str, adapter: ExpertLoRA) -> None:
    """merge_and_unload for one expert weight: the weight becomes a plain Parameter holding W + delta (an NF4
    stack dequantised first), and the adapter is removed."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    weight = getattr(module, param)
    if isinstance(weight, torch.Tensor):
        merge_expert(model, name, adapter)
    else:
        dense = weight.dequantize().float() + adapter.delta_weight()
        delattr(module, param)
        setattr(module, param, nn.Parameter(dense.to(weight.compute_dtype)))
    delattr(module, param + LORA_SUFFIX)


def _named(target: str, key: str) -> bool:
    """peft's rule for target_parameters: the full `<module>.<param>` name, or a tail of it at a dot."""
    return key == target or key.endswith("." + target)


def find_parameter_targets(model: nn.Module, targets: list[str], linear: Callable[[nn.Module], bool]
                           ) -> tuple[list[str], list[str]]:
    """(3-D expert weights `<module>.<param>`, linear modules whose 2-D `weight` is named) that `targets`
    (LoraConfig.target_parameters) pick. A named 2-D weight of a linear layer (e.g. the router, `mlp.gate.weight`)
    gets a plain LoRALinear: peft's ParamWrapper computes W + s B A for it too, with the same A, B and keys.

    Raises ValueError naming the entry: one that matches no parameter (listing the expert weights there are),
    or one that names a parameter that is neither a 3-D expert weight nor a linear layer's weight.
    """
    experts = expert_weights(model)
    params = {f"{m}.{p}" if m else p: (m, p) for m, mod in model.named_modules()
              for p, _ in mod.named_parameters(recurse=False)}
    chosen_experts: list[str] = []
    chosen_linears: list[str] = []
    for target in targets:
        hits = [key for key in experts if _named(target, key)]
        chosen_experts += hits
        for key in (k for k in params if _named(target, k) and k not in experts):
            module_name, pname = params[key]
            module = model.get_submodule(module_name)
            if pname != "weight" or not linear(module):
                raise ValueError(f"target_parameters entry {target!r} names `{key}` {tuple(getattr(module, pname).shape)}: "
                                 "LoRA targets 3-D expert weights (experts, out, in) or a linear layer's 2-D weight")
            chosen_linears.append(module_name)
            hits.append(key)
        if not hits:
            kinds = sorted({key.rpartition(".")[2] for key in experts}) or "none: the model has no experts"
            raise ValueError(f"target_parameters entry {target!r} matches no parameter of the model (it must equal "
                             f"`<module>.<param>` or end with `.{target}`); its expert weights are {kinds}")
    # model order (each module's parameter order), never the entries' order: peft nests by it, and peft writes
    # target_parameters from a set, so a file's order says nothing
    return [key for key in experts if key in chosen_experts], list(dict.fromkeys(chosen_linears))

