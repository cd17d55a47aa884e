"""Mixtral's sparse mixture of experts (`mlp_kind: moe`) and its load-balancing loss.

The maths is transformers' MixtralSparseMoeBlock: router logits, softmax in fp32, top-k, the k weights
renormalised to sum to 1, `router_jitter_noise` (multiplicative, uniform) on the block's input in training.
Parameter names and shapes are transformers' in-memory ones (`mlp.gate.weight` (E, H),
`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)); the on-disk layouts are
model/expert_layout.py's.

Compute scales with the active experts: the N*k (token, expert) assignments are sorted by expert, each
expert runs one matmul over exactly its tokens (torch._grouped_mm: one call for all experts, or one
F.linear per expert where torch lacks it), and the weighted results are summed back per token with
index_add. No path runs an expert on a token not routed to it.

The auxiliary loss is transformers' load_balancing_loss_func (Switch Transformer eq. 4-6): over all MoE
layers, E * sum_e f_e * P_e, with f_e the share of top-k assignments to expert e and P_e its mean router
probability, both over real tokens only (attention_mask). Unlike transformers it never depends on
`output_router_logits`: every training forward with grad records it (`record_aux_loss`), and the loop adds
`router_aux_loss_coef` times it to the loss (`take_aux_loss`); a coefficient of 0 turns it off.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mistral_train.model.expert_recompute import RecomputedExperts

# torch's grouped GEMM (one kernel over all experts' token groups); CPU forward and backward are exact
# against per-expert matmuls in torch 2.13 (tests/model/test_moe.py compares both paths).
GROUPED_MM = hasattr(torch, "_grouped_mm")


class Routing(NamedTuple):
    """Where each token goes: its router logits (N, E), top-k expert ids (N, k) and their weights (N, k, fp32)."""

    logits: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Softmax in fp32, top-k, renormalised over the k chosen (transformers' MixtralTopKRouter)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return Routing(logits, experts, weights / weights.sum(dim=-1, keepdim=True))


def expert_groups(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) assignments sorted by expert: (order (N*k,) indices into the flattened (N, k)
    assignments, counts (E,) of tokens per expert). A stable sort keeps each expert's tokens in order."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                   grouped: Optional[bool] = None) -> torch.Tensor:
    """Rows of `x` (M, in) grouped by expert (`counts` (E,) consecutive rows each) times their expert's
    `weight[e]` (E, out, in) transposed: (M, out). Each expert's matmul sees only its own rows."""
    if (grouped if grouped is not None else _grouped_mm_usable(x)) and _aligned(x, weight):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    parts = [F.linear(rows, weight[e]) for e, rows in enumerate(x.split(counts.tolist())) if rows.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def grouped_weight_grad(dy: torch.Tensor, x: torch.Tensor, counts: torch.Tensor,
                        grouped: Optional[bool] = None) -> torch.Tensor:
    """The weight gradient of grouped_linear: dy (M, out) and x (M, in) grouped by `counts` (E,) -> (E, out, in),
    expert e's dy_e^T x_e (zeros for an expert with no rows)."""
    if (grouped if grouped is not None else _grouped_mm_usable(x)) and all(w * x.element_size() % 16 == 0 for w in (dy.shape[1], x.shape[1])):
        return torch._grouped_mm(dy.t(), x, offs=torch.cumsum(counts, 0).to(torch.int32))
    out = x.new_zeros(counts.shape[0], dy.shape[1], x.shape[1])
    for e, (d, rows) in enumerate(zip(dy.split(counts.tolist()), x.split(counts.tolist()))):
        if rows.shape[0]:
            torch.mm(d.t(), rows, out=out[e])
    return out


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    """torch._grouped_mm where it runs: eagerly for any float dtype, but under torch.compile on CPU only for bf16
    (its compiled kernel rejects fp32 inputs there), so compiled fp32 decoding takes the per-expert path."""
    return GROUPED_MM and (x.dtype == torch.bfloat16 or x.is_cuda or not torch.compiler.is_compiling())


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm needs row strides that are multiples of 16 bytes (e.g. fp32 widths divisible by 4)."""
    return all(width * x.element_size() % 16 == 0 for width in (weight.shape[1], weight.shape[2]))


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D tensors (transformers' MixtralExperts)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: Callable, std: float) -> None:
        super().__init__()
        self.num_experts, self.act = num_experts, act
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # w1 rows, then w3
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # w2
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)
        self.grouped: Optional[bool] = None  # None: GROUPED_MM decides; tests pin either path
        # Training keeps only inputs and routing for backward and recomputes the rest (expert_recompute.py); the
        # plain path (everything kept) runs without grad, and where an adapter or NF4 stack wraps a weight.
        self.recompute = True

    def project(self, name: str, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`rows` (M, in) grouped by expert (`counts` (E,)) times expert weight `name` ("gate_up_proj" | "down_proj"):
        (M, out). The one place an expert weight is used, so quantisation and adapters wrap it here: a module in
        the weight's place (quant/nf4_experts.py's NF4 stack) runs its own grouped product, and a module named
        `<name>_lora` (adapters/expert_lora.py) adds its per-expert low-rank term to the result. Both get `product`,
        this grouping's matmul of rows by a stack of per-expert weights (they sit below model/ and import none of it)."""

        def product(x: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:  # (M, in) x (E, out, in) -> (M, out)
            return grouped_linear(x, stack, counts, self.grouped)

        weight = getattr(self, name)
        out = weight(rows, product) if isinstance(weight, nn.Module) else product(rows, weight)
        adapter = self._modules.get(name + "_lora")
        return out if adapter is None else adapter(rows, out, product)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (N, H) -> (N, H): sum over each token's k experts of weight * expert(x)."""
        k = routing.experts.shape[1]
        order, counts = expert_groups(routing.experts, self.num_experts)
        tokens = order // k  # the token of each sorted assignment
        if self.recompute and torch.is_grad_enabled() and self._plain_weights():
            slots = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
            return RecomputedExperts.apply(
                x, routing.weights.reshape(-1)[order], self.gate_up_proj, self.down_proj, tokens, slots, self.act,
                lambda rows, stack: grouped_linear(rows, stack, counts, self.grouped),
                lambda dy, rows: grouped_weight_grad(dy, rows, counts, self.grouped))
        rows = x[tokens]  # (N*k, H), grouped by expert
        gate, up = self.project("gate_up_proj", rows, counts).chunk(2, dim=-1)
        out = self.project("down_proj", self.act(gate) * up, counts)  # (N*k, H)
        # fp32 routing weights, as transformers multiplies them, then back to the activations' dtype
        out = (out * routing.weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, out)

    def _plain_weights(self) -> bool:
        """Both expert weights are plain tensors with no adapter: what RecomputedExperts differentiates."""
        return all(isinstance(getattr(self, name), torch.Tensor) and name + "_lora" not in self._modules
                   for name in ("gate_up_proj", "down_proj"))


class SparseMoE(nn.Module):
    """Mixtral's MoE block in place of the dense MLP: `gate` (the router) and `experts`.

    Args:
        config: a MistralConfig with the expert fields (num_local_experts, num_experts_per_tok, router_jitter_noise).
        act: the experts' activation (blocks.py's table for config.hidden_act).
    """

    def __init__(self, config, act: Callable) -> None:
        super().__init__()
        self.top_k, self.jitter = config.num_experts_per_tok, config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size, act,
                               config.initializer_range)
        self.router_logits: Optional[torch.Tensor] = None  # this forward's (N, E), kept for the aux loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        if self.training and self.jitter > 0:  # transformers jitters the input of both router and experts
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = x.reshape(B * T, H)
        routing = route(self.gate(flat), self.top_k)
        # Kept only when a backward will use it. Not when a checkpoint recomputes this block inside backward
        # (graph task id != -1): those logits would keep the recomputed block's graph (its attention's saved
        # tensors) alive until the next forward, ~9 MiB a layer on the bench config, for no aux loss.
        recording = self.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1
        self.router_logits = routing.logits if recording else None
        return self.experts(flat, routing).reshape(B, T, H)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int,
                        keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' load_balancing_loss_func: E * sum_e f_e * P_e over all layers' (N, E) logits.

    f_e: top-k assignments to expert e per real token, P_e: mean router probability of e, both summed over
    layers and divided by (layers x real tokens); `keep` (B, T) is 1 on real tokens (None: all are).
    """
    device = router_logits[0].device
    mask = torch.ones(router_logits[0].shape[0], device=device) if keep is None else keep.reshape(-1).float()
    assigned = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        assigned = assigned.index_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
    rows = mask.sum() * len(router_logits)
    return num_experts * torch.sum((assigned / rows) * (prob_sum / rows))


def record_aux_loss(model: nn.Module, keep: Optional[torch.Tensor]) -> None:
    """After a forward of `model` (Mistral) in training with grad: set `model.expert_load` to this forward's tokens
    per expert per MoE layer and, with a non-zero coefficient, `model.router_aux_loss` to its load-balancing loss;
    `keep` excludes padding from both."""
    config = model.config
    if config.mlp_kind != "moe" or not (model.training and torch.is_grad_enabled()):
        return
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE) and m.router_logits is not None]
    if blocks:
        logits = [m.router_logits for m in blocks]
        model.expert_load = expert_load(logits, config.num_local_experts, config.num_experts_per_tok, keep)
        if config.router_aux_loss_coef != 0:
            model.router_aux_loss = load_balancing_loss(logits, config.num_local_experts, config.num_experts_per_tok, keep)
        for m in blocks:
            m.router_logits = None


@torch.no_grad()
def expert_load(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens routed to each expert, (layers, E) int64, over real tokens (`keep` (B, T), None: all): the router's
    top-k choices as the experts received them. Each row sums to top_k x real tokens."""
    mask = None if keep is None else keep.reshape(-1)
    rows = []
    for logits in router_logits:
        chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices  # as route() picks
        rows.append(torch.bincount((chosen if mask is None else chosen[mask]).reshape(-1), minlength=num_experts))
    return torch.stack(rows)


def take_expert_load(model: nn.Module) -> Optional[torch.Tensor]:
    """The (layers, E) tokens per expert recorded by the last training forward of `model` (wrapped or not), or
    None; taken once, like the aux loss."""
    inner = getattr(model, "module", model)
    load = getattr(inner, "expert_load", None)
    if load is not None:
        inner.expert_load = None
    return load


def take_aux_loss(model: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(coefficient * aux loss, aux loss) recorded by the last training forward of `model` (wrapped or not), or
    None; taken once, so a value never counts for a second step."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed keep the model as .module
    aux = getattr(inner, "router_aux_loss", None)
    if aux is None:
        return None
    inner.router_aux_loss = None
    return inner.config.router_aux_loss_coef * aux, aux.detach()
