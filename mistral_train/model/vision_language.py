"""Vision-language checkpoints (transformers' `Mistral3ForConditionalGeneration`, model_type `mistral3`) as
text models: Mistral-Small 3.1/3.2, Ministral 3, Magistral, Devstral Small 2.

Such a folder holds a language model (config in `text_config`, weights under a prefix), a vision tower and a
multi-modal projector. We train the language model only. The other tensors are carried by reference (file
and key, never loaded into the trained model) and copied, byte for byte, into every folder we save, so a
saved folder is again a `Mistral3ForConditionalGeneration` that stands on its own.

Why by reference: the tower of Mistral-Small 3.1 is ~0.8 GB in bf16; holding it through a run (on every
rank) buys nothing, as the source folder must be readable at the start anyway. Saving re-reads it, one
shard at a time. The source files' size and mtime are recorded at load and checked before a save, so a
source that moved or changed is an error naming the file, never silently different bytes.

Key layouts (both are read; transformers 5 builds the first and reads both, and writes the second, as do
older transformers, vLLM and the published checkpoints, so we write the second too):
    model.language_model.X / lm_head.W            <->  ours: model.X / lm_head.W
    language_model.model.X / language_model.lm_head.W
    model.vision_tower.*, model.multi_modal_projector.*  or  vision_tower.*, multi_modal_projector.*  (carried)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from mistral_train.errors import FolderError, TensorNameError
from mistral_train.jsonfile import read_json_object
from mistral_train.model.config import MistralConfig

MODEL_TYPE = "mistral3"
ARCHITECTURE = "Mistral3ForConditionalGeneration"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers too
# (prefix in a checkpoint or in transformers' module names, our prefix): the language model's two layouts.
_LANGUAGE = (
    ("model.language_model.", "model."), ("lm_head.", "lm_head."),
    ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
)
_WRITTEN = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}  # ours -> saved
_CARRIED = {  # the other parts: prefix read -> prefix written
    "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
    "vision_tower.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector.",
}
# Top-level keys that describe the file, not the model: regenerated on save.
_BOOKKEEPING = ("transformers_version", "torch_dtype", "dtype")


def language_name(name: str) -> Optional[str]:
    """Our name for a checkpoint key or transformers module name of the language model (either layout);
    None for anything else (the vision tower and projector)."""
    for theirs, ours in _LANGUAGE:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
        if name + "." == theirs:  # a module name, e.g. `lm_head`
            return ours[:-1]
    return None


def transformers_module_name(name: str) -> str:
    """transformers 5's module name in `Mistral3ForConditionalGeneration` for our module `name`
    (what peft names adapters by): model.layers.0.mlp -> model.language_model.layers.0.mlp."""
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


@dataclass(frozen=True)
class CarriedTensor:
    """One tensor of the vision tower or projector, left in its source file until a save copies it."""

    file: Path
    key: str  # its name in `file`
    nbytes: int

    def load(self) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_tensor(self.key)


@dataclass
class VisionLanguage:
    """What a text model loaded from a `Mistral3ForConditionalGeneration` folder needs to be saved as one.

    Attributes:
        source_config: the folder's config.json (its `text_config` is rewritten from the model's on save).
        text_config: the language model's architecture.
        carried: saved key -> the tensor it copies (vision tower and projector).
        fingerprints: (size, mtime_ns) of each source file holding a carried tensor, at load.
    """

    source_config: dict[str, Any]
    text_config: MistralConfig
    carried: dict[str, CarriedTensor] = field(default_factory=dict)
    fingerprints: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def saved_entries(self, state: dict[str, torch.Tensor]) -> dict[str, Union[torch.Tensor, CarriedTensor]]:
        """The tensors of the saved folder: the language model's `state` under the saved prefix, then the
        carried tensors (still in their files). Raises FolderError when a source file changed or is gone."""
        for file, stamp in self.fingerprints.items():
            if not file.is_file():
                raise FolderError(f"{file}: gone since the model was loaded; the vision tower and projector "
                                  f"are copied from it on save, so it must stay in place")
            if _fingerprint(file) != stamp:
                raise FolderError(f"{file}: changed since the model was loaded; the vision tower and projector "
                                  f"are copied from it on save and would no longer be the loaded ones")
        entries: dict[str, Union[torch.Tensor, CarriedTensor]] = {}
        for key, tensor in state.items():
            ours = next(p for p in _WRITTEN if key.startswith(p))
            entries[_WRITTEN[ours] + key[len(ours):]] = tensor
        return entries | self.carried

    def config_dict(self, text_config: MistralConfig, dtype: Optional[str]) -> dict[str, Any]:
        """config.json of the saved folder: the source's, with the model's `text_config`."""
        text = text_config.to_hf_dict()
        for key in ("architectures", *_BOOKKEEPING):
            text.pop(key, None)
        d = {k: v for k, v in self.source_config.items() if k not in _BOOKKEEPING}
        d.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, text_config=text,
                 # transformers ties lm_head by the top-level flag (default true): always write it
                 tie_word_embeddings=text_config.tie_word_embeddings)
        if dtype is not None:
            d["dtype"] = dtype
        return dict(sorted(d.items()))

    def save_config(self, folder: Path, text_config: MistralConfig, dtype: Optional[str]) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.config_dict(text_config, dtype), indent=2) + "\n")

    # adapters/ (below model/) reaches these through the model's `vision_language` attribute, by duck typing.
    def peft_module_name(self, name: str) -> str:
        """The module name peft uses for our module `name` on the transformers Mistral3ForConditionalGeneration."""
        return transformers_module_name(name)

    def our_module_name(self, name: str) -> str:
        """Inverse of peft_module_name (either transformers layout); a name outside the language model is
        returned unchanged, so that the adapter loader reports it as a module the model lacks."""
        ours = language_name(name)
        return name if ours is None else ours


class LanguageView:
    """An open safetensors file seen as the text model's: its language tensors under our names."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.names = {ours: key for key in f.keys() if (ours := language_name(key)) is not None}

    def keys(self) -> list[str]:
        return list(self.names)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.f.get_tensor(self.names[key])

    def get_slice(self, key: str) -> Any:
        return self.f.get_slice(self.names[key])


def read_folder(folder: Path, weight_files: Callable[[Path], list[Path]], task: str) -> Optional[VisionLanguage]:
    """The vision-language description of an HF folder whose config.json says model_type `mistral3`, else None.

    Args:
        weight_files: lists the folder's safetensors files (model/hf.py's).
        task: the head asked for; only "causal_lm" exists for these checkpoints.
    """
    path = folder / "config.json"
    if not path.is_file():
        return None  # the caller reports the missing config.json
    raw = read_json_object(path)
    if raw.get("model_type") != MODEL_TYPE:
        return None
    if task != "causal_lm":
        raise FolderError(f"{path}: a {ARCHITECTURE} folder loads as a causal LM only, not for task {task!r}")
    if raw.get("quantization_config") is not None:
        raise FolderError(f"{path}: `quantization_config` is set; a quantized {ARCHITECTURE} folder is not "
                          f"supported: load its float weights with quantize='nf4'")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise FolderError(f"{path}: `text_config` must be the language model's config object, got {text!r}")
    files = weight_files(folder)
    carried: dict[str, CarriedTensor] = {}
    has_head = False
    for file in files:
        for key, nbytes in _tensor_sizes(file):
            ours = language_name(key)
            if ours is not None:
                has_head |= ours == "lm_head.weight"
                continue
            prefix = next((p for p in _CARRIED if key.startswith(p)), None)
            if prefix is None:
                raise TensorNameError(f"{file}: unexpected tensor `{key}` (neither the language model, the vision "
                                      f"tower nor the projector of a {ARCHITECTURE})")
            carried[_CARRIED[prefix] + key[len(prefix):]] = CarriedTensor(file, key, nbytes)
    # transformers ties lm_head to the embeddings by the top-level flag (Mistral3Config's default: true),
    # unless the checkpoint stores a head of its own, which it then keeps.
    tie = bool(raw.get("tie_word_embeddings", True)) and not has_head
    text_config = MistralConfig.from_hf_dict(text | {"tie_word_embeddings": tie}, source=f"{path} `text_config`")
    stamps = {c.file: _fingerprint(c.file) for c in carried.values()}
    return VisionLanguage({k: v for k, v in raw.items() if k != "text_config"}, text_config, carried, stamps)


def of(model: nn.Module) -> Optional[VisionLanguage]:
    """The vision-language parts a model loaded from a mistral3 folder carries (model/hf.py sets them), else None."""
    return getattr(model, "vision_language", None)


def _fingerprint(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def _tensor_sizes(file: Path) -> Iterator[tuple[str, int]]:
    """(key, bytes) of each tensor in a safetensors file, from its header alone (8-byte length, then JSON)."""
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(file.stat().st_size - 8, SAFETENSORS_MAX_HEADER):  # a lying length: refuse, never allocate it
                raise FolderError(f"{file}: not a readable safetensors file (its header claims {length} bytes); "
                                  "is it truncated?")
            header = json.loads(fh.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from e
    for key, info in header.items():
        if key != "__metadata__":
            start, end = info["data_offsets"]
            yield key, end - start


def entry_bytes(entry: Union[torch.Tensor, CarriedTensor]) -> int:
    """Bytes a saved tensor takes, whether in memory or still in its source file."""
    return entry.nbytes if isinstance(entry, CarriedTensor) else entry.numel() * entry.element_size()


def loaded(shard: dict[str, Union[torch.Tensor, CarriedTensor]]) -> dict[str, torch.Tensor]:
    """A shard's tensors in memory: carried ones are read now, one shard at a time."""
    return {k: v.load() if isinstance(v, CarriedTensor) else v for k, v in shard.items()}
