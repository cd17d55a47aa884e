"""`plan` for mixture-of-experts models (arithmetic only): expert weights, active vs total parameters.

Mixtral (`mlp_kind: moe`, model/moe.py): each layer's MLP is E SwiGLU experts stored as 3-D tensors
(`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)) and a router `mlp.gate` (E, H); k experts run per
token. Mistral Small 4 (`mistral4`: `attention_kind: latent`, `mlp_kind: shared_moe`, model/latent_attention.py and
model/routed_experts.py): multi-head latent attention (q through a q_lora_rank bottleneck, or one q_proj; k and v
from one kv_lora_rank latent plus a shared rotary key), E routed experts of moe_intermediate_size, n_shared_experts
always-on experts, and `first_k_dense_replace` dense layers first.

QLoRA stores every routed expert in NF4 beside the decoder linears (bitsandbytes' format); the router stays in the
weights' dtype and is never adapted (issue 16); adapters target the linears plan.linear_shapes names (attention, the
shared experts, dense layers' MLPs), never the 3-D expert tensors unless asked.
Activations per token of an MoE layer: each of the k routed copies of a token keeps its gathered input, the gate/up
output (2I), the activation and product (2I) and the expert's output before weighting (H): k(2H + 4I) in matmul
bytes, plus the fp32 router logits and probabilities (8E); shared experts as a dense MLP (2 I_shared).
"""

from __future__ import annotations

from typing import Any, Optional

MOE_KINDS = ("moe", "shared_moe")  # MistralConfig.mlp_kind of Mixtral's and Small 4's expert layers


def is_moe(cfg: Any) -> bool:
    return cfg.mlp_kind in MOE_KINDS


def expert_width(cfg: Any) -> int:
    """One routed expert's intermediate width (Small 4: moe_intermediate_size; Mixtral: intermediate_size)."""
    return cfg.moe_intermediate_size if cfg.mlp_kind == "shared_moe" else cfg.intermediate_size


def expert_layers(cfg: Any) -> range:
    """The layers with experts: all of Mixtral's; Small 4's after its first_k_dense_replace dense ones; none of a
    dense model's."""
    if not is_moe(cfg):
        return range(0)
    return range(cfg.first_k_dense_replace if cfg.mlp_kind == "shared_moe" else 0, cfg.num_hidden_layers)


def attention_shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of one layer's attention linears: grouped-query, or Small 4's latent attention."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention_kind != "latent":
        q, kv = heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                "self_attn.o_proj": (q, h)}
    q_width = heads * cfg.head_dim
    query = ({"self_attn.q_proj": (h, q_width)} if cfg.q_lora_rank is None else
             {"self_attn.q_a_proj": (h, cfg.q_lora_rank), "self_attn.q_b_proj": (cfg.q_lora_rank, q_width)})
    return {**query, "self_attn.kv_a_proj_with_mqa": (h, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
            "self_attn.kv_b_proj": (cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
            "self_attn.o_proj": (heads * cfg.v_head_dim, h)}


def swiglu_shapes(prefix: str, h: int, i: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.gate_proj": (h, i), f"{prefix}.up_proj": (h, i), f"{prefix}.down_proj": (i, h)}


def expert_sizes(cfg: Any) -> dict[str, int]:
    """Own parameter count of the MoE layers' modules that are not linears (each layer's routed experts, its
    router) and of latent attention's two RMSNorms; {} for a dense model."""
    sizes = {}
    if cfg.attention_kind == "latent":
        for n in range(cfg.num_hidden_layers):
            if cfg.q_lora_rank is not None:
                sizes[f"model.layers.{n}.self_attn.q_a_layernorm"] = cfg.q_lora_rank
            sizes[f"model.layers.{n}.self_attn.kv_a_layernorm"] = cfg.kv_lora_rank
    if is_moe(cfg):
        h, e = cfg.hidden_size, cfg.num_local_experts
        for n in expert_layers(cfg):
            sizes[f"model.layers.{n}.mlp.experts"] = e * 3 * h * expert_width(cfg)
            sizes[f"model.layers.{n}.mlp.gate"] = e * h
    return sizes


def expert_parameters(cfg: Any) -> int:
    """Parameters of the routed experts (what QLoRA stores in NF4 besides the decoder linears)."""
    return sum(v for k, v in expert_sizes(cfg).items() if k.endswith(".mlp.experts"))


def expert_lora_parameters(cfg: Any, targets: list[str], r: int) -> int:
    """LoRA parameters on the weights `adapter.target_parameters` names (adapters/expert_lora.py, peft's layout):
    r * E * (in + out) per 3-D expert weight and expert layer, r * (H + E) for a named router weight."""
    if not is_moe(cfg) or not targets:
        return 0
    h, e, i = cfg.hidden_size, cfg.num_local_experts, expert_width(cfg)
    shapes = {"mlp.experts.gate_up_proj": (e, h, 2 * i), "mlp.experts.down_proj": (e, i, h), "mlp.gate.weight": (1, h, e)}
    chosen = [k for k in shapes if any(k == t or k.endswith("." + t) for t in targets)]
    return len(expert_layers(cfg)) * sum(r * n * (a + b) for n, a, b in (shapes[k] for k in chosen))


def active_parameters(cfg: Any, total: int) -> int:
    """Parameters one token uses: all but the (E - k) / E of the routed experts it is not sent to."""
    if not is_moe(cfg):
        return total
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return total - expert_parameters(cfg) * (e - k) // e


def mlp_activation_bytes(cfg: Any, a: int, down_kept: bool = False) -> float:
    """Bytes an MLP saves per token and layer (matmul bytes `a`): a dense SwiGLU 2aI (gate and up: model/fused.py
    recomputes the rest), 3aI when `down_kept` (a LoRA or NF4 down_proj keeps the product it is given); an MoE
    layer the module docstring's (Small 4's dense first layers are counted as expert layers: an upper bound when
    they are narrower)."""
    h, dense = cfg.hidden_size, (3 if down_kept else 2) * a
    if not is_moe(cfg):
        return dense * cfg.intermediate_size
    i = expert_width(cfg)
    shared = dense * cfg.n_shared_experts * i if cfg.mlp_kind == "shared_moe" else 0  # blocks.MLP: fused too
    return cfg.num_experts_per_tok * a * (2 * h + 4 * i) + 8 * cfg.num_local_experts + shared


def describe(cfg: Any, total: int, expert_bytes: dict[str, float], gib: float) -> Optional[str]:
    """The plan's experts line: E, k, total vs active parameters and the routed experts' weights per device."""
    if not is_moe(cfg):
        return None
    per_device = ", ".join(f"{name} {value / gib:.2f}" for name, value in expert_bytes.items())
    shared = f" + {cfg.n_shared_experts} shared" if cfg.mlp_kind == "shared_moe" else ""
    return (f"experts: {cfg.num_local_experts} routed{shared} in {len(expert_layers(cfg))} layers, "
            f"{cfg.num_experts_per_tok} per token: {total / 1e9:.2f} B total, "
            f"{active_parameters(cfg, total) / 1e9:.2f} B active per token ({expert_parameters(cfg) / 1e9:.2f} B in routed experts); routed experts' weights per "
            f"device, GiB: {per_device}")
