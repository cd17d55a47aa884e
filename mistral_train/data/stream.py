"""Training batches from files larger than memory: `data.streaming=true`.

The rows are read lazily (data/sources.py streams them) one buffer of `data.stream_buffer` rows
at a time. Each buffer is tokenized, packed (or kept one example per row) and shuffled by itself,
then served as batches of `batch_size` items; the items that do not fill a last batch are carried
into the next buffer, and at the end of the file into the next epoch, so no example is ever lost.

Text rows are documents: BOS + text + EOS, cut into pieces of `max_seq_len` tokens when longer,
each piece an example with every token but its first trained. Packed, the pieces of different
documents never attend to each other (the same masks as SFT packing), unlike the in-memory text
path that lays documents end to end; chat rows are tokenized exactly as in memory (data/sft.py).

Exact resume: the position is (epoch, rows read before the current buffer, batches already served
from it, the examples carried into it). A resumed run skips the rows already read without
tokenizing them, rebuilds the same buffer, and serves the batch that comes next.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterator, Optional

from mistral_train.data.packing import epoch_order, pack_examples
from mistral_train.data.sft import SFTExample
from mistral_train.data.sources import RowSource
from mistral_train.losses.ce import IGNORE_INDEX

Tokenize = Callable[[dict[str, Any]], list[SFTExample]]


def text_pieces(row: dict[str, Any], tokenizer, max_seq_len: int) -> list[SFTExample]:
    """A text row as examples of at most `max_seq_len` tokens: BOS + text + EOS, cut in pieces.

    A piece's first token has no label: nothing before it in the row predicts it."""
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{row['source']} row {row['row']}: 'text' must be a non-empty string, got {text!r}")
    ids = tokenizer.encode(text, bos=True, eos=True)
    pieces = [ids[i : i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
    return [SFTExample(p, [IGNORE_INDEX] + p[1:], str(row["source"]), int(row["row"]), len(pieces) > 1)
            for p in pieces if len(p) > 1]  # a lone last token has nothing to train


class StreamBatches:
    """Endless, resumable batches from a streamed RowSource (see the module docstring).

    Args:
        rows: a streaming RowSource (iterating it starts a fresh lazy pass).
        tokenize: canonical row -> its examples (none when the row is dropped).
        collate: `batch_size` items (packed rows, or examples) -> batch of tensors.
        packing: pack each buffer's examples into rows of `max_seq_len`.
        buffer_rows: rows read, tokenized and shuffled together.
    """

    def __init__(self, rows: RowSource, tokenize: Tokenize, collate: Callable[[list], dict], batch_size: int,
                 seed: int, max_seq_len: int, packing: bool, buffer_rows: int) -> None:
        if buffer_rows < 1:
            raise ValueError(f"data.stream_buffer must be at least 1 row, got {buffer_rows}")
        self.rows, self.tokenize, self.collate = rows, tokenize, collate
        self.batch_size, self.seed, self.max_seq_len = batch_size, seed, max_seq_len
        self.packing, self.buffer_rows, self.source = packing, buffer_rows, rows.name
        self.epoch, self.rows_read, self.served = 0, 0, 0
        self.carry: list[SFTExample] = []  # examples carried into the current buffer
        self.rows_per_epoch: Optional[int] = None  # known once an epoch has been read
        self._stream: Optional[Iterator[dict]] = None
        self._items: Optional[list] = None  # the current buffer's items, in serving order
        self._next_carry: list[SFTExample] = []
        self._buffer_len = 0

    def __iter__(self) -> "StreamBatches":
        return self

    def __next__(self) -> dict:
        while self._items is None or (self.served + 1) * self.batch_size > len(self._items):
            self._next_buffer()
        picked = self._items[self.served * self.batch_size : (self.served + 1) * self.batch_size]
        self.served += 1
        return self.collate(picked)

    @property
    def progress(self) -> float:
        """Epochs done, with the fraction of the current one once an epoch's length is known."""
        return self.epoch + (self.rows_read / self.rows_per_epoch if self.rows_per_epoch else 0.0)

    def _next_buffer(self) -> None:
        """Move to the next buffer: carry over what the current one did not serve, read on."""
        if self._items is not None:
            self.rows_read += self._buffer_len
            self.carry, self.served = self._next_carry, 0
        self._load_buffer()

    def _load_buffer(self) -> None:
        """Read and build the buffer starting `rows_read` rows into epoch `epoch` (from a fresh pass
        when the stream is not already there)."""
        if self._stream is None:
            self._stream = islice(iter(self.rows), self.rows_read, None)
        rows = list(islice(self._stream, self.buffer_rows))
        if not rows:  # the end of the file: the carried examples start the next epoch
            if self.rows_read == 0:
                raise ValueError(f"{self.source}: no rows to train on")
            self.rows_per_epoch, self.epoch, self.rows_read, self._stream = self.rows_read, self.epoch + 1, 0, None
            return self._load_buffer()
        self._buffer_len = len(rows)
        examples = list(self.carry)
        for row in rows:
            examples += self.tokenize(row)
        items = pack_examples(examples, self.max_seq_len) if self.packing else examples
        order = epoch_order(len(items), self.seed + 1000003 * (self.rows_read + 1), self.epoch)
        self._items = [items[i] for i in order]
        usable = len(items) // self.batch_size * self.batch_size
        left = self._items[usable:]
        self._next_carry = [examples[i] for row in left for i in row.example_indices] if self.packing else left

    def state_dict(self) -> dict[str, Any]:
        return {"streaming": True, "epoch": self.epoch, "rows_read": self.rows_read, "served": self.served,
                "seed": self.seed, "batch_size": self.batch_size, "buffer_rows": self.buffer_rows,
                "carry": [_example_state(ex) for ex in self.carry]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("streaming", "seed", "batch_size", "buffer_rows") if state.get(k) != mine[k]]
        if changed:
            raise ValueError(f"{self.source}: the checkpoint's data position was saved for "
                             f"{', '.join(f'{k}={state.get(k)}' for k in changed)}, this run has "
                             f"{', '.join(f'{k}={mine[k]}' for k in changed)}; resume needs the same data settings")
        self.epoch, self.rows_read, self.served = int(state["epoch"]), int(state["rows_read"]), int(state["served"])
        self.carry = [SFTExample(**ex) for ex in state["carry"]]
        self._stream, self._items = None, None
        self._load_buffer()


def _example_state(ex: SFTExample) -> dict[str, Any]:
    return {"input_ids": list(ex.input_ids), "labels": list(ex.labels), "source": ex.source, "row": ex.row,
            "truncated": ex.truncated}
