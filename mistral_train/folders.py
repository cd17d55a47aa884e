"""What a folder the user named holds: an HF model (a language model or a classifier), a PEFT adapter,
or neither. The checks read config.json / adapter_config.json only, never weights, so they run before
any data is read or model built; each failure is a ConfigError naming the folder and what to pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mistral_train.adapters.peft_format import _TASK_TYPES as PEFT_TASK_TYPES, CONFIG_FILE as ADAPTER_CONFIG
from mistral_train.errors import ConfigError
from mistral_train.jsonfile import read_json_object
from mistral_train.model import native
from mistral_train.model.hf import folder_config, weight_files

MODEL_CONFIG = "config.json"
BASE_NOTE = "mistral_train_base.json"  # how the base was loaded, next to an adapter we write
# transformers' class names end with the head; anything else a Mistral folder holds is a causal LM
_HEAD_SUFFIXES = {"ForSequenceClassification": "sequence_classification",
                  "ForTokenClassification": "token_classification"}


def is_model_folder(folder: Path) -> bool:
    """An HF model folder (config.json) or one in Mistral's native format (params.json, model/native.py)."""
    return (folder / MODEL_CONFIG).is_file() or native.is_native_folder(folder)


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter (adapter_config.json) without a model of its own (no config.json)."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / MODEL_CONFIG).is_file()


def model_task(folder: Path) -> str:
    """causal_lm, sequence_classification or token_classification, from config.json's `architectures`
    (a native folder holds a causal LM)."""
    if native.is_native_folder(folder):
        return "causal_lm"
    for name in read_json_object(folder / MODEL_CONFIG).get("architectures") or []:
        for suffix, task in _HEAD_SUFFIXES.items():
            if str(name).endswith(suffix):
                return task
    return "causal_lm"


def folder_task(folder: Path) -> str:
    """The head of what a model or adapter folder holds: for an adapter, our run's note, else peft's task_type."""
    if not is_adapter_folder(folder):
        return model_task(folder)
    if (folder / BASE_NOTE).is_file() and read_json_object(folder / BASE_NOTE).get("task"):
        return str(read_json_object(folder / BASE_NOTE)["task"])
    task_type = read_json_object(folder / ADAPTER_CONFIG).get("task_type")
    return next((ours for ours, peft in PEFT_TASK_TYPES.items() if peft == task_type), "causal_lm")


def adapter_base(folder: Path, base: Optional[str] = None) -> tuple[str, dict]:
    """(base model folder, how it was loaded) of an adapter folder: `base` if given, else the one our
    run noted (BASE_NOTE: also quantize, dtype, task), else adapter_config.json's base_model_name_or_path.

    Raises:
        ConfigError: the base is not named, or is not an HF folder here.
    """
    note = read_json_object(folder / BASE_NOTE) if (folder / BASE_NOTE).is_file() else {}
    base = base or note.get("base") or read_json_object(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base or not is_model_folder(Path(base)):
        raise ConfigError(f"{folder}: the adapter's base model folder {base!r} is not an HF folder here; "
                          "pass the base with --base DIR")
    return str(base), note


def check_model_folder(path: str, key: str = "model.path") -> None:
    """`path` is an HF folder of a model Mistral.from_pretrained reads: it exists, is not an adapter,
    its config.json describes a Mistral model, and its weight files are there.

    Raises:
        ConfigError: naming `key`, the folder and what to pass instead.
    """
    folder = Path(path)
    expected = "expected an HF Mistral folder (config.json + *.safetensors), e.g. runs/NAME/final"
    if not folder.exists():
        raise ConfigError(f"{key}={path} does not exist; {expected}")
    if not folder.is_dir():
        raise ConfigError(f"{key}={path} is a file; {expected}")
    if is_adapter_folder(folder):
        base = read_json_object(folder / ADAPTER_CONFIG).get("base_model_name_or_path") or "BASE"
        raise ConfigError(f"{key}={path} is a LoRA adapter folder, not a model: continue it with model.path={base} "
                          f"adapter=lora adapter.path={path}, or merge it first (mistral-train merge {path} --out DIR) "
                          "and pass model.path=DIR")
    if not is_model_folder(folder):
        raise ConfigError(f"{key}={path} has no {MODEL_CONFIG} (nor {native.PARAMS_FILE}); {expected}")
    try:
        folder_config(folder)  # model_type and the required shape keys
        native.weight_files(folder) if native.is_native_folder(folder) else weight_files(folder)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{key}={path}: {err}") from err


def check_adapter_folder(path: str, key: str = "adapter.path") -> None:
    """`path` is a PEFT adapter folder (adapter_config.json). Raises ConfigError naming `key`."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}={path} does not exist; expected a LoRA adapter folder (adapter_config.json + "
                          "adapter_model.safetensors), e.g. runs/NAME/final of an adapter run")
    if not (folder / ADAPTER_CONFIG).is_file():
        hint = "; it is a full model: pass it as model.path" if (folder / MODEL_CONFIG).is_file() else ""
        raise ConfigError(f"{key}={path} has no {ADAPTER_CONFIG}: not a LoRA adapter folder{hint}")
