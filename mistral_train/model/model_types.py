"""The transformers classes of the Mistral family we read and write, by `model_type`: what each class's
config.json means in MistralConfig's fields (model/config.py reads and writes through this table).

A new Mistral-family class is one entry here and, where its maths is new, one module in model/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class ModelType:
    """How one transformers `model_type` maps onto our fields."""

    class_prefix: str  # its transformers classes: f"{class_prefix}ForCausalLM", ...
    variant: Callable[[dict[str, Any]], dict[str, Any]]  # its config.json -> our variant fields
    writes: tuple[str, ...] = ()  # the variant fields its config.json carries back on save
    fixed: dict[str, Any] = field(default_factory=dict)  # variant fields the class always has (not written)
    defaults: dict[str, Any] = field(default_factory=dict)  # its config class's defaults that differ from ours


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

# model_type -> how its config.json maps onto ours
MODEL_TYPES: dict[str, ModelType] = {
    "mistral": ModelType("Mistral", _mistral),
    "ministral": ModelType("Ministral", _ministral, writes=("layer_types",), defaults={"sliding_window": 4096}),
    "ministral3": ModelType("Ministral3", _ministral3, fixed={"query_scaling": "llama4"}, defaults=_MINISTRAL3_DEFAULTS),
    "mixtral": ModelType("Mixtral", _mixtral, writes=EXPERT_FIELDS, fixed={"mlp_kind": "moe"}, defaults=_MIXTRAL_DEFAULTS),
}

# Keys other transformers classes read that change the maths, with the value that leaves it unchanged. None of
# our classes computes them, so a config.json that sets one otherwise is refused naming the key, never ignored.
# (Keys we know nothing of are kept and written back: transformers ignores them too.)
MATHS_KEYS: dict[str, Any] = {
    "attention_bias": False, "mlp_bias": False, "qk_norm": False, "use_qk_norm": False, "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0, "attention_multiplier": None, "logits_scaling": 1.0,
}
