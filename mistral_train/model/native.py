"""Mistral's native format: `params.json` + `consolidated.safetensors` + `tekken.json` / `tokenizer.model.vN`,
the folder mistral-inference and vLLM (`--config_format mistral --load_format mistral --tokenizer_mode mistral`)
read, in and out.

Two things differ from an HF folder:
- names: `layers.N.attention.wq.weight` for `model.layers.N.self_attn.q_proj.weight` and so on (_LAYER, _TOP);
- the rotary layout of wq/wk: native rows pair dimensions (2i, 2i+1) of each head as one complex number,
  transformers rotates dimension i with i + head_dim/2 (half-split). Reading takes each head's even rows then
  its odd rows (the permutation transformers' convert_mistral_weights_to_hf.py and vLLM's mistral loader apply);
  writing interleaves them back.
params.json keys are mapped onto transformers' names as vLLM's mistral config reader maps them
(vllm/transformers_utils/configs/mistral.py), then read by MistralConfig.from_hf_dict like any config.json, so
a native folder and the HF folder it converts to give the same model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.errors import FolderError, TensorNameError
from mistral_train.jsonfile import read_json_object
from mistral_train.model.config import MODEL_TYPES, MistralConfig
from mistral_train.tokenizer.files import write_native_tokenizer

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.safetensors"

# native name -> ours, inside `layers.N.` / `model.layers.N.`
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# params.json key -> transformers' config.json key (vLLM's _remap_general_mistral_args)
_RENAMED = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
            "head_dim": "head_dim", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
            "tied_embeddings": "tie_word_embeddings", "activation": "hidden_act",
            "max_position_embeddings": "max_position_embeddings"}
_REQUIRED = ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size")
# keys that do not change the maths: the serving length and the file's own bookkeeping
_HARMLESS = {"max_seq_len", "max_batch_size", "model_type", "dtype"}
# Mistral-7B-v0.1's params.json has no rope_theta and used 10000, which transformers' conversion script assumes;
# we always write the key, so the readers' differing defaults never matter for our folders
_DEFAULT_ROPE_THETA = 10000.0


def is_native_folder(folder: Union[str, Path]) -> bool:
    """A native folder: params.json and no config.json (a folder holding both is read as HF, as vLLM's
    default `--config_format auto` would)."""
    folder = Path(folder)
    return (folder / PARAMS_FILE).is_file() and not (folder / "config.json").is_file()


def weight_files(folder: Path) -> list[Path]:
    """consolidated.safetensors (or the consolidated-*.safetensors parts some large models ship), in name order."""
    files = sorted(Path(folder).glob("consolidated*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: has {PARAMS_FILE} but no {WEIGHTS_FILE}; expected Mistral's native format "
                                f"({PARAMS_FILE} + {WEIGHTS_FILE} + tekken.json or tokenizer.model.vN)")
    return files


def hf_config_dict(params: dict[str, Any], source: str) -> dict[str, Any]:
    """The transformers config.json that `params` (a params.json) describes.

    Raises:
        FolderError: naming `source` and the key: a required key missing, or a key we do not compute
            (mixture of experts, vision, quantization, ...), which would otherwise be ignored silently.
    """
    for key in _REQUIRED:
        if key not in params:
            raise FolderError(f"{source}: required key `{key}` is missing")
    unknown = sorted(set(params) - set(_RENAMED) - _HARMLESS - {"sliding_window", "yarn", "llama_4_scaling"})
    if unknown:
        raise FolderError(f"{source}: key `{unknown[0]}` is not supported (it changes the model and mistral-train "
                          f"does not compute it); supported keys: {sorted({*_RENAMED, 'sliding_window', 'yarn', 'llama_4_scaling'})}")
    if params.get("model_type", "transformer") != "transformer":
        raise FolderError(f"{source}: `model_type` is {params['model_type']!r}; only 'transformer' (a dense "
                          "Mistral decoder) is supported")
    d: dict[str, Any] = {_RENAMED[k]: v for k, v in params.items() if k in _RENAMED}
    d.setdefault("head_dim", params["dim"] // params["n_heads"])  # as vLLM; never a class's own default
    d.setdefault("num_key_value_heads", params["n_heads"])
    d.setdefault("rope_theta", _DEFAULT_ROPE_THETA)
    if "max_position_embeddings" not in d and "max_seq_len" in params:
        d["max_position_embeddings"] = params["max_seq_len"]
    d["model_type"] = "mistral"
    d["sliding_window"] = None  # absent: full attention (MistralConfig's default would be 4096)
    window = params.get("sliding_window")
    if isinstance(window, list):  # one entry a layer (or a pattern repeated), None for a full-attention layer
        d.update(_layer_types(window, params["n_layers"], source))
    elif window is not None:
        d["sliding_window"] = int(window)  # some files hold it as a string (transformers' script says so)
    if params.get("yarn") or params.get("llama_4_scaling"):
        d.update(_rope_parameters(params, d.pop("rope_theta"), source))
    return d


def _layer_types(pattern: list, n_layers: int, source: str) -> dict[str, Any]:
    """`sliding_window` as a list -> transformers' Ministral `layer_types` + one window (vLLM's reading)."""
    windows = {w for w in pattern if w is not None}
    if not pattern or n_layers % len(pattern) != 0 or len(windows) > 1:
        raise FolderError(f"{source}: `sliding_window` {pattern} must list one window (or null for full attention) "
                          f"a layer, repeated to {n_layers} layers, with a single window size")
    kinds = ["full_attention" if w is None else "sliding_attention" for w in pattern] * (n_layers // len(pattern))
    return {"model_type": "ministral", "layer_types": kinds,
            "sliding_window": int(next(iter(windows))) if windows else None}


def _rope_parameters(params: dict[str, Any], rope_theta: float, source: str) -> dict[str, Any]:
    """`yarn` and `llama_4_scaling` -> transformers' `rope_parameters`, as vLLM's _remap_mistral_yarn_args reads
    them (beta -> beta_fast, alpha -> beta_slow, mscale_all_dim 1 and no mscale, so YaRN's magnitude correction is
    0.1 ln(factor) + 1 unless `apply_scale` is false). Queries scaled by position (llama_4_scaling) are
    transformers' Ministral 3, which keeps their beta in rope_parameters; YaRN alone is a Mistral."""
    yarn, llama4 = dict(params.get("yarn") or {}), dict(params.get("llama_4_scaling") or {})
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if yarn:
        names = {"factor": ("factor", float), "beta": ("beta_fast", float), "alpha": ("beta_slow", float),
                 "original_max_position_embeddings": ("original_max_position_embeddings", int)}
        rope.update(rope_type="yarn", mscale_all_dim=1.0)
        for key, (name, cast) in names.items():
            if key in yarn:
                rope[name] = cast(yarn.pop(key))
        if not yarn.pop("apply_scale", True):
            rope["attention_factor"] = 1.0  # no magnitude correction
        if yarn:
            raise FolderError(f"{source}: `yarn.{sorted(yarn)[0]}` is not supported; expected factor, "
                              "original_max_position_embeddings, beta, alpha, apply_scale")
        if "factor" not in rope or "original_max_position_embeddings" not in rope:
            raise FolderError(f"{source}: `yarn` needs `factor` and `original_max_position_embeddings`")
    if not llama4:
        return {"rope_parameters": rope}
    original = llama4.pop("original_max_position_embeddings", None)
    if "beta" not in llama4 or original is None:
        raise FolderError(f"{source}: `llama_4_scaling` needs `beta` and `original_max_position_embeddings`")
    if rope.setdefault("original_max_position_embeddings", int(original)) != int(original):
        raise FolderError(f"{source}: `llama_4_scaling.original_max_position_embeddings` ({original}) differs from "
                          f"`yarn.original_max_position_embeddings` ({rope['original_max_position_embeddings']}); "
                          "transformers' Ministral 3 has one value for both")
    rope["llama_4_scaling_beta"] = float(llama4.pop("beta"))
    if llama4:
        raise FolderError(f"{source}: `llama_4_scaling.{sorted(llama4)[0]}` is not supported")
    if "ministral3" not in MODEL_TYPES:
        raise FolderError(f"{source}: `llama_4_scaling` describes a Ministral 3 model, which this version of "
                          f"mistral-train cannot compute yet (model types: {sorted(MODEL_TYPES)})")
    return {"model_type": "ministral3", "rope_parameters": rope}


def read_params(folder: Union[str, Path]) -> MistralConfig:
    """The MistralConfig of a native folder's params.json (FolderError naming the file and key)."""
    path = Path(folder) / PARAMS_FILE
    return MistralConfig.from_hf_dict(hf_config_dict(read_json_object(path), str(path)), source=str(path))


def params_dict(config: MistralConfig) -> dict[str, Any]:
    """params.json for `config`, every maths-changing field written (rope_theta too: readers differ on its default).

    Raises:
        ValueError: a field the native format cannot hold (an activation other than silu, another rotary kind).
    """
    if config.hidden_act != "silu":
        raise ValueError(f"`hidden_act` {config.hidden_act!r}: Mistral's native format (mistral-inference, vLLM's "
                         "mistral loader) computes silu only")
    if getattr(config, "mlp_kind", "dense") != "dense":
        raise ValueError(f"mlp_kind {config.mlp_kind!r}: only dense models are written in Mistral's native format")
    params: dict[str, Any] = {
        "dim": config.hidden_size, "n_layers": config.num_hidden_layers, "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size, "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
        "tied_embeddings": config.tie_word_embeddings,
    }
    params.update(_rope_params(config))
    windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    if len(set(windows)) > 1:
        params["sliding_window"] = windows  # per layer, null for full attention (vLLM's reading)
    elif windows and windows[0] is not None:
        params["sliding_window"] = windows[0]
    return params


def _rope_params(config: MistralConfig) -> dict[str, Any]:
    """`yarn` and `llama_4_scaling` for params.json: the inverse of _rope_parameters (vLLM's reading)."""
    options = dict(getattr(config, "rope_options", None) or {})
    out: dict[str, Any] = {}
    if config.rope_type == "yarn":
        factor, original = options.get("factor"), options.get("original_max_position_embeddings")
        if factor is None or original is None or not options.get("truncate", True):
            raise ValueError("YaRN without `factor` / `original_max_position_embeddings`, or with `truncate` false, "
                             "has no params.json form (vLLM reads the factor and truncates)")
        yarn = {"factor": factor, "original_max_position_embeddings": original}
        yarn.update({native: options[ours] for ours, native in (("beta_fast", "beta"), ("beta_slow", "alpha"))
                     if options.get(ours) is not None})
        correction = _yarn_magnitude(factor, options)
        if correction == 1.0:
            yarn["apply_scale"] = False
        elif not math.isclose(correction, 0.1 * math.log(factor) + 1.0, rel_tol=1e-12):
            raise ValueError(f"YaRN's magnitude correction {correction} is neither 1 nor 0.1 ln(factor) + 1: "
                             "params.json cannot express it")
        out["yarn"] = yarn
    elif config.rope_type != "default":
        raise ValueError(f"rope type {config.rope_type!r} has no params.json form")
    scaling = getattr(config, "query_scaling", None)
    if scaling == "llama4":
        out["llama_4_scaling"] = {"original_max_position_embeddings": options["original_max_position_embeddings"],
                                  "beta": options["llama_4_scaling_beta"]}
    elif scaling is not None:
        raise ValueError(f"query scaling {scaling!r} has no params.json form")
    return out


def _yarn_magnitude(factor: float, options: dict[str, Any]) -> float:
    """The factor YaRN multiplies cos/sin by, as transformers derives it from rope_parameters."""
    if options.get("attention_factor") is not None:
        return float(options["attention_factor"])

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if options.get("mscale") and options.get("mscale_all_dim"):
        return mscale(options["mscale"]) / mscale(options["mscale_all_dim"])
    return mscale(1.0)


def _rotary_rows(n_heads: int, weight: torch.Tensor) -> tuple[int, int, int]:
    rows, cols = weight.shape
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"a rotary weight of {rows} rows does not split into {n_heads} heads of even size")
    return rows // n_heads // 2, rows, cols


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk (n_heads * head_dim, in) from native (pairs 2i, 2i+1) to transformers' half-split rows (i, i + head_dim/2)."""
    half, rows, cols = _rotary_rows(n_heads, weight)
    return weight.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half: transformers' rows back to native pairs."""
    half, rows, cols = _rotary_rows(n_heads, weight)
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def to_ours(key: str) -> Optional[str]:
    """Our (transformers') name of native tensor `key`, None for a name the format does not have."""
    if key in _TOP:
        return _TOP[key]
    match = _NATIVE_LAYER.fullmatch(key)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def to_native(key: str) -> Optional[str]:
    """The native name of our tensor `key`, None for one the format has no place for (a head, an adapter)."""
    top = {ours: native for native, ours in _TOP.items()}
    if key in top:
        return top[key]
    match = _OUR_LAYER.fullmatch(key)
    layer = {ours: native for native, ours in _LAYER.items()}
    if match and match.group(2) in layer:
        return f"layers.{match.group(1)}.{layer[match.group(2)]}"
    return None


def _rotary_heads(key: str, config: MistralConfig) -> Optional[int]:
    """Heads of a rotary weight (ours or native name), None for any other tensor."""
    if key.endswith(("q_proj.weight", "attention.wq.weight")):
        return config.num_attention_heads
    if key.endswith(("k_proj.weight", "attention.wk.weight")):
        return config.num_key_value_heads
    return None


class NativeWeights:
    """consolidated.safetensors seen with our names and transformers' rotary layout: `keys()` and
    `get_tensor(key)` as safetensors' `safe_open` handle offers them, so model/hf.py's loader reads it as it
    reads an HF shard. Use as a context manager."""

    def __init__(self, file: Path, config: MistralConfig) -> None:
        self.file, self.config = Path(file), config
        self._handle = safe_open(str(file), framework="pt")
        self._native: dict[str, str] = {}
        for key in self._handle.keys():
            ours = to_ours(key)
            if ours is None:
                raise TensorNameError(f"{file}: unexpected tensor `{key}` (not a weight of a native Mistral model: "
                                      f"expected {sorted(_TOP)} and layers.N.{{{', '.join(_LAYER)}}})")
            self._native[ours] = key

    def __enter__(self) -> "NativeWeights":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.__exit__(*exc)

    def keys(self) -> Iterator[str]:
        return iter(self._native)

    def get_tensor(self, key: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(self._native[key])
        heads = _rotary_heads(key, self.config)
        if heads is None:
            return tensor
        try:
            return interleaved_to_half(tensor, heads)
        except (ValueError, RuntimeError) as err:
            raise FolderError(f"{self.file}: `{self._native[key]}` has shape {tuple(tensor.shape)}, which does not fit "
                              f"{heads} heads of {self.config.head_dim}: {err}") from err


def native_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with native names and rotary layout (a tied output stored once, as the embedding).

    Raises:
        ValueError: a tensor the format has no place for (a classification head, LoRA, NF4 state): merge
            adapters and dequantize first.
    """
    if getattr(model, "task", "causal_lm") != "causal_lm":
        raise ValueError(f"a {model.task} model cannot be written in Mistral's native format (causal LM only)")
    config = model.config
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        native = to_native(key)
        if native is None:
            raise ValueError(f"`{key}` has no place in Mistral's native format; merge adapters (mistral-train merge) "
                             "and write a full-precision model")
        heads = _rotary_heads(key, config)
        tensor = tensor.detach()
        state[native] = (half_to_interleaved(tensor, heads) if heads is not None else tensor).contiguous()
    return state


def save_native(model: nn.Module, path: Union[str, Path], tokenizer: Any = None, chat_format: Optional[str] = None) -> None:
    """Write `model` as a native folder: params.json, consolidated.safetensors and, given `tokenizer` (our
    Tokenizer of a SentencePiece or Tekken file), its file as mistral-common names it
    (tokenizer/files.py write_native_tokenizer). The folder appears only when complete."""
    params = params_dict(model.config)
    state = native_state_dict(model)
    with atomic_directory(path) as tmp:
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            write_native_tokenizer(tokenizer, tmp, chat_format)
