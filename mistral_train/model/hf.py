"""Hugging Face checkpoint folders in and out: config.json + (sharded) safetensors.

Keys are transformers' own, so the key map is the identity. Loading builds the model on
the meta device and materialises it shard by shard, so peak memory stays near one copy of
the weights. Saving writes into a temporary folder renamed into place when complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.checkpoint.integrity import safetensors_damage
from mistral_train.model.blocks import score_layer
from mistral_train.model.config import MistralConfig
from mistral_train.model import expert_layout
from mistral_train.model import native
from mistral_train.model import vision_language
from mistral_train.quant.loading import QUANTIZE_MODES, NF4Loading, prequantized_config
from mistral_train.errors import FolderError, TensorNameError
from mistral_train.jsonfile import read_json_object

SINGLE_FILE = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# one line that rewrites a pickled HF folder as safetensors: transformers unpickles it with weights_only=True
# and save_pretrained writes safetensors (the default since transformers 4.35, the only format in 5.x)
CONVERT_COMMAND = ("python -c \"import sys, transformers; transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
                   ".save_pretrained(sys.argv[2])\" OLD_FOLDER NEW_FOLDER")
INDEX_FILE = "model.safetensors.index.json"
_ARCHITECTURES = {
    "causal_lm": "MistralForCausalLM",
    "sequence_classification": "MistralForSequenceClassification",
    "token_classification": "MistralForTokenClassification",
}
# Keys old checkpoints carry that hold no weights we need (RoPE tables are recomputed).
_IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder, in index order. Pickled weights (.bin, .pt) are never read:
    unpickling runs code the folder's author chose (a folder holding only those is refused, saying how
    to convert it); an index may name only .safetensors files inside the folder."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = read_json_object(index_path)["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise FolderError(f"{index_path}: expected JSON with a `weight_map` object ({e})") from e
        for name in names:
            _check_shard_name(index_path, name)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path}: lists shard(s) not in the folder: {missing}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise FileNotFoundError(f"{folder}: holds only pickled weights ({', '.join(pickled)}), which are never "
                                "loaded (unpickling runs code from the file); convert them to safetensors once "
                                f"with: {CONVERT_COMMAND}")
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def _check_shard_name(index_path: Path, name: object) -> None:
    """An index's shard is a .safetensors file named inside the index's folder: no absolute path, no '..'
    (checked on the name, not by resolving links: the HF hub cache links shards to its blobs folder)."""
    parts = Path(str(name)).parts
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in parts or not name.endswith(".safetensors"):
        raise FolderError(f"{index_path}: shard {name!r} is not a .safetensors file inside the folder; refusing to read it")


def load_pretrained(
    model_class: type[nn.Module], path: Union[str, Path], dtype: Optional[torch.dtype] = None, task: str = "causal_lm",
    quantize: Optional[str] = None,
) -> nn.Module:
    """Read an HF Mistral folder into `model_class(config, task)` (Mistral.from_pretrained passes its class).

    Args:
        path: folder with config.json and model.safetensors (or an index + shards), or a folder in Mistral's
            native format (params.json + consolidated.safetensors, model/native.py).
        dtype: cast floating weights to this dtype; None keeps the stored dtypes.
        task: the head to build. A classification head loaded from a causal-LM folder
            drops `lm_head.weight` and starts its `score` layer fresh (as transformers does).
        quantize: "nf4" stores the decoder linears as NF4 (QLoRA base weights), quantized one
            tensor at a time while reading, computing in `dtype` (default: each weight's stored
            dtype). A folder transformers saved with a bitsandbytes 4-bit `quantization_config`
            loads as NF4 whether or not this is set (see mistral_train/quant/loading.py).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected an HF checkpoint folder with config.json)")
    vision = vision_language.read_folder(folder, weight_files, task)  # model_type mistral3: its language model
    config = vision.text_config if vision is not None else folder_config(folder)
    with torch.device("meta"):
        model = model_class(config, task=task)
    nf4 = _nf4_loading(model, quantize, dtype, folder)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    loaded: set[str] = set()
    experts = expert_layout.ExpertGathering(config)  # Mixtral's per-expert layout, fused at the end
    is_native = native.is_native_folder(folder)  # params.json: names and rotary layout converted while reading
    for file in (native.weight_files(folder) if is_native else weight_files(folder)):
        try:
            with (native.NativeWeights(file, config) if is_native else safe_open(str(file), framework="pt")) as f:
                if vision is not None:  # language tensors under our names; the vision tower is carried
                    f = vision_language.LanguageView(f)
                for key in f.keys():
                    if _IGNORED_KEY.match(key) or (task != "causal_lm" and key == "lm_head.weight"):
                        continue
                    if nf4 is not None and nf4.offer(key, f, str(file)):
                        continue
                    if experts.offer(key, lambda: f.get_tensor(key)):
                        continue
                    tensor = f.get_tensor(key)
                    key = expert_layout.our_name(key)
                    if key not in expected:
                        raise TensorNameError(f"{file}: unexpected tensor `{key}` (not a parameter of a Mistral {task} model)")
                    if tuple(tensor.shape) != tuple(expected[key]):
                        raise FolderError(
                            f"{file}: `{key}` has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key])}"
                        )
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    _assign(model, key, tensor)
                    loaded.add(key)
        except SafetensorError as e:
            # safetensors names neither the tensor nor the cause: read the header ourselves to say which
            raise FolderError(f"{file}: not a readable safetensors file: {safetensors_damage(file) or e}") from e
    if nf4 is not None:
        loaded |= nf4.finish(str(folder))
    for key, tensor in experts.finish(str(folder)).items():
        if key not in expected or tuple(tensor.shape) != tuple(expected[key]):
            raise FolderError(f"{folder}: experts stack into `{key}` of shape {tuple(tensor.shape)}, the model "
                              f"expects {tuple(expected[key]) if key in expected else 'no such tensor'}")
        _assign(model, key, tensor.to(dtype) if dtype is not None else tensor)
        loaded.add(key)
    if nf4 is not None:  # MoE expert stacks in NF4 too, once assembled; routers stay float (quant/nf4_experts.py)
        nf4.finish_experts()
    if config.tie_word_embeddings and task == "causal_lm":
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    if task != "causal_lm" and "score.weight" not in loaded:
        # A classification model started from a causal-LM folder: a fresh head, as transformers does.
        score = score_layer(config, task).to(model.model.norm.weight.dtype)
        model.init_weights(score)
        model.score = score
        loaded.update(name for name, _ in score.named_parameters(prefix="score"))
    missing = sorted(set(expected) - loaded)
    if missing:
        raise TensorNameError(f"{folder}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    if vision is not None:
        model.vision_language = vision  # save_pretrained writes a Mistral3ForConditionalGeneration folder again
    return model


def folder_config(folder: Path) -> MistralConfig:
    """The architecture of a model folder: config.json, or params.json in Mistral's native format (model/native.py)."""
    if native.is_native_folder(folder):
        return native.read_params(folder)
    vision = vision_language.read_folder(folder, weight_files, "causal_lm")  # mistral3: its `text_config`
    if vision is not None:
        return vision.text_config
    return MistralConfig.from_json_file(folder / "config.json")


def _nf4_loading(model: nn.Module, quantize: Optional[str], dtype: Optional[torch.dtype], folder: Path):
    """The NF4 router for this load (quantize="nf4" or a bnb 4-bit folder), else None."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE_MODES} or None")
    prequantized = prequantized_config(model.config.extra, str(folder / "config.json"))
    if quantize is None and prequantized is None:
        return None
    return NF4Loading(model, prequantized, dtype)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter `key` by `tensor`."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, name, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def parse_size(size: Union[int, str]) -> int:
    """Bytes in "5GB", "500MB", "10KB" (powers of 1000, as transformers) or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes as an int or like '5GB', '500MB'")
    unit = (match.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * factor)


def save_pretrained(model: nn.Module, path: Union[str, Path], max_shard_size: Union[int, str] = "5GB") -> None:
    """Write `model` as an HF folder that transformers loads with the same logits.

    Tied output weights are stored once (as transformers does). Shards are filled in key
    order up to `max_shard_size`; more than one shard adds `model.safetensors.index.json`.
    The folder appears only when complete.
    """
    limit = parse_size(max_shard_size)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.mlp_kind == "moe":  # the per-expert layout transformers writes (model/expert_layout.py)
        state = expert_layout.per_expert_state(state)
    if model.task == "causal_lm" and model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    vision = vision_language.of(model)
    if vision is not None:  # language keys under transformers' prefix, then the carried tensors (read when written)
        state = vision.saved_entries(state)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        size = vision_language.entry_bytes(tensor)
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_directory(path) as tmp:
        if vision is not None:
            vision.save_config(tmp, model.config, dtype)
        else:
            model.config.save(tmp, architecture=_ARCHITECTURES[model.task], dtype=dtype)
        if len(shards) == 1:
            save_file(vision_language.loaded(shards[0]), str(tmp / SINGLE_FILE), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(vision_language.loaded(shard), str(tmp / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(vision_language.entry_bytes(t) for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
