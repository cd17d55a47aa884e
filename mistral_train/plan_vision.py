"""What `plan` counts of a vision-language checkpoint (transformers' `Mistral3ForConditionalGeneration`, model_type
`mistral3`: Mistral-Small 3.1/3.2, Ministral 3): its language model is planned like any other; its vision tower
(Pixtral) and multi-modal projector are carried untouched (model/vision_language.py: read from the source folder
when a folder is saved, never held on the device), so they are counted as parameters and take no device memory.

The count is arithmetic on the config (no weights read), by transformers' modules:
  tower      patch_conv c p^2 h (no bias), ln_pre h; per layer two RMSNorms 2h, q k v o 4h^2, gate up down 3hi
  projector  norm h, patch_merger (h m^2) h, linear_1 (h f) H (+H), linear_2 H H (+H)
h, i the tower's hidden and intermediate sizes, c its channels, p its patch size, m spatial_merge_size, f the
number of vision feature layers, H the language model's hidden size, (+H) the biases when multimodal_projector_bias.
"""

from __future__ import annotations

from typing import Any, Optional

from mistral_train.errors import ConfigError

# the keys the count reads: the tower's (vision_config) and the projector's (the mistral3 config's top level)
TOWER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "num_channels")
PROJECTOR_KEYS = ("spatial_merge_size", "multimodal_projector_bias", "vision_feature_layer")
PROJECTOR_DEFAULTS = {"spatial_merge_size": 2, "multimodal_projector_bias": False, "vision_feature_layer": -1}


def carried_parameters(tower: dict[str, Any], projector: dict[str, Any], text_hidden: int) -> int:
    """Parameters of the vision tower and projector (see the module docstring); `projector` may omit keys
    (Mistral3Config's defaults)."""
    h, i, layers, p, c = (tower[k] for k in TOWER_KEYS)
    proj = {**PROJECTOR_DEFAULTS, **projector}
    m, bias = proj["spatial_merge_size"], int(bool(proj["multimodal_projector_bias"]))
    features = 1 if isinstance(proj["vision_feature_layer"], int) else len(proj["vision_feature_layer"])
    tower_count = c * p * p * h + h + layers * (2 * h + 4 * h * h + 3 * h * i)
    projector_count = h + h * m * m * h + (h * features + bias) * text_hidden + (text_hidden + bias) * text_hidden
    return tower_count + projector_count


def of_config_json(d: dict[str, Any], source: str) -> int:
    """The carried parameters of a mistral3 config.json (0 for any other model_type)."""
    if d.get("model_type") != "mistral3":
        return 0
    tower, text = d.get("vision_config"), d.get("text_config")
    if not isinstance(tower, dict) or not isinstance(text, dict):
        raise ConfigError(f"{source}: a mistral3 config needs `vision_config` and `text_config` objects")
    missing = [k for k in TOWER_KEYS if k not in tower]
    if missing:
        raise ConfigError(f"{source}: `vision_config` lacks {', '.join(missing)}")
    return carried_parameters(tower, {k: d[k] for k in PROJECTOR_KEYS if k in d}, text["hidden_size"])


def of_spec(vision: Optional[dict[str, Any]], text_hidden: int) -> int:
    """The carried parameters a preset's `model.vision` names (TOWER_KEYS, and PROJECTOR_KEYS or their defaults);
    0 without one. An unknown or missing key is an error naming it."""
    if not vision:
        return 0
    unknown = sorted(set(vision) - set(TOWER_KEYS) - set(PROJECTOR_KEYS))
    missing = [k for k in TOWER_KEYS if k not in vision]
    if unknown or missing:
        raise ConfigError(f"model.vision: unknown key(s) {unknown}" if unknown else
                          f"model.vision: missing {', '.join(missing)} (expected {', '.join(TOWER_KEYS)})")
    return carried_parameters({k: vision[k] for k in TOWER_KEYS},
                              {k: vision[k] for k in PROJECTOR_KEYS if k in vision}, text_hidden)
