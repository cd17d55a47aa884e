"""PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors`, both ways.

Keys on disk are `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (DoRA) and, for a modules_to_save entry, `base_model.model.<module>.<param>`.
Our keys differ by a rename only: `<module>.lora_A` and `<module>.modules_to_save.<param>`.
Safetensors only; pickled adapters (`adapter_model.bin`) are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mistral_train.adapters.expert_lora import LORA_SUFFIX, ExpertLoRA, expert_shape, expert_weights, find_parameter_targets
from mistral_train.adapters.inject import TrainableCopy, _is_linear, apply_lora, find_targets
from mistral_train.adapters.lora import ALL_LINEAR, PEFT_INIT, LoraConfig, LoRALinear
from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.checkpoint.integrity import safetensors_damage
from mistral_train.jsonfile import read_json_object
from mistral_train.errors import FolderError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# one line that rewrites peft's pickled adapter_model.bin (a plain state dict) beside it as safetensors
ADAPTER_CONVERT_COMMAND = ("python -c \"import sys, torch, safetensors.torch as st; d = sys.argv[1]; st.save_file(torch.load("
                           "d + '/adapter_model.bin', weights_only=True), d + '/adapter_model.safetensors')\" ADAPTER_FOLDER")
PREFIX = "base_model.model."
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}
# Written at their defaults (long-standing keys, so older peft versions read our file too).
_WRITTEN_DEFAULTS = {"layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
# peft features that change which weights exist or what forward computes: refused by name when set.
_UNSUPPORTED = (
    "layers_to_transform", "layers_pattern", "exclude_modules", "lora_bias", "use_qalora", "trainable_token_indices",
    "layer_replication", "megatron_config", "alora_invocation_tokens", "use_bdlora", "arrow_config", "monteclora_config",
    "velora_config", "kasa_config",
)


def _vision_language(model: nn.Module) -> Any:
    """The parts a text model loaded from a Mistral3ForConditionalGeneration folder carries (model/hf.py sets
    them; model/vision_language.py), else None. By attribute: adapters/ imports no model code."""
    return getattr(model, "vision_language", None)


def peft_module_name(model: nn.Module, name: str) -> str:
    """peft's name for our module `name` on the transformers twin of `model` (the one place where a
    vision-language model's language prefix enters: model.layers.0 -> model.language_model.layers.0)."""
    parts = _vision_language(model)
    return name if parts is None else parts.peft_module_name(name)


def our_module_name(model: nn.Module, name: str) -> str:
    """Inverse of peft_module_name."""
    parts = _vision_language(model)
    return name if parts is None else parts.our_module_name(name)


def _disk(model: nn.Module, name: str) -> str:
    """The PEFT key prefix of our module `name`."""
    return f"{PREFIX}{peft_module_name(model, name)}"


def expert_key(model: nn.Module, module: str, depth: int) -> str:
    """The PEFT key prefix of the adapter of an expert weight of `module`: peft nests one ParamWrapper per
    targeted weight, so a weight with `depth` targeted weights after it sits under that many `base_layer.`."""
    return f"{_disk(model, module)}." + "base_layer." * depth


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> the model's own adapter tensor (not a copy)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, ExpertLoRA):
            prefix = expert_key(model, name.rpartition(".")[0], m.depth)
            tensors[f"{prefix}lora_A.weight"] = m.lora_A
            tensors[f"{prefix}lora_B.weight"] = m.lora_B
        elif isinstance(m, LoRALinear):
            tensors[f"{_disk(model, name)}.lora_A.weight"] = m.lora_A
            tensors[f"{_disk(model, name)}.lora_B.weight"] = m.lora_B
            if m.use_dora:
                tensors[f"{_disk(model, name)}.lora_magnitude_vector"] = m.lora_magnitude_vector
        elif isinstance(m, TrainableCopy):
            for key, value in m.modules_to_save.state_dict(keep_vars=True).items():
                tensors[f"{_disk(model, name)}.{key}"] = value
    return tensors


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names (detached, contiguous, unshared)."""
    # clone: safetensors refuses tensors that share storage (e.g. a tied head copied whole)
    return {k: v.detach().clone().contiguous() for k, v in _live_tensors(model).items()}


def load_adapter_weights(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Copy the adapter tensors of `folder` into a model that already carries the same adapter
    (resuming a run), in place: parameters keep their identity, so an optimizer holding them
    stays valid. Keys and shapes must match exactly; a mismatch names the key and both shapes."""
    weights = Path(folder) / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError as e:
        raise FolderError(f"{weights}: not a readable adapter file ({e})") from e
    except SafetensorError as e:  # safetensors names neither tensor nor cause: checkpoint/integrity.py reads the header
        raise FolderError(f"{weights}: not a readable adapter file: {safetensors_damage(weights) or e}") from e
    return load_adapter_weights_from_tensors(model, tensors, str(weights))


def load_adapter_weights_from_tensors(model: nn.Module, tensors: dict[str, torch.Tensor],
                                      source: str = "adapter tensors") -> nn.Module:
    """`load_adapter_weights` from a {PEFT key: tensor} dict (`peft_state_dict`'s form)."""
    live = _live_tensors(model)
    if not live:
        raise FolderError(f"{source}: the model carries no adapter to load these weights into")
    if set(tensors) != set(live):
        extra, missing = sorted(set(tensors) - set(live)), sorted(set(live) - set(tensors))
        raise ValueError(f"{source}: adapter keys differ from the model's (not in the model: {extra[:3]}, "
                         f"missing from the file: {missing[:3]})")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(live[key].shape):
                raise ValueError(f"{source}: `{key}` has shape {tuple(tensor.shape)}, the model's is {tuple(live[key].shape)}")
            live[key].copy_(tensor)
    return model


def peft_config_dict(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
    """adapter_config.json for the LoRA applied to `model`, as peft writes it."""
    cfg: Optional[LoraConfig] = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA (no `lora_config`): apply_lora or load_adapter first")
    targets: Any = cfg.target_modules
    # peft also stores the expanded module names for all-linear; on a vision-language model always, as a short
    # name (q_proj) would also match the vision tower's linears on the transformers model
    if targets == ALL_LINEAR or _vision_language(model) is not None:
        targets = sorted(peft_module_name(model, name) for name, m in model.named_modules()
                         if isinstance(m, LoRALinear) and not getattr(m, "by_parameter", False))
    saved = [peft_module_name(model, name) for name in cfg.modules_to_save]
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES.get(getattr(model, "task", "causal_lm"), "CAUSAL_LM"),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets or None,  # None with only target_parameters, as peft writes it
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": PEFT_INIT[cfg.init],
        **_WRITTEN_DEFAULTS,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": {k: int(v) if float(v).is_integer() else v for k, v in cfg.alpha_pattern.items()},
        **({"target_parameters": list(cfg.target_parameters)} if cfg.target_parameters else {}),
    }


def write_adapter_files(model: nn.Module, folder: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors into an existing folder (not atomic:
    for a caller that publishes the folder itself, such as a checkpoint)."""
    config = peft_config_dict(model, base_model_name_or_path)
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(peft_state_dict(model), str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


def save_adapter(model: nn.Module, folder: Union[str, Path], base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `folder/adapter_config.json` + `folder/adapter_model.safetensors` atomically (the folder
    appears only when complete). `PeftModel.from_pretrained(base, folder)` loads it. Pass the
    unwrapped model (not a DDP/Accelerate wrapper)."""
    with atomic_directory(folder) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path)
    return Path(folder)


def config_from_peft(raw: dict[str, Any], source: str = CONFIG_FILE) -> LoraConfig:
    """A LoraConfig from peft's adapter_config.json fields; features we do not implement are refused by name."""
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type={raw.get('peft_type')!r}; only LORA adapters are supported")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias={raw['bias']!r} is not supported (only 'none')")
    for key in _UNSUPPORTED:
        value = raw.get(key)
        if not (value is None or value is False or (isinstance(value, (dict, list)) and not value)):
            raise ValueError(f"{source}: {key}={raw[key]!r} is not supported")
    if not raw.get("target_modules") and not raw.get("target_parameters"):
        raise ValueError(f"{source}: neither target_modules nor target_parameters; nothing to adapt")
    if raw.get("target_parameters") and not isinstance(raw["target_parameters"], list):
        raise ValueError(f"{source}: target_parameters={raw['target_parameters']!r}: expected a list of parameter names")
    init_value = raw.get("init_lora_weights", True)
    inits = {json.dumps(v): k for k, v in PEFT_INIT.items()}
    if json.dumps(init_value) not in inits:
        raise ValueError(f"{source}: init_lora_weights={init_value!r} is not supported; expected one of {list(PEFT_INIT.values())}")
    return LoraConfig(
        r=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=raw.get("target_modules") or [],
        target_parameters=raw.get("target_parameters") or [],
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
        modules_to_save=raw.get("modules_to_save") or [],
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        init=inits[json.dumps(init_value)],
    )


def read_adapter_config(folder: Union[str, Path]) -> LoraConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(folder)}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    return config_from_peft(read_json_object(path), str(path))


def _expected_shapes(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Disk key -> (our parameter name, shape) for the adapter `cfg` would put on `model`."""
    lora_names, saved_names = find_targets(model, cfg)
    expert_names, weight_names = find_parameter_targets(model, cfg.target_parameters, _is_linear)
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    weights = expert_weights(model)
    for module in dict.fromkeys(weights[key][0] for key in expert_names):
        params = [weights[key][1] for key in expert_names if weights[key][0] == module]  # peft's nesting order
        for i, param in enumerate(params):
            E, out, inp = expert_shape(model.get_submodule(module), param)
            prefix, ours = expert_key(model, module, len(params) - 1 - i), f"{module}.{param}{LORA_SUFFIX}"
            r = cfg.rank_of(f"{module}.{param}")
            expected[f"{prefix}lora_A.weight"] = (f"{ours}.lora_A", (E * r, inp))
            expected[f"{prefix}lora_B.weight"] = (f"{ours}.lora_B", (out, r * E))
    for name in lora_names + weight_names:
        m = model.get_submodule(name)
        r = cfg.rank_of(name)
        expected[f"{_disk(model, name)}.lora_A.weight"] = (f"{name}.lora_A", (r, m.in_features))
        expected[f"{_disk(model, name)}.lora_B.weight"] = (f"{name}.lora_B", (m.out_features, r))
        if cfg.use_dora:
            expected[f"{_disk(model, name)}.lora_magnitude_vector"] = (f"{name}.lora_magnitude_vector", (m.out_features,))
    for name in saved_names:
        for key, value in model.get_submodule(name).state_dict().items():
            expected[f"{_disk(model, name)}.{key}"] = (f"{name}.modules_to_save.{key}", tuple(value.shape))
    return expected


def load_adapter(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Apply the adapter in `folder` (written by peft or by us) to a plain model, in place.

    Every tensor is checked before the model changes: a key for a module the model lacks, a
    missing tensor, or a shape that does not fit (e.g. another rank) raises, naming the key,
    both shapes and the module's weight shape. Adapter parameters are trainable afterwards.
    """
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    if _vision_language(model) is not None:  # peft's module names on the transformers vision-language model -> ours
        if isinstance(cfg.target_modules, list):
            cfg.target_modules = [our_module_name(model, name) for name in cfg.target_modules]
        elif cfg.target_modules != ALL_LINEAR:  # a regex over peft's names: the modules it picks, by our names
            cfg.target_modules = [name for name, _ in model.named_modules()
                                  if re.fullmatch(cfg.target_modules, peft_module_name(model, name))]
    cfg.modules_to_save = [our_module_name(model, name) for name in cfg.modules_to_save]
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        hint = ""
        if (folder / "adapter_model.bin").exists():
            hint = (" (only a pickled adapter_model.bin: pickles are never loaded; convert it to safetensors once "
                    f"with: {ADAPTER_CONVERT_COMMAND})")
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}{hint}")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file: {safetensors_damage(weights) or e}") from e
    # Some peft versions stored DoRA's magnitude as `lora_magnitude_vector.weight`.
    tensors = {k.removesuffix(".weight") if k.endswith("lora_magnitude_vector.weight") else k: v for k, v in tensors.items()}
    expected = _expected_shapes(model, cfg)
    module_names = {name for name, _ in model.named_modules()}
    for key, tensor in tensors.items():
        if key not in expected:
            module = _module_of(key)
            why = "a module the model does not have" if module not in module_names else "no parameter of this adapter config"
            raise ValueError(f"{weights}: tensor `{key}` {tuple(tensor.shape)} targets {why} (module `{module}`)")
        ours, shape = expected[key]
        if tuple(tensor.shape) != shape:
            module = ours.rsplit(".", 1)[0].removesuffix(".modules_to_save")
            raise ValueError(
                f"{weights}: `{key}` has shape {tuple(tensor.shape)} but `{ours}` needs {shape} "
                f"(r={cfg.r} in {CONFIG_FILE}; `{module}` is {_describe(model, module)})"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{weights}: lacks {len(missing)} tensor(s) the config targets, e.g. {missing[:3]}")
    apply_lora(model, cfg)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in tensors.items():
            state[expected[key][0]].copy_(tensor)
    return model


def _module_of(disk_key: str) -> str:
    """The module a disk key belongs to: `base_model.model.a.b.lora_A.weight` -> `a.b`."""
    key = disk_key.removeprefix(PREFIX)
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key.rpartition(".")[0]


def _describe(model: nn.Module, name: str) -> str:
    parent, _, child = name.rpartition(".")
    if child.endswith(LORA_SUFFIX):  # an expert weight's adapter, not applied yet
        shape = expert_shape(model.get_submodule(parent), child.removesuffix(LORA_SUFFIX))
        return f"an expert weight of shape (experts, out, in) = {shape}"
    m = model.get_submodule(name)
    if hasattr(m, "out_features"):
        return f"a linear with weight shape (out, in) = ({m.out_features}, {m.in_features})"
    return type(m).__name__
