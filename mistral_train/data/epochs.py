"""What fit() iterates: `EpochBatches` (endless, reshuffled per epoch, exactly resumable) and `TrainData`
(training batches, held-out batches, the audit). Built by data/batches.py (text, chat) and
data/pair_batches.py (preference pairs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar, Union

from mistral_train.data.collate import Batch
from mistral_train.data.packing import epoch_order
from mistral_train.data.stream import StreamBatches

Item = TypeVar("Item")


class EpochBatches(Generic[Item]):
    """Endless iterator of collated batches of `batch_size` items, reshuffled every epoch.

    Args:
        items: what one batch row is made of (packed rows, examples, or (T,) token rows).
        collate: list of `batch_size` items -> batch dict of (batch_size, T) tensors.
        batch_size: items per batch; at most len(items).
        seed: the epoch orders are `epoch_order(len(items), seed, epoch)`.
        tokens: total tokens of the items: saved with the position so that a resume on changed
            data (another file, max_seq_len, template) fails instead of silently going astray.
        source: names the data in errors.
    """

    def __init__(self, items: Sequence[Item], collate: Callable[[list[Item]], Batch], batch_size: int,
                 seed: int, tokens: int, source: str = "data") -> None:
        if len(items) < batch_size:
            raise ValueError(f"{source}: {len(items)} training rows are fewer than trainer.batch_size={batch_size}; "
                             "lower the batch size or add data")
        self.items, self.collate, self.batch_size, self.seed = items, collate, batch_size, seed
        self.tokens, self.source = int(tokens), source
        self.epoch, self.index = 0, 0
        self._order: Optional[list[int]] = None

    @property
    def progress(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.epoch + self.index / len(self.items)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.batch_size

    def __iter__(self) -> "EpochBatches[Item]":
        return self

    def __next__(self) -> Batch:
        if self.index + self.batch_size > len(self.items):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_order(len(self.items), self.seed, self.epoch)
        picked = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return self.collate([self.items[i] for i in picked])

    def state_dict(self) -> dict[str, Any]:
        """The position: the next batch is items `index:index + batch_size` of epoch `epoch`'s order."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_items": len(self.items),
                "tokens": self.tokens, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "n_items", "tokens", "batch_size") if state.get(k) != mine[k]]
        if changed:
            saved = ", ".join(f"{k}={state.get(k)}" for k in changed)
            now = ", ".join(f"{k}={mine[k]}" for k in changed)
            raise ValueError(f"{self.source}: the checkpoint's data position was saved for {saved}, this run has "
                             f"{now}; resume needs the same data, max_seq_len, batch_size and seed")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


@dataclass
class TrainData:
    """Everything fit() needs from the data.

    train: the endless, resumable training batches.
    eval_batches: held-out batches (each a dict of (b, T) tensors), or None without a held-out split.
    stats: tokenization counts of the training split (chat rows, pairs), None for text.
    eval_rows: the held-out canonical chat rows ("answer" where the file gives one), for exact match.
    report: the pre-flight audit (chat rows, pairs).
    summary: lines worth printing before step 1 (counts, packing fill, the audit report).
    """

    train: Union[EpochBatches, StreamBatches]
    eval_batches: Optional[list[Batch]] = None
    stats: Any = None  # SFTStats or PreferenceStats
    eval_rows: Optional[list[dict[str, Any]]] = None
    report: Any = None  # AuditReport or PairAuditReport
    summary: list[str] = field(default_factory=list)
    eval_items: Optional[list] = None  # what eval_batches were collated from (preference pairs)
