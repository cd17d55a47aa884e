"""The bundled Mistral tokenizer files (mistral_common/data) as the tests use them: our Tokenizer, raw
SentencePiece (the reference that ids are counted with) and a folder holding `tokenizer.model`."""

from __future__ import annotations

import shutil
from pathlib import Path

import sentencepiece

from mistral_train.tokenizer.tokenizer import Tokenizer, bundled_tokenizer_path, load_tokenizer


def bundled(version: str = "v1") -> Tokenizer:
    """Our tokenizer of the bundled file of `version` (v1: Mistral-7B-v0.1's, v3: the instruct v3 one)."""
    return load_tokenizer(bundled_tokenizer_path(version))


def raw_sentencepiece(version: str = "v1") -> sentencepiece.SentencePieceProcessor:
    """sentencepiece's own processor of the same file: what our ids are checked against."""
    return sentencepiece.SentencePieceProcessor(model_file=str(bundled_tokenizer_path(version)))


def with_tokenizer_model(folder: Path, version: str = "v1") -> Path:
    """Copy the bundled file into `folder` (made if missing) as `tokenizer.model`, as an HF folder holds it
    (transformers' AutoTokenizer reads it too); returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundled_tokenizer_path(version), folder / "tokenizer.model")
    return folder
