"""Mistral Small 4's experts (`mlp_kind: shared_moe`): shared experts every token passes, plus routed experts
chosen by group-limited top-k, as transformers' Mistral4MoE computes them.

Routing (transformers' Mistral4TopkRouter, DeepSeek-V3's without the score-correction bias): softmax of the router
logits (in their dtype); the E experts fall in `n_group` groups, each scored by the sum of its two best
probabilities; only the `topk_group` best groups stay; the top `num_experts_per_tok` experts among them are chosen
with their probabilities as weights, renormalised to sum to 1 when `norm_topk_prob` (+1e-20, as transformers), then
multiplied by `routed_scaling_factor`. The routed experts are model/moe.py's Experts (grouped dispatch: each expert
runs over its own tokens only), of width `moe_intermediate_size`; the shared experts are one SwiGLU MLP of width
moe_intermediate_size * n_shared_experts. transformers' Mistral4 has no load-balancing loss, so none is recorded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mistral_train.model.moe import Experts, Routing


def group_limited_route(logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                        scaling: float) -> Routing:
    """Route N tokens by their (N, E) router logits: top-k experts (N, k) among the `topk_group` best of `n_group`
    groups, and their weights (N, k)."""
    N, E = logits.shape
    probs = logits.softmax(dim=-1)
    by_group = probs.view(N, n_group, E // n_group)
    group_score = by_group.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group): each group's two best
    kept_groups = group_score.topk(topk_group, dim=-1).indices
    kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept_groups, True)  # (N, n_group)
    candidates = probs.masked_fill(~kept[:, :, None].expand_as(by_group).reshape(N, E), 0.0)
    experts = candidates.topk(top_k, dim=-1).indices  # (N, k)
    weights = probs.gather(1, experts)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(logits, experts, weights * scaling)


class SharedRoutedMoE(nn.Module):
    """Mistral4MoE in place of the dense MLP: `gate` (the router, (E, H)), `experts` and `shared_experts`.

    Args:
        config: a MistralConfig with num_local_experts, num_experts_per_tok, moe_intermediate_size, n_group,
            topk_group, norm_topk_prob and routed_scaling_factor.
        act: the experts' activation.
        shared: the shared experts' MLP (blocks.py builds it: width moe_intermediate_size * n_shared_experts).
    """

    def __init__(self, config, act: Callable, shared: nn.Module) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.moe_intermediate_size, act,
                               config.initializer_range)
        self.shared_experts = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        routing = group_limited_route(self.gate(flat), self.top_k, self.n_group, self.topk_group, self.norm_topk_prob,
                                      self.scaling)
        return self.experts(flat, routing).reshape(B, T, H) + self.shared_experts(x)
