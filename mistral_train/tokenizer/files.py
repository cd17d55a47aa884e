"""The tokenizer files of every folder we write (final/, merged/, checkpoints), complete for transformers
and vLLM: `AutoTokenizer.from_pretrained(folder)` encodes text with BOS as we do, and its
`apply_chat_template` gives our `encode_chat` ids for the folder's chat format.

`write_tokenizer_files` is the one writer; every place that puts a tokenizer into a folder calls it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import tokenizers

from mistral_train.tokenizer.chat_templates import CHAT_TEMPLATES, TEMPLATE_LIMITS, TEMPLATE_LIMITS_KEY, chat_template
from mistral_train.jsonfile import read_json_object
from mistral_train.tokenizer.sentencepiece_json import sentencepiece_to_tokenizers
from mistral_train.tokenizer.tekken import Tekken
from mistral_train.tokenizer.tekken_json import tekken_to_tokenizers
from mistral_train.tokenizer.tokenizer import Tokenizer

# our own key in tokenizer_config.json: the chat format the template was written for, so that a folder
# rewritten from this one (merge) keeps it; transformers keeps unknown keys as init kwargs
CHAT_FORMAT_KEY = "mistral_train_chat_format"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _special_tokens(tokenizer: Tokenizer, unk: Optional[str]) -> dict[str, Optional[str]]:
    """bos/eos/unk/pad as token strings (None where the tokenizer has none)."""
    def piece(i: Optional[int]) -> Optional[str]:
        return None if i is None else tokenizer.id_to_piece(i)

    return {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id), "unk_token": unk,
            "pad_token": piece(tokenizer.pad_id)}


def generation_config(tokenizer: Tokenizer) -> dict[str, int]:
    """generation_config.json as transformers writes it from a model config: the special ids it sets."""
    config = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if tokenizer.pad_id is not None:
        config["pad_token_id"] = tokenizer.pad_id
    return config


@functools.lru_cache(maxsize=4)
def _tokenizer_json_of(path: str, kind: str, mtime_ns: int) -> tuple[str, Optional[str]]:
    """(tokenizer.json text, unk token) of a SentencePiece or tekken file, converted once per file version:
    every checkpoint writes it, and the conversion costs 0.3 s (SentencePiece) to 4 s (Tekken) a save."""
    if kind == "tekken":
        hf = tekken_to_tokenizers(Tekken(Path(path)))
        return hf.to_str(pretty=False), None  # ~6 MB: one line; Tekken has no unknown token (byte-level)
    hf = sentencepiece_to_tokenizers(path)
    return hf.to_str(pretty=True), getattr(hf.model, "unk_token", None)


def tokenizer_json(tokenizer: Tokenizer) -> Optional[tuple[str, Optional[str]]]:
    """(tokenizer.json text, unk token) of a SentencePiece or Tekken tokenizer, cached: a run calls it once
    before training so that its first checkpoint write costs what the later ones do. None for a tokenizer
    read from a tokenizer.json, which folders get as it is."""
    if tokenizer.kind not in ("sentencepiece", "tekken"):
        return None
    return _tokenizer_json_of(str(tokenizer.path), tokenizer.kind, os.stat(tokenizer.path).st_mtime_ns)


def write_tokenizer_files(tokenizer: Tokenizer, folder: Union[str, Path], chat_format: Optional[str] = None) -> None:
    """Write tokenizer.model (a SentencePiece tokenizer) or tekken.json (a Tekken one, for mistral-common and
    vLLM's mistral mode), tokenizer.json (equal to it: sentencepiece_json / tekken_json; or the HF tokenizer's
    own), tokenizer_config.json (special tokens, BOS added, the Jinja chat template of `chat_format` and what
    that template cannot express), special_tokens_map.json and generation_config.json.

    Args:
        tokenizer: the run's tokenizer (`load_tokenizer`).
        folder: an existing folder (usually the hidden temp folder of an atomic write).
        chat_format: v1 to v15, or None for the tokenizer's default (`Tokenizer.chat_format`).
    """
    folder = Path(folder)
    fmt = tokenizer.chat_format(chat_format)
    converted = tokenizer_json(tokenizer)
    if converted is not None:
        own = "tekken.json" if tokenizer.kind == "tekken" else "tokenizer.model"
        shutil.copyfile(tokenizer.path, folder / own)  # copyfile: the new file follows the umask
        text, unk = converted
        (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    else:
        shutil.copyfile(tokenizer.path, folder / "tokenizer.json")
        unk = getattr(tokenizers.Tokenizer.from_file(str(tokenizer.path)).model, "unk_token", None)
    special = _special_tokens(tokenizer, unk)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as written (transformers 4 and 5)
        "add_bos_token": True,
        "add_eos_token": False,
        **special,
        "clean_up_tokenization_spaces": False,
        CHAT_FORMAT_KEY: fmt,
    }
    template = chat_template(fmt, tokenizer.settings_builder)
    if template is not None:
        config["chat_template"] = template
        config[TEMPLATE_LIMITS_KEY] = TEMPLATE_LIMITS[fmt]
    else:  # the format's template is not written yet (chat_templates.py): the folder still loads and encodes text
        warnings.warn(f"{folder}: no chat template for chat format {fmt!r} (mistral_train/tokenizer/chat_templates.py has "
                      f"{sorted(CHAT_TEMPLATES)}); transformers' apply_chat_template will refuse this folder",
                      stacklevel=2)
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})
    _write_json(folder / "generation_config.json", generation_config(tokenizer))


def folder_chat_format(folder: Union[str, Path]) -> Optional[str]:
    """The chat format a folder's tokenizer files were written for (None: not written by us)."""
    config = Path(folder) / "tokenizer_config.json"
    if not config.is_file():
        return None
    fmt = read_json_object(config).get(CHAT_FORMAT_KEY)
    if fmt is not None and not isinstance(fmt, str):
        raise ValueError(f"{config}: {CHAT_FORMAT_KEY} must be a chat format name (v1 to v15), got {fmt!r}")
    return fmt


def write_native_tokenizer(tokenizer: Tokenizer, folder: Union[str, Path], chat_format: Optional[str] = None) -> Path:
    """Copy the tokenizer's file into `folder` as mistral-common reads it, encoding chats in `chat_format`
    (default: the tokenizer's own): `tekken.json` (its `config.version` set to the chat format when they
    differ) or `tokenizer.model.<chat format>` (mistral-common takes a SentencePiece file's version from
    that suffix). Returns the written path.

    Raises:
        ValueError: a tokenizer.json-only tokenizer, which mistral-common cannot read.
    """
    fmt = tokenizer.chat_format(chat_format)
    folder = Path(folder)
    if tokenizer.kind == "sentencepiece":
        target = folder / f"tokenizer.model.{fmt}"
        shutil.copyfile(tokenizer.path, target)
        return target
    if tokenizer.kind != "tekken":
        raise ValueError(f"{tokenizer.path}: an HF tokenizer.json has no native form; Mistral's native format "
                         "holds tekken.json or tokenizer.model.vN (pass the model's own tokenizer file)")
    target = folder / "tekken.json"
    data = read_json_object(Path(tokenizer.path))
    if data.get("config", {}).get("version") == fmt:
        shutil.copyfile(tokenizer.path, target)
    else:  # mistral-common encodes chats in the file's version: make it the one the run trained with
        data["config"]["version"] = fmt
        target.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return target
