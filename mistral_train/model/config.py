"""MistralConfig: the architecture and its variant, read from and written to transformers' `config.json`.

The variant (each layer's attention kind, the rotary kind, the MLP kind) is data the blocks read, set by
the mapping of the file's `model_type` (MODEL_TYPES): a new Mistral-family variant is one entry there and,
where its maths is new, one module in model/.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from mistral_train.jsonfile import read_json_object
from mistral_train.errors import FolderError
from mistral_train.model.model_types import EXPERT_FIELDS, MATHS_KEYS, MISTRAL4_FIELDS, MODEL_TYPES, ModelType  # noqa: F401 (ModelType: re-exported)
from mistral_train.model.rope import YARN_KEYS

# Keys transformers writes that describe the file, not the architecture: dropped on read,
# regenerated on write, so a round trip does not accumulate stale metadata.
_HF_BOOKKEEPING = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}
_SUPPORTED_ACTIVATIONS = {"silu", "gelu", "gelu_pytorch_tanh", "relu"}
ATTENTION_KINDS = ("full_attention", "sliding_attention")  # transformers' `layer_types` names
ROPE_TYPES = ("default", "yarn")  # the rotary kinds model/rope.py computes
# rope_parameters keys each rotary kind reads besides rope_type and rope_theta (transformers' modeling_rope_utils);
# any other key there changes the maths in a way we do not compute: an error naming it, never ignored.
ROPE_KEYS = {"default": (), "yarn": YARN_KEYS}
# rope_parameters keys every kind may carry: Ministral 3's query scale (other classes ignore it, as transformers does)
# and the pretraining length it scales by.
_ROPE_SHARED_KEYS = ("llama_4_scaling_beta", "original_max_position_embeddings")
QUERY_SCALINGS = (None, "llama4")  # None, or Ministral 3's 1 + beta * ln(1 + floor(position / original))
# set by the model_type's mapping or the rope_parameters dict, not read by key name
_VARIANT = ("model_type", "layer_types", "rope_type", "rope_options", "mlp_kind", "query_scaling", *EXPERT_FIELDS,
            "attention_kind", *MISTRAL4_FIELDS)
_VARIANT_DEFAULTS = {"layer_types": None, "mlp_kind": "dense", "query_scaling": None, "attention_kind": "gqa"}
ATTENTION_MATHS = ("gqa", "latent")  # attention_kind: grouped-query (attention.py) or latent (latent_attention.py)


@dataclass
class MistralConfig:
    """Architecture hyper-parameters with transformers' `MistralConfig` names and defaults."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = 4096  # None: full causal attention
    attention_dropout: float = 0.0
    num_labels: int = 2  # classification heads only
    layer_types: Optional[list[str]] = None  # one of ATTENTION_KINDS a layer; None: every layer sliding (Mistral)
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_options: dict[str, Any] = field(default_factory=dict)  # rope_parameters beyond rope_type/theta (YaRN's)
    query_scaling: Optional[str] = None  # one of QUERY_SCALINGS; "llama4" reads rope_options
    mlp_kind: str = "dense"  # a key of model/blocks.py's MLPS
    # experts (mlp_kind "moe", model/moe.py), with MixtralConfig's defaults
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001  # the load-balancing loss is added in every training step; 0 turns it off
    router_jitter_noise: float = 0.0
    output_router_logits: bool = False  # kept for the round trip: our aux loss never depends on it (transformers' does)
    # Mistral Small 4 (mistral4), Mistral4Config's names and defaults: latent attention (model/latent_attention.py) and
    # shared + routed experts (mlp_kind "shared_moe", model/routed_experts.py) after `first_k_dense_replace` dense layers
    attention_kind: str = "gqa"  # one of ATTENTION_MATHS: "latent" is Mistral Small 4's
    q_lora_rank: Optional[int] = 1024  # None: queries by one q_proj
    kv_lora_rank: int = 256
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    model_type: str = "mistral"  # a key of MODEL_TYPES: the transformers class family written back on save
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the round trip

    def __post_init__(self) -> None:
        self.validate()  # types first, so the default head_dim below divides two ints
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            self.validate()

    def validate(self) -> None:
        """Check types and the relations between fields; errors name the key."""
        hints = get_type_hints(MistralConfig)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ValueError(f"`{f.name}` must be {_type_name(hints[f.name])}, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads})"
            )
        if self.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is not one of {sorted(_SUPPORTED_ACTIVATIONS)}")
        if self.rotary_dim is not None and self.rotary_dim % 2 != 0:  # latent attention rotates only its rope part
            name = "qk_rope_head_dim" if self.attention_kind == "latent" else "head_dim"
            raise ValueError(f"`{name}` must be even for RoPE, got {self.rotary_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"`sliding_window` must be a positive integer or null, got {self.sliding_window}")
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers
                                             or not set(self.layer_types) <= set(ATTENTION_KINDS)):
            raise ValueError(f"`layer_types` must name one of {ATTENTION_KINDS} for each of the "
                             f"{self.num_hidden_layers} layers, got {self.layer_types}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"`model_type` {self.model_type!r} is not one of {sorted(MODEL_TYPES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"`rope_parameters.rope_type` {self.rope_type!r} is not supported (one of {ROPE_TYPES})")
        if self.attention_kind not in ATTENTION_MATHS:
            raise ValueError(f"`attention_kind` {self.attention_kind!r} is not one of {ATTENTION_MATHS}")
        self._validate_rope_options()
        if MODEL_TYPES[self.model_type].check is not None:
            MODEL_TYPES[self.model_type].check(self)
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"`num_experts_per_tok` must be between 1 and `num_local_experts` ({self.num_local_experts}), "
                             f"got {self.num_experts_per_tok}")
        if self.router_aux_loss_coef < 0 or self.router_jitter_noise < 0:
            raise ValueError(f"`router_aux_loss_coef` and `router_jitter_noise` must be >= 0, got "
                             f"{self.router_aux_loss_coef} and {self.router_jitter_noise}")

    def _validate_rope_options(self) -> None:
        allowed = (*ROPE_KEYS[self.rope_type], *_ROPE_SHARED_KEYS, "partial_rotary_factor")
        for key, value in self.rope_options.items():
            rotary_share = self.rotary_dim / self.head_dim if self.head_dim else 1.0  # 1: every dimension rotates
            if key not in allowed or (key == "partial_rotary_factor" and value != rotary_share):
                raise ValueError(f"`rope_parameters.{key}` is not supported with rope_type {self.rope_type!r} (it "
                                 f"changes the rotary maths and is not computed here); supported keys: {sorted(allowed)}")
        needed = ["factor", "original_max_position_embeddings"] if self.rope_type == "yarn" else []
        if self.query_scaling not in QUERY_SCALINGS:
            raise ValueError(f"`query_scaling` {self.query_scaling!r} is not one of {QUERY_SCALINGS}")
        if self.query_scaling == "llama4":
            needed += ["llama_4_scaling_beta", "original_max_position_embeddings"]
        for key in needed:
            if key not in self.rope_options:
                raise ValueError(f"`rope_parameters.{key}` is required (rope_type {self.rope_type!r}, "
                                 f"query scaling {self.query_scaling!r})")

    def layer_window(self, layer: int) -> Optional[int]:
        """What layer `layer` attends to: the last `sliding_window` tokens on a sliding layer, else (None) all."""
        sliding = self.layer_types is None or self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    def layer_mlp_kind(self, layer: int) -> str:
        """The MLP of layer `layer` (a key of blocks.py's MLPS): dense in the first `first_k_dense_replace` layers."""
        return "dense" if layer < self.first_k_dense_replace else self.mlp_kind

    @property
    def rotary_dim(self) -> Optional[int]:
        """How many dimensions of a query/key head rotate: latent attention rotates only its qk_rope_head_dim part."""
        return self.qk_rope_head_dim if self.attention_kind == "latent" else self.head_dim

    def attention_kinds(self) -> list[str]:
        """Each layer's kind, spelled out as transformers' `layer_types` (None above means every layer
        slides, which is full attention when there is no window)."""
        if self.layer_types is not None:
            return list(self.layer_types)
        kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
        return [kind] * self.num_hidden_layers

    @classmethod
    def from_spec(cls, spec: Any, **given: Any) -> "MistralConfig":
        """The architecture a run's model spec names (config.ModelSpec: each attribute named like a field
        here), `given` over it (the tokenizer's vocab_size and ids): model building and `plan` both use it."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra" and hasattr(spec, f.name)]
        fields = {name: getattr(spec, name) for name in names} | given
        entry = MODEL_TYPES.get(fields.get("model_type", "mistral"))  # an unknown one: validate names it
        return cls(**(fields | (entry.fixed if entry else {})))  # what the class always has (mixtral: mlp_kind moe)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "MistralConfig":
        """Build from a transformers config dict (v4 `rope_theta` or v5 `rope_parameters`)."""
        d = dict(d)
        model_type = d.get("model_type", "mistral")
        if model_type not in MODEL_TYPES:
            raise FolderError(f"{source}: `model_type` is {model_type!r}, expected one of {sorted(MODEL_TYPES)}")
        entry = MODEL_TYPES[model_type]
        d = {**entry.defaults, **d}  # the class's own defaults for keys the file leaves out
        rope = dict(d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # v4 files say `type`
        if "rope_theta" in rope:
            d["rope_theta"] = rope.pop("rope_theta")
        if rope_type in ("yarn",):  # transformers' standardize_rope_params: the pretraining length
            rope["original_max_position_embeddings"] = d.get(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", d.get("max_position_embeddings", cls.max_position_embeddings)))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", *_VARIANT}
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in d:
                raise FolderError(f"{source}: required key `{key}` is missing")
        kwargs = {k: v for k, v in d.items() if k in known} | entry.variant(d)
        kwargs.update(model_type=model_type, rope_type=rope_type, rope_options=rope)
        if isinstance(kwargs.get("rope_theta"), int):
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        eos_list = None
        if isinstance(kwargs.get("eos_token_id"), list):  # some checkpoints list several EOS ids
            eos_list = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = eos_list[0] if eos_list else None  # generation stops on the first
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        consumed = {entry.renames.get(k, k) for k in entry.writes}  # read by the mapping: fields now, not unknown keys
        extra = {k: v for k, v in d.items() if k not in known and k not in _HF_BOOKKEEPING and k not in consumed}
        for key, neutral in MATHS_KEYS.items():
            if extra.get(key, neutral) != neutral:
                raise FolderError(f"{source}: `{key}` is {extra[key]!r}, which changes the model and is not computed by "
                                  f"mistral-train's {model_type!r} (expected {neutral!r} or no `{key}`)")
        if eos_list is not None:
            extra["eos_token_id"] = eos_list  # written back in place of the int, so the list survives
        if "id2label" in d and "num_labels" not in d:
            kwargs["num_labels"] = len(d["id2label"])
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as e:
            raise FolderError(f"{source}: {e}") from e

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "MistralConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json there")
        return cls.from_hf_dict(read_json_object(path), source=str(path))

    def to_hf_dict(self, architecture: str = "MistralForCausalLM") -> dict[str, Any]:
        """The dict transformers writes for this model, plus the unknown keys we were given.

        Args:
            architecture: the head's transformers class as Mistral names it (`MistralForCausalLM`,
                `MistralForSequenceClassification`, ...); written as the model_type's own class
                (`MinistralForCausalLM` for ministral), so a folder loads back as the class it came from.
        """
        entry = MODEL_TYPES[self.model_type]
        # A variant field the class neither writes nor always has: transformers would compute another model.
        lost = [name for name, default in _VARIANT_DEFAULTS.items()
                if name not in entry.writes and getattr(self, name) != entry.fixed.get(name, default)]
        if lost:
            raise ValueError(f"`{'` and `'.join(lost)}` cannot be written as model_type {self.model_type!r}"
                             + ("; use model_type 'ministral' for per-layer attention kinds" if "layer_types" in lost else ""))
        skip = ("extra", "num_labels", *_VARIANT)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d.update(self.extra)  # unknown keys, and a list of EOS ids over the single one
        if "layer_types" in entry.writes:
            d["layer_types"] = self.attention_kinds()
        d.update({entry.renames.get(name, name): getattr(self, name) for name in (*EXPERT_FIELDS, *MISTRAL4_FIELDS)
                  if name in entry.writes})
        d["architectures"] = [re.sub(r"^Mistral(?=For)", entry.class_prefix, architecture)]
        d["model_type"] = self.model_type
        # v5 reads `rope_parameters`; v4 reads `rope_theta`: write both so either loads it.
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope_options}
        if architecture != "MistralForCausalLM" and "id2label" not in d:
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return dict(sorted(d.items()))

    def save(self, folder: Union[str, Path], architecture: str = "MistralForCausalLM", dtype: Optional[str] = None) -> None:
        d = self.to_hf_dict(architecture)
        if dtype is not None:
            d["dtype"] = dtype
        (Path(folder) / "config.json").write_text(json.dumps(d, indent=2) + "\n")


def _matches(value: Any, hint: Any) -> bool:
    """isinstance for the few annotation shapes MistralConfig uses; bool is not an int here."""
    origin = get_origin(hint)
    if origin is Union:
        return any(_matches(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Union:
        return " or ".join(_type_name(h) for h in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
