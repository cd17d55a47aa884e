"""What a run leaves besides checkpoints: the final folder (HF model or PEFT adapter, with the tokenizer), an
adapter merged into its base, a sample, and any model folder rewritten as HF or Mistral's native format (export)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.config import RunConfig
from mistral_train.generate import generate
from mistral_train.adapters import load_adapter, merge_and_unload
from mistral_train.errors import ConfigError
from mistral_train.folders import adapter_base, is_adapter_folder, model_task
from mistral_train.model import Mistral
from mistral_train.model.native import save_native
from mistral_train.quant import dequantize_model
from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path
from mistral_train.tokenizer.files import folder_chat_format, write_tokenizer_files
from mistral_train.train.model_setup import one_label_head, torch_dtype


EXPORT_FORMATS = ("hf", "native")  # `mistral-train export --format`


def export_final(write_folder: Callable[[Path], None], folder: Path) -> Path:
    """The final folder (weights or adapter, and the tokenizer), appearing all at once."""
    with atomic_directory(folder) as tmp:
        write_folder(tmp)
    return folder


def merge_adapter_folder(adapter_folder: Path, out: Path, base: Optional[str] = None,
                         dtype: Optional[str] = None, sample_tokens: int = 64) -> float:
    """Merge a PEFT adapter into a full-precision copy of its base and write an HF folder at `out`.

    The base is read in fp32 as the adapter was trained on it: for a QLoRA adapter (BASE_NOTE says
    nf4) the NF4 weights are dequantized, so the merged model is the model the adapter was trained
    with, never re-quantized. Logits of the adapter model and of the merged model on a sample batch
    are compared and the largest difference is printed and returned.

    Args:
        adapter_folder: a folder written by a LoRA/QLoRA run (final/ or a checkpoint) or by peft.
        base: the base HF folder; default: the one the adapter names (BASE_NOTE, else adapter_config.json).
        dtype: the merged weights' dtype (float32 | bfloat16 | float16); default: the run's model.dtype.
    """
    adapter_folder = Path(adapter_folder)
    model, base, difference = merged_model(adapter_folder, base, dtype, sample_tokens)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if any((adapter_folder / name).is_file() for name in ("tekken.json", "tokenizer.model", "tokenizer.json")):
            # the run's tokenizer, rewritten whole for the chat format it was written for
            write_tokenizer_files(load_tokenizer(adapter_folder), tmp, folder_chat_format(adapter_folder))
    print(f"merged {adapter_folder} into {base} -> {out}; max |logit difference| merged vs adapter "
          f"(fp32, {2 * sample_tokens} tokens): {difference:.2e}")
    return difference


def merged_model(adapter_folder: Path, base: Optional[str] = None, dtype: Optional[str] = None,
                 sample_tokens: int = 64) -> tuple[Mistral, str, float]:
    """(the adapter merged into a full-precision copy of its base, the base folder, the largest logit difference
    merged vs adapter on a sample batch); see merge_adapter_folder."""
    base, note = adapter_base(adapter_folder, base)  # ConfigError when the base is not here
    task = note.get("task", "causal_lm")
    model = Mistral.from_pretrained(base, dtype=torch.float32, quantize=note.get("quantize"), task=task)
    if task == "sequence_classification":  # a reward model: the one-label head the run trained on
        one_label_head(model, note.get("pad_token_id"))
    load_adapter(model, adapter_folder)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (2, sample_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids)
        merge_and_unload(model)
        difference = float((model(ids) - adapted).abs().max())
    # QLoRA: the linears the adapter did not target are still NF4; dequantized (fp32, as loaded) they save as a
    # plain full-precision folder (this also drops `quantization_config`)
    dequantize_model(model)
    model.to(torch_dtype(dtype or note.get("dtype") or "float32"))
    return model, base, difference


def export_folder(folder: Path, out: Path, fmt: str = "hf", base: Optional[str] = None, dtype: Optional[str] = None,
                  tokenizer: Optional[str] = None) -> Path:
    """Write the model of `folder` (an HF or native model folder, or an adapter folder, merged into its base first)
    at `out` as an HF folder (`fmt="hf"`) or in Mistral's native format (`"native"`: params.json,
    consolidated.safetensors and the tokenizer file, model/native.py), with the tokenizer the folder holds
    (an adapter's, else its base's), else `tokenizer` (a file, folder or bundled:vN). The folder appears whole.

    Raises:
        ConfigError: an unknown format, a 4-bit folder (export its adapter instead), a model the native format
            cannot hold, or no tokenizer file mistral-common reads for a native folder.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {EXPORT_FORMATS}")
    folder = Path(folder)
    if is_adapter_folder(folder):
        model, base, _ = merged_model(folder, base, dtype)
        sources = [folder, Path(base)]
    else:
        model = Mistral.from_pretrained(folder, dtype=torch_dtype(dtype) if dtype else None, task=model_task(folder))
        sources = [folder]
        if "quantization_config" in model.config.extra:
            raise ConfigError(f"{folder} holds 4-bit (NF4) weights: export the adapter trained on it (merged into "
                              "a full-precision base) rather than the quantized model")
    source = next((s for s in sources if _has_tokenizer(s)), None)
    spec = str(source) if source is not None else tokenizer
    run_tokenizer = load_tokenizer(resolve_tokenizer_path(spec)) if spec else None
    chat_format = folder_chat_format(source) if source is not None else None
    if fmt == "hf":
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)
            if run_tokenizer is not None:
                write_tokenizer_files(run_tokenizer, tmp, chat_format)
        return out
    if run_tokenizer is None:
        raise ConfigError(f"{folder} holds no tokenizer file: pass --tokenizer FILE (tekken.json, tokenizer.model.vN "
                          "or bundled:v1|v2|v3); vLLM's mistral mode needs one in the native folder")
    try:
        save_native(model, out, run_tokenizer, chat_format)
    except ValueError as err:  # the model or tokenizer has no native form: the message says which part
        raise ConfigError(f"{folder}: {err}") from err
    return out


def _has_tokenizer(folder: Path) -> bool:
    try:
        resolve_tokenizer_path(None, folder)
    except FileNotFoundError:
        return False
    return True


def write_sample(model: Mistral, tokenizer, cfg: RunConfig, path: Path, chat: bool = False) -> str:
    """Greedy continuation of `trainer.sample_prompt`, printed and written to `path`; with `chat`
    (a run on chat rows) the prompt is a user turn in the run's chat template."""
    if not chat:
        prompt = tokenizer.encode(cfg.trainer.sample_prompt, bos=True)
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": cfg.trainer.sample_prompt}],
                                               cfg.data.chat_format, add_generation_prompt=True)
    was_training = model.training
    model.eval()
    ids = generate(model, prompt, cfg.trainer.sample_max_new_tokens, eos_token_id=tokenizer.eos_id)
    model.train(was_training)
    text = tokenizer.decode(ids[0].tolist())
    path.write_text(text + "\n", encoding="utf-8")
    print(f"\nsample> {text}\n")
    return text
