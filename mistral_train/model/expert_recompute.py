"""The experts' training path that keeps only inputs and routing for backward (model/moe.py's Experts).

Autograd over the plain path keeps, per MoE layer, the gathered token copy (M, H), the gate/up product (M, 2I),
act(gate) (M, I), act(gate) * up (M, I) and the expert outputs (M, H), M = tokens x top-k: about 20 MiB a layer
at hidden 256 / intermediate 512 / 1024 tokens, most of what a Mixtral step saves. `RecomputedExperts` saves
the layer input x (N, H), which the router's linear keeps anyway, the sorted routing weights and two index
vectors, and recomputes the gate/up product in backward: one extra grouped GEMM (of the three a forward runs).

Backward, for the sorted rows of expert e (rows r = x[tokens], h = r W_gu,e^T, a = act(gate) * up,
o = a W_d,e^T, y = w * o) given dy:
    u = dy W_d,e                        (M, I): one GEMM gives both of the next two lines,
    dw = sum_I u * a                    (= sum_H dy * o: the down product is never recomputed)
    da = w * u                          (= (w * dy) W_d,e)
    dW_d,e = (w * dy)_e^T a_e,  dh from da through act(gate) * up,  dW_gu,e = dh_e^T r_e,  dr = dh W_gu,e
The k copies of each token are summed by viewing the rows in (token, slot) order as (N, k, H), which replaces
index_add (a scatter) in forward and the gather's scatter in backward.
"""

from __future__ import annotations

from typing import Callable

import torch

# product(rows (M, in), stack (E, out, in)) -> (M, out) and weight_grad(dy (M, out), rows (M, in)) -> (E, out, in):
# model/moe.py's grouped matmuls for this forward's grouping of rows by expert.
Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RecomputedExperts(torch.autograd.Function):
    """sum over each token's k experts of w * down_e(act(gate_e(x)) * up_e(x)); the same function as
    Experts' plain path, saving x, the routing weights and indices instead of the intermediates."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                tokens: torch.Tensor, slots: torch.Tensor, act: Callable, product: Product,
                weight_grad: Product) -> torch.Tensor:
        """x (N, H); weights (M,) fp32 routing weight of each sorted row; gate_up (E, 2I, H); down (E, H, I);
        tokens (M,) the token of each sorted row; slots (N*k,) the sorted row of each (token, slot)."""
        gate, up = product(x[tokens], gate_up).chunk(2, dim=-1)
        rows = product(act(gate).mul_(up), down)  # in place: no graph is recorded inside forward
        out = (rows * weights[:, None]).to(x.dtype)  # fp32 routing weights, as transformers multiplies them
        ctx.save_for_backward(x, weights, gate_up, down, tokens, slots)
        ctx.act, ctx.product, ctx.weight_grad = act, product, weight_grad
        return _sum_slots(out, slots, x.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weights, gate_up, down, tokens, slots = ctx.saved_tensors
        product, weight_grad = ctx.product, ctx.weight_grad
        rows = x[tokens]  # (M, H)
        hidden = product(rows, gate_up)  # (M, 2I): the one recomputed GEMM
        gate, up = hidden.chunk(2, dim=-1)
        with torch.enable_grad():  # act's own derivative, whatever act is
            gate_leaf = gate.detach().requires_grad_()
            activated = ctx.act(gate_leaf)
        acts = activated.detach() * up  # a (M, I)
        dy = grad[tokens]  # (M, H): each sorted row gets its token's gradient
        u = product(dy, down.transpose(1, 2))  # (M, I) = dy W_d,e
        d_weights = (u.float() * acts.float()).sum(-1)
        d_down = weight_grad((dy.float() * weights[:, None]).to(dy.dtype), acts) if ctx.needs_input_grad[3] else None
        del dy, acts
        d_acts = u.mul_(weights[:, None])  # da = w * u, in u's buffer (computed in fp32, stored in u's dtype)
        d_gate, = torch.autograd.grad(activated, gate_leaf, d_acts * up)
        # dh written over the recomputed gate/up product, which is no longer needed: no third (M, 2I) buffer
        hidden[:, : gate.shape[1]] = d_gate
        hidden[:, gate.shape[1]:] = d_acts * activated.detach()
        del d_gate, d_acts, u, activated, gate_leaf
        d_gate_up = weight_grad(hidden, rows) if ctx.needs_input_grad[2] else None
        d_x = _sum_slots(product(hidden, gate_up.transpose(1, 2)), slots, x.shape[0]) if ctx.needs_input_grad[0] else None
        return d_x, d_weights, d_gate_up, d_down, None, None, None, None, None


def _sum_slots(rows: torch.Tensor, slots: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """rows (N*k, H) in expert order -> (N, H): each token's k rows summed (a gather, no scatter)."""
    return rows[slots].view(num_tokens, -1, rows.shape[-1]).sum(1)
