"""model/moe.py's dispatch: each expert's matmul gets exactly its routed tokens (counted), both paths (torch's
grouped GEMM and one F.linear per expert) equal a dense reference that runs every expert on every token and keeps
the routed ones, forward and backward; routing and the aux loss against hand formulas; the config's checks; the
per-expert layout's errors; recomputation (gradient checkpointing) keeps the aux loss and its gradient."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mistral_train import Mistral, MistralConfig
from mistral_train.errors import FolderError, TensorNameError
from mistral_train.model import moe
from mistral_train.model.moe import Experts, expert_groups, load_balancing_loss, route, take_aux_loss
from mistral_train.model.saved_bytes import SavedBytes
from tests.conftest import randomize_, tiny_kwargs

E, H, I, K, N = 4, 8, 12, 2, 10  # widths fit torch._grouped_mm (16-byte rows)


def _experts_and_routing(seed: int = 0, intermediate: int = I):
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(E, H, intermediate, F.silu, std=0.5)
    x = torch.randn(N, H, generator=gen, requires_grad=True)
    logits = torch.randn(N, E, generator=gen)
    logits[:, 3] -= 100.0  # expert 3 never chosen: an empty group on every path
    return experts, x, route(logits, K)


def _dense_reference(experts: Experts, x: torch.Tensor, routing) -> torch.Tensor:
    """Every expert on every token, then each token keeps its k experts' outputs, weighted (no dispatch at all)."""
    gate, up = torch.einsum("nh,eoh->eno", x, experts.gate_up_proj).chunk(2, dim=-1)
    every = torch.einsum("eni,ehi->enh", experts.act(gate) * up, experts.down_proj)  # (E, N, H)
    weight = torch.zeros(N, E).scatter_add(1, routing.experts, routing.weights)  # (N, E), 0 where not routed
    return torch.einsum("ne,enh->nh", weight, every)


@pytest.mark.parametrize("grouped,intermediate", [(True, I), (False, I), (True, 6)],
                         ids=["grouped_mm", "per_expert_linear", "unaligned_width_falls_back"])
def test_dispatch_equals_dense_reference_forward_and_backward(grouped, intermediate):
    experts, x, routing = _experts_and_routing(intermediate=intermediate)
    experts.grouped = grouped
    got = experts(x, routing)
    grad = torch.randn_like(got)
    got.backward(grad)
    ours = [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]
    for t in (x, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    expected = _dense_reference(experts, x, routing)
    expected.backward(grad)
    assert (got - expected).abs().max() <= 1e-5
    for g, t in zip(ours, (x, experts.gate_up_proj, experts.down_proj)):
        assert (g - t.grad).abs().max() <= 1e-5
    assert experts.down_proj.grad[3].abs().max() == 0  # the unused expert takes no gradient


def test_each_expert_matmul_gets_only_its_tokens(monkeypatch):
    experts, x, routing = _experts_and_routing(seed=1)
    experts.grouped = False
    calls = []
    real_linear = F.linear

    def counting_linear(rows, weight):
        expert = next(e for e in range(E) for p in (experts.gate_up_proj, experts.down_proj) if weight is p[e]
                      or (weight.data_ptr() == p[e].data_ptr() and weight.shape == p[e].shape))
        calls.append((expert, rows.detach().clone()))
        return real_linear(rows, weight)

    monkeypatch.setattr(moe.F, "linear", counting_linear)
    experts(x, routing)
    routed = {e: [n for n in range(N) if e in routing.experts[n].tolist()] for e in range(E)}
    assert sorted({e for e, _ in calls}) == [e for e in range(E) if routed[e]]  # unused experts: no call
    assert sum(rows.shape[0] for _, rows in calls) == 2 * N * K  # gate_up + down over N*k rows, never N*E
    for e, rows in calls[::1]:
        if rows.shape[1] == H:  # the gate_up call sees the routed tokens themselves, in token order
            assert torch.equal(rows, x.detach()[routed[e]])


def test_grouped_gemm_gets_the_expert_offsets(monkeypatch):
    experts, x, routing = _experts_and_routing(seed=2)
    experts.grouped = True
    seen = []
    real = torch._grouped_mm

    def recording(a, b, offs):
        seen.append((a.shape[0], offs.tolist()))
        return real(a, b, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    experts(x, routing)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
    assert seen == [(N * K, torch.cumsum(counts, 0).tolist())] * 2 and counts[3] == 0


def test_routing_renormalises_the_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    routing = route(logits, 2)
    p = torch.softmax(logits, -1)
    assert routing.experts.tolist() == [[0, 1], [2, 3]]
    assert torch.allclose(routing.weights[0], p[0, :2] / p[0, :2].sum())
    order, counts = expert_groups(routing.experts, 4)
    assert counts.tolist() == [1, 1, 1, 1] and (order // 2).tolist() == [0, 0, 1, 1]


def test_aux_loss_hand_formula():
    """2 tokens, 2 experts, top-1, one layer: f = (1/2, 1/2), P = mean softmax; E * sum f*P = 2 * 0.5 * (P0 + P1) = 1.
    The second token masked: f = (1, 0), P = softmax of token 0, so 2 * p00."""
    logits = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    assert abs(float(load_balancing_loss(logits, 2, 1)) - 1.0) <= 1e-6
    p00 = torch.softmax(torch.tensor([1.0, 0.0]), -1)[0]
    keep = torch.tensor([[1, 0]])
    assert abs(float(load_balancing_loss(logits, 2, 1, keep)) - 2 * float(p00)) <= 1e-6


def _tiny_mixtral(**overrides) -> Mistral:
    config = MistralConfig.from_hf_dict({"model_type": "mixtral", **tiny_kwargs(num_local_experts=4), **overrides})
    torch.manual_seed(0)
    return randomize_(Mistral(config), seed=0)


@pytest.mark.parametrize("policy", ["block", "mlp"])
def test_recomputation_keeps_aux_loss_and_gradients(policy):
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name in ("none", policy):
        model = _tiny_mixtral().train()
        model.set_gradient_checkpointing(name)
        loss = model(ids, labels=ids)
        coef_aux, aux = take_aux_loss(model)
        (loss + coef_aux).backward()
        assert take_aux_loss(model) is None  # taken once
        # the recompute inside backward records no logits: they would keep the recomputed block's graph alive
        assert all(m.router_logits is None for m in model.modules() if isinstance(m, moe.SparseMoE))
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads["none"].items():
        assert (g - grads[policy][n]).abs().max() <= 1e-6, n


def test_aux_loss_off_with_coefficient_zero_and_outside_training():
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    model = _tiny_mixtral(router_aux_loss_coef=0.0).train()
    model(ids)
    assert take_aux_loss(model) is None
    model = _tiny_mixtral().eval()
    model(ids)
    assert take_aux_loss(model) is None
    model.train()
    with torch.no_grad():  # a reference policy's forward: nothing to add to a backward
        model(ids)
    assert take_aux_loss(model) is None


def test_expert_config_errors_name_the_key():
    with pytest.raises(ValueError, match="`num_experts_per_tok` must be between 1 and `num_local_experts` \\(4\\)"):
        MistralConfig(**tiny_kwargs(), mlp_kind="moe", model_type="mixtral", num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(FolderError, match="router_jitter_noise"):
        MistralConfig.from_hf_dict({"model_type": "mixtral", **tiny_kwargs(), "router_jitter_noise": -0.1})
    dense_with_experts = MistralConfig(**tiny_kwargs(), mlp_kind="moe")  # model_type mistral
    with pytest.raises(ValueError, match="`mlp_kind` cannot be written as model_type 'mistral'"):
        dense_with_experts.to_hf_dict()


def test_missing_expert_tensor_is_named(tmp_path):
    model = _tiny_mixtral()
    model.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(TensorNameError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight` is missing"):
        Mistral.from_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4


def _plain_and_recomputed(grouped: bool, act, dtype=torch.float32, frozen: bool = False):
    """Output and gradients (x, router logits, gate_up_proj, down_proj) of the plain path and the recompute path
    on the same experts, routing and upstream gradient."""
    gen = torch.Generator().manual_seed(3)
    experts = Experts(5, 16, 24, act, std=0.5).to(dtype)
    experts.grouped = grouped
    experts.requires_grad_(not frozen)
    x = torch.randn(23, 16, generator=gen).to(dtype).requires_grad_()
    logits = torch.randn(23, 5, generator=gen)
    logits[:, 1] -= 100.0  # an expert with no tokens
    logits.requires_grad_()
    grad = torch.randn(23, 16, generator=gen).to(dtype)
    wrt = (x, logits) if frozen else (x, logits, experts.gate_up_proj, experts.down_proj)
    results = []
    for recompute in (False, True):
        experts.recompute = recompute
        out = experts(x, route(logits, K))
        results.append((out, torch.autograd.grad(out, wrt, grad)))
    return results


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per_expert_linear"])
@pytest.mark.parametrize("act", [F.silu, F.gelu], ids=["silu", "gelu"])
def test_recompute_path_equals_plain_path(grouped, act):
    """RecomputedExperts (saves x and routing, recomputes gate/up in backward, takes the routing weights' gradient
    from dy W_d instead of the down product) against autograd over the plain path: same output bit for bit (the
    same products, k=2 summed in either order), gradients to rounding (1e-6 of their scale)."""
    (plain, plain_grads), (ours, our_grads) = _plain_and_recomputed(grouped, act)
    assert torch.equal(plain, ours)
    for name, a, b in zip(("x", "router logits", "gate_up_proj", "down_proj"), plain_grads, our_grads):
        assert (a - b).abs().max() <= 1e-6 * a.abs().max(), name
        assert a.abs().max() > 0, name
    assert our_grads[3][1].abs().max() == 0 and our_grads[2][1].abs().max() == 0  # the unused expert: no gradient


def test_recompute_path_frozen_experts_and_bf16():
    """Frozen expert weights (the gradient goes to x and the router only) and bf16 activations with fp32 routing
    weights, as the plain path computes them (bf16: equal to bf16 rounding)."""
    (_, plain), (_, ours) = _plain_and_recomputed(True, F.silu, frozen=True)
    assert all((a - b).abs().max() <= 1e-6 * a.abs().max() for a, b in zip(plain, ours))
    (plain_out, plain), (out, ours) = _plain_and_recomputed(True, F.silu, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(plain_out, out)
    for a, b in zip(plain, ours):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * a.float().abs().max()


def test_recompute_path_saves_only_inputs_and_routing():
    """What autograd keeps for the experts' backward: the plain path keeps the gathered rows, the gate/up product,
    act(gate), act(gate)*up and the expert outputs; the recompute path keeps x (N, H) (the router's linear saves
    it anyway), the sorted routing weights (M,) fp32 and two int64 index vectors (M,): nothing (M, I) wide.
    Both paths also keep the sort order (M,) int64, the index that gathers the routing weights."""
    experts, x, routing = _experts_and_routing()
    routing = route(routing.logits.requires_grad_(), K)  # its own saved tensors are not counted below
    m = N * K
    saved = {}
    for recompute in (False, True):
        experts.recompute = recompute
        with SavedBytes() as counter:
            experts(x, routing)
        saved[recompute] = counter.nbytes
    assert saved[True] == N * H * 4 + m * 4 + 3 * m * 8
    assert saved[False] >= m * (H + 2 * I + I + I + H) * 4  # rows, gate/up, act(gate), product, outputs
