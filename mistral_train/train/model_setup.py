"""The model a run trains, and its folder in a checkpoint.

`build_model`: a fresh model of the spec's shape, or the HF folder at `model.path`; for
`adapter=qlora` its decoder linears are read as NF4; for `lora`/`qlora` adapters are injected
(fresh, or read from `adapter.path` to continue one). `save_model_folder` writes what a
checkpoint needs to be usable on its own (a PEFT adapter for adapter runs, else a full HF folder,
plus a note of how the base was loaded); `load_model_weights` reads it back in place for resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mistral_train.adapters import LoraConfig, apply_lora, load_adapter, load_adapter_weights, write_adapter_files
from mistral_train.config import AdapterSpec, ModelSpec
from mistral_train.folders import BASE_NOTE
from mistral_train.model import Mistral, MistralConfig
from mistral_train.errors import FolderError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_KINDS = ("none", "lora", "qlora")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def lora_config(spec: AdapterSpec) -> LoraConfig:
    return LoraConfig(r=spec.r, alpha=spec.alpha, dropout=spec.dropout, target_modules=spec.target_modules,
                      modules_to_save=list(spec.modules_to_save), use_rslora=spec.use_rslora,
                      use_dora=spec.use_dora, init=spec.init, target_parameters=list(spec.target_parameters))


def build_model(spec: ModelSpec, tokenizer, adapter: Optional[AdapterSpec] = None, task: str = "causal_lm",
                pad_id: Optional[int] = None) -> Mistral:
    """The model to train (see the module docstring). A sequence-classification model (a reward model) gets
    a one-label `score` head (fresh unless the folder has one), `pad_token_id = pad_id` so it pools the last
    token before the padding as transformers does, and, with adapters, a trained `score`.

    Raises:
        ValueError: an unknown dtype or adapter kind, an adapter without a pretrained base
            (`model.path`), or a model whose vocabulary is smaller than the tokenizer's.
    """
    adapter = adapter or AdapterSpec()
    if adapter.kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter.kind must be one of {ADAPTER_KINDS}, got {adapter.kind!r}")
    dtype = torch_dtype(spec.dtype)
    if adapter.kind != "none" and not spec.path:
        raise ValueError(f"adapter={adapter.kind} trains adapters on a pretrained base: set model.path to an HF "
                         "folder (a fresh random base would make the adapter meaningless)")
    if spec.path:
        model = Mistral.from_pretrained(spec.path, dtype=dtype, task=task,
                                        quantize="nf4" if adapter.kind == "qlora" else None)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise FolderError(f"model.path {spec.path}: vocab_size {model.config.vocab_size} is smaller than the "
                             f"tokenizer's ({tokenizer.vocab_size}); is model.tokenizer the model's tokenizer?")
    else:
        config = MistralConfig.from_spec(spec, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                         eos_token_id=tokenizer.eos_id)
        model = Mistral(config, task=task).to(dtype)
    if task == "sequence_classification":
        one_label_head(model, pad_id)
    if adapter.kind != "none":
        if adapter.path:
            load_adapter(model, adapter.path)
        else:
            config = lora_config(adapter)
            if task != "causal_lm" and "score" not in config.modules_to_save:
                config.modules_to_save.append("score")  # a fresh head must train (peft does the same for SEQ_CLS)
            apply_lora(model, config)
    model.set_gradient_checkpointing(spec.gradient_checkpointing, every=spec.checkpoint_every)
    model.set_activation_offloading(spec.activation_offloading)
    return model


def compile_enabled(setting: str, device: torch.device) -> bool:
    """trainer.compile: `auto` compiles on CUDA only (on a CPU the one-off compile costs more than the few
    percent a step gains, see docs/benchmarks.md), else the setting as said."""
    flag = str(setting).lower()
    if flag not in ("auto", "true", "false"):
        raise ValueError(f"trainer.compile must be auto, true or false, got {setting!r}")
    return device.type == "cuda" if flag == "auto" else flag == "true"


def one_label_head(model: Mistral, pad_id: Optional[int]) -> None:
    """A reward model scores with one label: replace a head of another width (e.g. the 2 labels a
    causal-LM folder's config implies) by a fresh one, initialised like every fresh weight."""
    if model.config.num_labels != 1:
        head = torch.nn.Linear(model.config.hidden_size, 1, bias=False, device=model.score.weight.device,
                               dtype=model.score.weight.dtype)
        model.init_weights(head)
        model.score, model.config.num_labels = head, 1
        model.config.extra.pop("id2label", None)
        model.config.extra.pop("label2id", None)
    if pad_id is not None:
        model.config.pad_token_id = pad_id


def is_adapted(model: torch.nn.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


def save_model_folder(model: Mistral, folder: Path, model_spec: ModelSpec, adapter: AdapterSpec) -> None:
    """Write the trained weights into `folder`: a PEFT adapter (plus BASE_NOTE) for adapter runs, else
    a full HF folder."""
    if not is_adapted(model):
        model.save_pretrained(folder)
        return
    write_adapter_files(model, folder, base_model_name_or_path=model_spec.path)  # the caller publishes `folder`
    note = {"base": model_spec.path, "quantize": "nf4" if adapter.kind == "qlora" else None, "dtype": model_spec.dtype,
            "task": model.task, "pad_token_id": model.config.pad_token_id}
    (Path(folder) / BASE_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def load_model_weights(model: Mistral, folder: Path) -> None:
    """Inverse of `save_model_folder`, in place: the optimizer keeps its parameters, their device and dtype."""
    if is_adapted(model):
        load_adapter_weights(model, folder)
        return
    loaded = Mistral.from_pretrained(folder, task=model.task)  # knows the folder format (shards, tied weights)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise FolderError(f"{folder}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
