"""Plain-text pretraining data: .txt documents, and documents -> one token stream -> fixed-length rows.

Each document becomes `BOS + tokens + EOS`; the documents are concatenated and cut into rows
of `seq_len` tokens (the tail that does not fill a row is dropped, and the summary line of
data/batches.py shows the counts). Labels equal the inputs: the model shifts them. Reading
files of every type is data/sources.py's job; batching and shuffling is data/batches.py's.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Protocol

import torch

_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class TextTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


def bundled_corpus_path() -> Path:
    """The small English corpus shipped in the package (documents separated by blank lines)."""
    return Path(str(resources.files("mistral_train") / "resources" / "data" / "tiny_corpus.txt"))


def read_txt(path: Path) -> list[str]:
    """Documents of a .txt file: blocks separated by one or more blank lines."""
    text = path.read_text(encoding="utf-8")
    return [doc.strip() for doc in _BLANK_LINE.split(text) if doc.strip()]


def tokenize_documents(docs: Iterable[str], tokenizer: TextTokenizer) -> torch.Tensor:
    """One (N,) int64 stream: BOS + tokens + EOS for each document, concatenated."""
    stream: list[int] = []
    for doc in docs:
        stream.append(tokenizer.bos_id)
        stream.extend(tokenizer.encode(doc, bos=False, eos=False))
        stream.append(tokenizer.eos_id)
    return torch.tensor(stream, dtype=torch.long)


def pack_rows(stream: torch.Tensor, seq_len: int, source: str = "data") -> torch.Tensor:
    """Cut a (N,) stream into (N // seq_len, seq_len) rows, dropping the tail."""
    n_rows = stream.numel() // seq_len
    if n_rows == 0:
        raise ValueError(f"{source}: {stream.numel()} tokens do not fill one row of trainer.max_seq_len={seq_len}")
    return stream[: n_rows * seq_len].view(n_rows, seq_len)
