"""The transformers classes of the Mistral family we read and write, by `model_type`: what each class's
config.json means in MistralConfig's fields (model/config.py reads and writes through this table).

A new Mistral-family class is one entry here and, where its maths is new, one module in model/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class ModelType:
    """How one transformers `model_type` maps onto our fields."""

    class_prefix: str  # its transformers classes: f"{class_prefix}ForCausalLM", ...
    variant: Callable[[dict[str, Any]], dict[str, Any]]  # its config.json -> our variant fields
    writes: tuple[str, ...] = ()  # the variant fields its config.json carries back on save
    fixed: dict[str, Any] = field(default_factory=dict)  # variant fields the class always has (not written)
    defaults: dict[str, Any] = field(default_factory=dict)  # its config class's defaults that differ from ours
    renames: dict[str, str] = field(default_factory=dict)  # our field -> its config.json key, where they differ
    check: Optional[Callable[[Any], None]] = None  # raises ValueError naming a field the class cannot compute


def _mistral(d: dict[str, Any]) -> dict[str, Any]:
    """transformers' Mistral: every layer alike (sliding when `sliding_window` is set), default rotary, a dense
    MLP. A `layer_types` key stays an unknown key, as transformers ignores it for this model_type."""
    return {}


def _ministral(d: dict[str, Any]) -> dict[str, Any]:
    """transformers' Ministral (Ministral-8B-2410): each layer full or sliding as `layer_types` says; without
    the key every layer slides when there is a window and none does otherwise (its config's default)."""
    layer_types = d.get("layer_types")
    if layer_types is None:
        window = d["sliding_window"]  # MinistralConfig's default below when the file has none
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * d["num_hidden_layers"]
    return {"layer_types": layer_types}


def _ministral3(d: dict[str, Any]) -> dict[str, Any]:
    """transformers' Ministral 3 (Ministral 3, Devstral Small 2, Magistral, Mistral 3's text model): Mistral's
    layers (`sliding_window` on every layer when set; `layer_types` ignored), usually YaRN, and queries scaled by
    position (llama-4) always."""
    return {"query_scaling": "llama4"}


# Ministral3Config's values for keys a config.json leaves out (transformers 5.25), where they differ from ours.
_MINISTRAL3_DEFAULTS = {
    "head_dim": 128, "sliding_window": None, "rms_norm_eps": 1e-5, "pad_token_id": 11, "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                        "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                        "llama_4_scaling_beta": 0.1},
}

def _mixtral(d: dict[str, Any]) -> dict[str, Any]:
    """transformers' Mixtral: Mistral's attention and a sparse mixture of experts in place of each MLP
    (model/moe.py); the expert keys are MixtralConfig's (its defaults below when the file has none)."""
    return {"mlp_kind": "moe", **{key: d[key] for key in EXPERT_FIELDS}}


# MistralConfig's expert fields (mlp_kind "moe"), with transformers' MixtralConfig names
EXPERT_FIELDS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                 "output_router_logits")
# MixtralConfig's values (transformers 5.25) for keys a config.json leaves out, where they differ from ours.
_MIXTRAL_DEFAULTS = {"rms_norm_eps": 1e-5, "sliding_window": None, "rope_theta": 1000000.0, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
                     "output_router_logits": False}

def _mistral4(d: dict[str, Any]) -> dict[str, Any]:
    """transformers' Mistral4 (Mistral Small 4): multi-head latent attention (model/latent_attention.py), a dense
    MLP in the first `first_k_dense_replace` layers, then shared plus routed experts with group-limited top-k
    (model/routed_experts.py); YaRN, and queries scaled by position (llama-4) always. Like Mistral4Config, head_dim
    is qk_nope_head_dim + qk_rope_head_dim whatever the file says, and a null num_key_value_heads is the heads'."""
    return {"attention_kind": "latent", "mlp_kind": "shared_moe", "query_scaling": "llama4",
            "num_local_experts": d["n_routed_experts"], "num_experts_per_tok": d["num_experts_per_tok"],
            "output_router_logits": d["output_router_logits"], "head_dim": d["qk_nope_head_dim"] + d["qk_rope_head_dim"],
            **{key: d[key] for key in MISTRAL4_FIELDS}}


# Mistral4Config's own fields (our names = its names), read and written back by the mistral4 entry only
MISTRAL4_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rope_interleave",
                   "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
                   "norm_topk_prob", "first_k_dense_replace")
# Mistral4Config's values (transformers 5.25) for keys a config.json leaves out, where they differ from ours.
_MISTRAL4_DEFAULTS = {
    "vocab_size": 131072, "intermediate_size": 12288, "num_hidden_layers": 36, "max_position_embeddings": 1048576,
    "pad_token_id": 11, "sliding_window": None, "num_key_value_heads": 32, "n_routed_experts": 128, "num_experts_per_tok": 4,
    "output_router_logits": False, "q_lora_rank": 1024, "kv_lora_rank": 256, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True, "moe_intermediate_size": 2048,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    "first_k_dense_replace": 0,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1},
}


def _check_mistral4(config: Any) -> None:
    """What transformers' Mistral4 computes, or fails on: each refusal names the field (ValueError)."""
    heads, rope, nope = config.num_attention_heads, config.qk_rope_head_dim, config.qk_nope_head_dim
    if config.num_key_value_heads != heads:  # its latent keys already have one head per query head
        raise ValueError(f"`num_key_value_heads` ({config.num_key_value_heads}) must equal `num_attention_heads` "
                         f"({heads}) for mistral4 (latent attention expands one key per query head)")
    if config.rope_type != "yarn":  # its default rotary would rotate head_dim, not the qk_rope_head_dim part
        raise ValueError(f"`rope_parameters.rope_type` {config.rope_type!r}: mistral4 is computed with 'yarn' only")
    if config.sliding_window is not None:
        raise ValueError(f"`sliding_window` ({config.sliding_window}): mistral4 attends to every earlier token; set it null")
    if rope % 2 or rope < 2 or nope < 0 or config.v_head_dim < 1 or config.kv_lora_rank < 1 or config.q_lora_rank == 0:
        raise ValueError(f"`qk_rope_head_dim` must be even and > 0, `qk_nope_head_dim` >= 0, `v_head_dim`, "
                         f"`kv_lora_rank` and `q_lora_rank` (or null) > 0; got {rope}, {nope}, {config.v_head_dim}, "
                         f"{config.kv_lora_rank}, {config.q_lora_rank}")
    experts, groups = config.num_local_experts, config.n_group
    if groups < 1 or experts % groups or experts // groups < 2:  # each group is scored by its two best experts
        raise ValueError(f"`n_group` ({groups}) must divide `n_routed_experts` ({experts}) into groups of 2 or more")
    if not 1 <= config.topk_group <= groups or config.num_experts_per_tok > config.topk_group * (experts // groups):
        raise ValueError(f"`topk_group` ({config.topk_group}) must be between 1 and `n_group` ({groups}) and its groups "
                         f"must hold `num_experts_per_tok` ({config.num_experts_per_tok}) experts")
    if config.n_shared_experts < 0 or config.first_k_dense_replace < 0 or config.moe_intermediate_size < 1:
        raise ValueError(f"`n_shared_experts` and `first_k_dense_replace` must be >= 0 and `moe_intermediate_size` > 0, "
                         f"got {config.n_shared_experts}, {config.first_k_dense_replace}, {config.moe_intermediate_size}")


# model_type -> how its config.json maps onto ours
MODEL_TYPES: dict[str, ModelType] = {
    "mistral": ModelType("Mistral", _mistral),
    "ministral": ModelType("Ministral", _ministral, writes=("layer_types",), defaults={"sliding_window": 4096}),
    "ministral3": ModelType("Ministral3", _ministral3, fixed={"query_scaling": "llama4"}, defaults=_MINISTRAL3_DEFAULTS),
    "mixtral": ModelType("Mixtral", _mixtral, writes=EXPERT_FIELDS, fixed={"mlp_kind": "moe"}, defaults=_MIXTRAL_DEFAULTS),
    "mistral4": ModelType("Mistral4", _mistral4,
                          writes=("num_local_experts", "num_experts_per_tok", "output_router_logits", *MISTRAL4_FIELDS),
                          fixed={"attention_kind": "latent", "mlp_kind": "shared_moe", "query_scaling": "llama4"},
                          defaults=_MISTRAL4_DEFAULTS, renames={"num_local_experts": "n_routed_experts"},
                          check=_check_mistral4),
}

# Keys other transformers classes read that change the maths, with the value that leaves it unchanged. None of
# our classes computes them, so a config.json that sets one otherwise is refused naming the key, never ignored.
# (Keys we know nothing of are kept and written back: transformers ignores them too.)
MATHS_KEYS: dict[str, Any] = {
    "attention_bias": False, "mlp_bias": False, "qk_norm": False, "use_qk_norm": False, "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0, "attention_multiplier": None, "logits_scaling": 1.0,
}
