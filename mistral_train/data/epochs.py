"""What fit() iterates: `EpochBatches` (endless, reshuffled per epoch, exactly resumable) and `TrainData`
(training batches, held-out items and their batches, the audit). Built by data/batches.py (text, chat) and
data/pair_batches.py (preference pairs).

No item is ever skipped: when an epoch's items do not fill its last batch, the next epoch's first
items complete it (as streaming carries its rest into the next buffer, data/stream.py), so every batch
holds `batch_size` items and every item is seen once per epoch. Short last batches would be as correct
for the loss (the loop normalises by label tokens, not rows), but full batches keep one shape per step
for compiled blocks and per-process memory, and one position (epoch, index) still resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, Sequence, TypeVar, Union

from mistral_train.errors import ConfigError
from mistral_train.data.collate import Batch
from mistral_train.data.packing import epoch_order
from mistral_train.data.stream import StreamBatches
from mistral_train.wording import counted

Item = TypeVar("Item")


class SmallDataError(ConfigError):
    """The training data does not fill one batch; the message counts what the user gave (rows, examples,
    pairs, documents), says what tokenization and packing made of them and which setting to change."""


class EpochBatches(Generic[Item]):
    """Endless iterator of collated batches of `batch_size` items, reshuffled every epoch.

    Args:
        items: what one batch row is made of (packed rows, examples, or (T,) token rows).
        collate: list of `batch_size` items -> batch dict of (batch_size, T) tensors.
        batch_size: items per batch. An epoch that does not fill its last batch has it completed
            from the next epoch's order (module docstring); with fewer items than a batch, a batch
            spans several epochs (data/batches.py refuses that case before training).
        seed: the epoch orders are `epoch_order(len(items), seed, epoch)`.
        tokens: total tokens of the items: saved with the position so that a resume on changed
            data (another file, max_seq_len, template) fails instead of silently going astray.
        source: names the data in errors.
        unit: what an item is, for messages ("row", "example", "pair").
    """

    def __init__(self, items: Sequence[Item], collate: Callable[[list[Item]], Batch], batch_size: int,
                 seed: int, tokens: int, source: str = "data", unit: str = "row") -> None:
        if len(items) == 0 or batch_size < 1:
            raise ValueError(f"{source}: {counted(len(items), unit)} and trainer.batch_size={batch_size}; "
                             "expected at least one item and a batch size of at least 1")
        self.items, self.collate, self.batch_size, self.seed = items, collate, batch_size, seed
        self.tokens, self.source, self.unit = int(tokens), source, unit
        self.epoch, self.index = 0, 0  # index: items of epoch `epoch`'s order already served (len(items): all)
        self._order: Optional[list[int]] = None

    @property
    def progress(self) -> float:
        """Epochs done: items served / items per epoch (exactly 1.0 once the first epoch's last item is served)."""
        return self.epoch + self.index / len(self.items)

    @property
    def batches_per_epoch(self) -> float:
        return len(self.items) / self.batch_size

    def per_epoch(self) -> str:
        """'5 batches per epoch', or how an epoch's last partial batch is completed."""
        whole, rest = divmod(len(self.items), self.batch_size)
        if rest == 0:
            return f"{counted(whole, 'batch')} per epoch"
        if whole == 0:
            return f"{counted(rest, self.unit)} per epoch, fewer than one batch of {self.batch_size}"
        share = f"{len(self.items) / self.batch_size:.2f}".rstrip("0")
        return (f"{share} batches per epoch: the last {counted(rest, self.unit)} of an epoch "
                f"{'goes' if rest == 1 else 'go'} into a batch completed from the next epoch")

    def __iter__(self) -> "EpochBatches[Item]":
        return self

    def __next__(self) -> Batch:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if self.index == len(self.items):  # this epoch is served: the next one's order goes on
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
            if self._order is None:
                self._order = epoch_order(len(self.items), self.seed, self.epoch)
            taken = self._order[self.index : self.index + self.batch_size - len(picked)]
            picked += taken
            self.index += len(taken)
        return self.collate([self.items[i] for i in picked])

    def state_dict(self) -> dict[str, Any]:
        """The position: the next batch starts at item `index` of epoch `epoch`'s order."""
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


def too_few(name: str, n_items: int, batch_size: int, what: str, fixes: Sequence[str]) -> Optional[str]:
    """The small-data message when `n_items` do not fill a batch, else None.

    what: the user's data in their units and what became of it, e.g. "40 examples were packed into 5 rows".
    fixes: settings to change besides lowering trainer.batch_size (which always comes first)."""
    if n_items >= batch_size:
        return None
    options = [f"lower trainer.batch_size to {n_items}", *fixes]
    either = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
    return f"{name}: {what}, fewer than trainer.batch_size={batch_size}; {either}"


@dataclass
class TrainData:
    """Everything fit() needs from the data.

    train: the endless, resumable training batches; their `collate` also makes the held-out batches.
    eval_items: the held-out items (token rows, examples or packed rows, pairs), or None without a held-out
        split; `eval_batches` are they collated `eval_size` at a time, as training collates.
    stats: tokenization counts of the training split (chat rows, pairs), None for text.
    eval_rows: the held-out canonical chat rows ("answer" where the file gives one), for exact match.
    report: the pre-flight audit (chat rows, pairs).
    summary: lines worth printing before step 1 (counts, packing fill, the audit report, and last the
        "warning: " lines: examples dropped or cut for length, with the setting that did it).
    too_few: the small-data message when the training items do not fill one batch (`check_batch_size`).
    prompt_rows: prompts (grpo, rloo): the canonical training rows, indexed by each batch's "row_index", so
        reward functions read a prompt's other fields (data/prompt_batches.py).
    """

    train: Union[EpochBatches, StreamBatches]
    eval_items: Optional[list] = None
    eval_size: int = 1
    stats: Any = None  # SFTStats or PreferenceStats
    eval_rows: Optional[list[dict[str, Any]]] = None
    report: Any = None  # AuditReport or PairAuditReport
    summary: list[str] = field(default_factory=list)
    too_few: Optional[str] = None
    files: dict[str, dict] = field(default_factory=dict)  # the training files' identity (data/fingerprint.py)
    prompt_rows: Optional[list[dict[str, Any]]] = None  # prompts: the canonical rows a batch's row_index points at
    eval_batches: Optional[list[Batch]] = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.swap_collate(self.train.collate)  # held-out batches now: a row that cannot be collated stops step 0

    def swap_collate(self, collate: Callable[[list], Batch]) -> None:
        """Collate training and held-out batches with `collate` from now on (e.g. one that adds precomputed
        reference log-probs: train/reference_cache.py)."""
        self.train.collate, items, size = collate, self.eval_items, self.eval_size
        if items is not None:
            self.eval_batches = [collate(items[i : i + size]) for i in range(0, len(items), size)]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.summary if line.startswith(WARNING)]

    def check_batch_size(self) -> None:
        """Raise SmallDataError when the training data does not fill one batch. Called after the summary is
        shown (build_batches by default, the audit and fit() after printing it), so the user sees why."""
        if self.too_few is not None:
            raise SmallDataError(self.too_few)


def answered_rows(rows: Sequence[dict[str, Any]], reply: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
    """The held-out rows that carry an "answer", as the chat rows exact match scores (TrainData.eval_rows): the
    prompt turns (+ the `reply` turn, e.g. a pair's chosen answer, when given) as "messages", with the answer,
    tools, source and row; None when no row carries an answer."""
    return [{"messages": r["prompt"] + (r[reply] if reply else []), "answer": r["answer"], "source": r["source"],
             "row": r["row"], **({"tools": r["tools"]} if "tools" in r else {})}
            for r in rows if "answer" in r] or None


WARNING = "warning: "  # the prefix of summary lines that report lost or cut data
