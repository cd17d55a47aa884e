"""Plain-text pretraining data: documents -> one token stream -> fixed-length rows -> batches.

Each document becomes `BOS + tokens + EOS`; the documents are concatenated and cut into rows
of `seq_len` tokens (the tail that does not fill a row is dropped). Labels equal the inputs:
the model shifts them. Rows are shuffled per epoch from the seed, and the iterator saves
its position (epoch, index) so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, Sequence, Union

import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
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


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    """Documents of a .jsonl file: the `field` string of each non-empty line."""
    docs = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(
                    f"{path}:{line_no}: expected an object with a {field!r} field, got {line.strip()[:80]!r}"
                )
            if not isinstance(row[field], str):
                raise ValueError(f"{path}:{line_no}: {field!r} must be a string, got {type(row[field]).__name__}")
            docs.append(row[field])
    return docs


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return read_txt(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    raise ValueError(f"{path}: unsupported text data file; expected one of {TEXT_SUFFIXES}")


def read_documents(path: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[str]:
    """Read text documents from the bundled corpus (None), a file, a folder or a list of those.

    A folder contributes its .txt/.jsonl files (recursively, in sorted order).
    """
    if path is None:
        return read_txt(bundled_corpus_path())
    if isinstance(path, (list, tuple)):
        return [doc for item in path for doc in read_documents(item)]
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: folder holds no {'/'.join(TEXT_SUFFIXES)} files")
        return [doc for file in files for doc in _read_file(file)]
    if not path.exists():
        raise FileNotFoundError(f"data.path {str(path)!r} does not exist")
    return _read_file(path)


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a seeded random share of documents for evaluation: (train, eval)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(docs)))
    if n_eval >= len(docs):
        raise ValueError(f"data.eval_fraction={eval_fraction} leaves no training document out of {len(docs)}")
    held = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


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


class TextBatches:
    """Endless iterator of {"input_ids", "labels"} batches of shape (batch_size, seq_len).

    Each epoch visits the rows in a permutation drawn from `seed + epoch`; a last batch
    that would be partial is skipped, so every batch has the same shape.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int = 0, source: str = "data") -> None:
        if rows.shape[0] < batch_size:
            raise ValueError(f"{source}: {rows.shape[0]} rows are fewer than trainer.batch_size={batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order: Optional[torch.Tensor] = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.rows.shape[0], generator=generator)
        return self._order

    def __iter__(self) -> "TextBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index + self.batch_size > self.rows.shape[0]:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        picked = self._permutation()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        input_ids = self.rows[picked]
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_rows": int(self.rows.shape[0])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["n_rows"] != self.rows.shape[0]:
            raise ValueError(
                f"data position was saved for seed={state['seed']}, {state['n_rows']} rows; "
                f"this run has seed={self.seed}, {self.rows.shape[0]} rows (data or trainer.max_seq_len changed?)"
            )
        self.epoch, self.index, self._order = state["epoch"], state["index"], None


def build_text_batches(
    path, tokenizer: TextTokenizer, seq_len: int, batch_size: int, seed: int, eval_fraction: float = 0.0
) -> tuple[TextBatches, Optional[torch.Tensor]]:
    """Read, split, tokenize and pack: (training batches, eval rows (M, seq_len) or None)."""
    source = "bundled corpus" if path is None else f"data.path {path!r}"
    train_docs, eval_docs = split_documents(read_documents(path), eval_fraction, seed)
    train_rows = pack_rows(tokenize_documents(train_docs, tokenizer), seq_len, source)
    eval_rows = pack_rows(tokenize_documents(eval_docs, tokenizer), seq_len, f"{source} (eval)") if eval_docs else None
    return TextBatches(train_rows, batch_size, seed, source), eval_rows
