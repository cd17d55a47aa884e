"""What a run leaves besides checkpoints: the final folder (HF model or PEFT adapter, with the tokenizer), an
adapter merged into its base, and a sample."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.config import RunConfig
from mistral_train.generate import generate
from mistral_train.adapters import load_adapter, merge_and_unload
from mistral_train.folders import adapter_base
from mistral_train.model import Mistral
from mistral_train.tokenizer.tokenizer import load_tokenizer
from mistral_train.tokenizer.files import folder_chat_format, write_tokenizer_files
from mistral_train.train.model_setup import one_label_head, torch_dtype


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
    model.config.extra.pop("quantization_config", None)  # a plain full-precision model now
    model.to(torch_dtype(dtype or note.get("dtype") or "float32"))
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if any((adapter_folder / name).is_file() for name in ("tekken.json", "tokenizer.model", "tokenizer.json")):
            # the run's tokenizer, rewritten whole for the chat format it was written for
            write_tokenizer_files(load_tokenizer(adapter_folder), tmp, folder_chat_format(adapter_folder))
    print(f"merged {adapter_folder} into {base} -> {out}; max |logit difference| merged vs adapter "
          f"(fp32, {ids.numel()} tokens): {difference:.2e}")
    return difference


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
