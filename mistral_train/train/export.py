"""What a run leaves besides checkpoints: the final HF folder (weights + tokenizer) and a sample."""

from __future__ import annotations

import shutil
from pathlib import Path

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.config import RunConfig
from mistral_train.generate import generate
from mistral_train.model import Mistral


def copy_tokenizer(tokenizer, source: Path, folder: Path) -> None:
    """Put the tokenizer next to the weights so the folder is usable on its own: its file
    under the name `load_tokenizer` looks for, plus the special-token files of a source folder."""
    name = "tokenizer.model" if tokenizer.kind == "sentencepiece" else "tokenizer.json"
    shutil.copy2(tokenizer.path, folder / name)
    if source.is_dir():
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if (source / extra).is_file():
                shutil.copy2(source / extra, folder / extra)


def export_final(model: Mistral, tokenizer, tokenizer_source_path: Path, folder: Path) -> Path:
    """The final HF folder: weights, config.json and the tokenizer, appearing all at once."""
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(tokenizer, tokenizer_source_path, tmp)
    return folder


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
