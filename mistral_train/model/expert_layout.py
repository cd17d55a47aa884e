"""The on-disk layouts of Mixtral's expert weights, mapped onto our fused parameters (model/moe.py).

Two layouts exist, and both load:
- per expert (Mixtral's published checkpoints, and what transformers 5.25's save_pretrained writes):
  `layers.N.block_sparse_moe.gate.weight` (E, H) and `layers.N.block_sparse_moe.experts.M.{w1,w3}.weight`
  (I, H), `...w2.weight` (H, I);
- fused (transformers 5.x in memory): `layers.N.mlp.gate.weight`, `layers.N.mlp.experts.gate_up_proj`
  (E, 2I, H: the w1 rows, then the w3 rows) and `layers.N.mlp.experts.down_proj` (E, H, I).
The renames are transformers' own (conversion_mapping.py, "mixtral"). We write the per-expert layout, as the
installed transformers does, so every reader of Mixtral folders (transformers 4 and 5, vLLM) loads ours.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from mistral_train.errors import TensorNameError

_PER_EXPERT = re.compile(r"^(?P<layer>.*)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<w>w[123])\.weight$")
_ROUTER = re.compile(r"^(?P<layer>.*)\.block_sparse_moe\.gate\.weight$")
_FUSED = re.compile(r"^(?P<layer>.*)\.mlp\.experts\.(?P<name>gate_up_proj|down_proj)$")


def our_name(key: str) -> str:
    """A router key of the per-expert layout under our name (`block_sparse_moe.gate` -> `mlp.gate`)."""
    match = _ROUTER.match(key)
    return f"{match['layer']}.mlp.gate.weight" if match else key


class ExpertGathering:
    """Collects the per-expert tensors of a folder (they may span shards) into fused parameters.

    Args:
        config: the model's MistralConfig; each layer must bring w1, w2 and w3 of its `num_local_experts` experts
            (read only when a folder has per-expert tensors).
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}  # layer prefix -> (w, expert) -> tensor

    def offer(self, key: str, read: Callable[[], torch.Tensor]) -> bool:
        """Keep `key`'s tensor (read by `read`) when it is one expert's w1/w2/w3; True when taken."""
        match = _PER_EXPERT.match(key)
        if match is None:
            return False
        self.pending.setdefault(match["layer"], {})[(match["w"], int(match["expert"]))] = read()
        return True

    def finish(self, source: str) -> dict[str, torch.Tensor]:
        """The fused parameters under our names; TensorNameError naming the first missing expert tensor."""
        fused, n = {}, self.config.num_local_experts if self.pending else 0
        for layer, parts in self.pending.items():
            beyond = sorted(e for _, e in parts if e >= n)
            if beyond:
                raise TensorNameError(f"{source}: `{layer}.block_sparse_moe.experts.{beyond[0]}` is beyond "
                                      f"num_local_experts ({n})")
            for w in ("w1", "w2", "w3"):
                for e in range(n):
                    if (w, e) not in parts:
                        raise TensorNameError(f"{source}: `{layer}.block_sparse_moe.experts.{e}.{w}.weight` is missing "
                                              f"(num_local_experts is {n})")
            stack = lambda w: torch.stack([parts[(w, e)] for e in range(n)])  # noqa: E731
            fused[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([stack("w1"), stack("w3")], dim=1)
            fused[f"{layer}.mlp.experts.down_proj"] = stack("w2")
        self.pending.clear()
        return fused


def per_expert_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with our fused expert parameters split into the per-expert layout transformers writes
    (keys in the same place; other keys untouched). Each slice is its own contiguous copy (safetensors
    refuses views that share storage), so saving holds the expert weights twice while it writes."""
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        fused = _FUSED.match(key)
        if fused is None:
            router = re.match(r"^(?P<layer>.*)\.mlp\.gate\.weight$", key)
            out[f"{router['layer']}.block_sparse_moe.gate.weight" if router else key] = tensor
            continue
        prefix = f"{fused['layer']}.block_sparse_moe.experts"
        for e in range(tensor.shape[0]):
            if fused["name"] == "gate_up_proj":
                w1, w3 = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w1.clone(), w3.clone()
            else:
                out[f"{prefix}.{e}.w2.weight"] = tensor[e].clone()
    return out
