"""Unpaired preferences (KTO) as fit()'s batches: canonical rows -> tokenized examples -> batches.

A canonical row (data/formats.py, format `unpaired`) is `{"prompt": [turns], "completion": [answer],
"label": bool, "source", "row"}`. prompt + completion is encoded ONCE, whole, by the chat template, exactly
as a preference pair's sequences are (data/preference.py `tokenize_pair`, which this module calls with the
completion as both answers): the completion is the template's last assistant span and its EOS, and a
sequence too long for max_seq_len is cut or dropped by the same rule (`data.overlong`, `data.max_prompt_len`).

A batch of B examples (`UnpairedCollate`) holds B sequences, prompt + completion with labels on the
completion only, and, for loss_type `kto`, B more: the MISMATCHED sequences KTO's KL estimate reads. They
are built as trl 1.16's KTOTrainer builds them (its `add_kl_completion_ids` rotates the completions of
each batch by one): sequence B + i is prompt i followed by completion i - 1 (prompt 0 by completion
B - 1), token ids laid end to end as trl's collator does, cut to max_seq_len keeping the start (trl's
`max_length` cut). trl rotates within consecutive runs of its sequential sampler; here within each batch
in its (shuffled) order, which is the same thing for the same order. The mismatched sequences are a
batch of their own under keys prefixed `kl_` (as trl keeps `KL_input_ids`...): their log-probs only set
the detached reference point, so the step scores them without a graph. The batch also carries `label`
(B,) bool, True for a desirable completion. Sequences are padded one per row or packed
(`collate_sequences`); `sequence_index` numbers each part's sequences 0..B-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch

from mistral_train.data.collate import Batch
from mistral_train.data.epochs import EpochBatches, TrainData, WARNING, answered_rows, too_few
from mistral_train.data.preference import collate_sequences, tokenize_pair
from mistral_train.data.sft import SFTExample, row_where
from mistral_train.data.sources import RowSource
from mistral_train.data.spec import Batching, DataSpec
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.wording import counted

KL_PREFIX = "kl_"  # the keys of the mismatched sequences' batch inside an unpaired batch


@dataclass
class UnpairedExample:
    """One tokenized unpaired example: the sequence is `prompt_ids + completion_ids`, <= max_seq_len."""

    prompt_ids: list[int]  # BOS + the prompt turns up to where the completion starts
    completion_ids: list[int]  # the completion's tokens + the EOS closing it (no EOS when cut)
    label: bool  # True: desirable
    source: str
    row: int
    truncated: bool = False

    def sequence(self, completion_ids: Optional[Sequence[int]] = None, max_seq_len: Optional[int] = None) -> SFTExample:
        """This prompt followed by `completion_ids` (default: its own completion), labels on the completion
        only, cut to `max_seq_len` tokens from the end (None: no cut)."""
        answer = self.completion_ids if completion_ids is None else list(completion_ids)
        ids = self.prompt_ids + answer
        labels = [IGNORE_INDEX] * len(self.prompt_ids) + answer
        keep = len(ids) if max_seq_len is None else max_seq_len
        return SFTExample(ids[:keep], labels[:keep], self.source, self.row, self.truncated or keep < len(ids))


@dataclass
class UnpairedStats:
    """What `tokenize_unpaired` did, over all sources."""

    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_rows: list[str] = field(default_factory=list)  # the first few, for the warning


def tokenize_unpaired(rows: Iterable[Mapping], tokenizer, max_seq_len: int, max_prompt_len: Optional[int] = None,
                      overlong: str = "truncate", chat_format: Optional[str] = None
                      ) -> tuple[list[UnpairedExample], UnpairedStats]:
    """Tokenize every canonical unpaired row (module docstring); return the kept examples and the counts.
    Raises ValueError naming the source and row for a row that is not a canonical unpaired row."""
    examples, stats = [], UnpairedStats()
    for row in rows:
        source, index, where = row_where(row)
        missing = [key for key in ("prompt", "completion", "label") if key not in row]
        if missing:
            raise ValueError(f"{where}: expected a canonical unpaired row (data.format=unpaired) with 'prompt', "
                             f"'completion' and 'label'; missing {missing}, got fields {sorted(row)}")
        # the completion as both answers of a pair: one encoding rule and one truncation rule for DPO and KTO
        pair = tokenize_pair({"prompt": row["prompt"], "chosen": row["completion"], "rejected": row["completion"],
                              "source": source, "row": index}, tokenizer, max_seq_len, max_prompt_len, overlong,
                             chat_format)
        if pair is None:
            stats.dropped += 1
            if len(stats.dropped_rows) < 5:
                stats.dropped_rows.append(where)
            continue
        example = UnpairedExample(pair.prompt_ids, pair.chosen_ids, bool(row["label"]), source, index, pair.truncated)
        examples.append(example)
        stats.truncated += example.truncated
        stats.desirable += example.label
        stats.undesirable += not example.label
    return examples, stats


@dataclass(frozen=True)
class UnpairedCollate:
    """B examples -> one batch (module docstring): `input_ids`, `labels`, `sequence_index` (and
    `attention_mask` padded; `position_ids`, `pad_mask` packed) of the B sequences; the same keys prefixed
    `kl_` for the B mismatched ones when `mismatched`; `label` (B,) bool. `replace(collate, mismatched=False)`
    leaves the mismatched sequences out (losses without a KL estimate: train/kto_step.py)."""

    pad_id: int
    packing: bool
    max_seq_len: int
    mismatched: bool = True
    pad_to_max: bool = False

    def __call__(self, examples: Sequence[UnpairedExample]) -> Batch:
        if not examples:
            raise ValueError("UnpairedCollate: got no examples; expected at least one")
        batch = self._collate([ex.sequence() for ex in examples])
        if self.mismatched:
            # trl: [completions[-1]] + completions[:-1]. A lone example (a held-out set's last batch) gets its own
            # completion, as trl's rotation of one gives; training batches of 1 are refused (train/kto_step.py)
            rotated = [examples[-1], *examples[:-1]]
            mismatched = self._collate([ex.sequence(other.completion_ids, self.max_seq_len)
                                        for ex, other in zip(examples, rotated)])
            batch.update({f"{KL_PREFIX}{key}": value for key, value in mismatched.items()})
        batch["label"] = torch.tensor([ex.label for ex in examples], dtype=torch.bool)  # (B,)
        return batch


    def _collate(self, sequences: list[SFTExample]) -> Batch:
        return collate_sequences(sequences, self.pad_id, self.packing, self.max_seq_len, self.pad_to_max)


def mismatched_part(batch: Batch) -> Optional[Batch]:
    """The mismatched sequences' own batch (its keys without the `kl_` prefix), or None when it has none."""
    part = {key[len(KL_PREFIX):]: value for key, value in batch.items() if key.startswith(KL_PREFIX)}
    return part or None


def num_examples(batch: Batch) -> int:
    """B, the examples of a collated unpaired batch."""
    return int(batch["label"].numel())


def unpaired_data(spec: DataSpec, b: Batching, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    """Tokenize and batch unpaired preference rows (see the module docstring).

    Raises:
        ValueError: unreadable rows, streaming (rows are read whole), a held-out split with no example left.
    """
    if spec.streaming:
        raise ValueError("data.streaming=true with unpaired preferences: the rows are read whole; set "
                         "data.streaming=false")
    max_len = b.max_seq_len
    examples, stats = tokenize_unpaired(list(train), tokenizer, max_len, spec.max_prompt_len, spec.overlong,
                                        spec.chat_format)
    if not examples:
        raise ValueError(f"{train.name}: no example is left after tokenization ({stats.dropped} dropped as longer "
                         f"than trainer.max_seq_len={max_len}, data.overlong={spec.overlong})")
    collate = UnpairedCollate(b.pad_id, b.packing, max_len)
    tokens = sum(len(ex.prompt_ids) + len(ex.completion_ids) for ex in examples)
    batches = EpochBatches(examples, collate, b.batch_size, b.seed, tokens, train.name, unit="example")
    summary = [train.describe(),
               f"{counted(len(examples), 'example')} ({stats.desirable} desirable, {stats.undesirable} undesirable), "
               f"{b.batch_size} per batch ({'packed' if b.packing else 'padded'}; {batches.per_epoch()})"]
    summary += _warnings(stats, train.name, max_len, spec.overlong)
    short = too_few(train.name, len(examples), b.batch_size, f"{counted(len(examples), 'unpaired example')}",
                    ["add rows"])
    if held is None:
        return TrainData(batches, None, b.eval_size, summary=summary, too_few=short)
    eval_rows = list(held)
    eval_examples, eval_stats = tokenize_unpaired(eval_rows, tokenizer, max_len, spec.max_prompt_len, spec.overlong,
                                                  spec.chat_format)
    if not eval_examples:
        raise ValueError(f"{held.name}: no held-out example is left after tokenization ({eval_stats.dropped} dropped "
                         f"as longer than trainer.max_seq_len={max_len}, data.overlong={spec.overlong})")
    # held-out rows with an "answer" also score exact match of greedy replies to their prompt
    answered = answered_rows(eval_rows, "completion")
    summary.append(f"{held.name}: {counted(len(eval_examples), 'held-out example')}")
    summary += _warnings(eval_stats, held.name, max_len, spec.overlong)
    return TrainData(batches, eval_examples, b.eval_size, None, answered, None, summary, too_few=short)


def _warnings(stats: UnpairedStats, name: str, max_len: int, overlong: str) -> list[str]:
    """The summary's "warning: " lines for examples cut or dropped for length."""
    lines = []
    if stats.truncated:
        lines.append(f"{WARNING}{name}: {counted(stats.truncated, 'example')} cut to trainer.max_seq_len={max_len} "
                     f"(data.overlong={overlong})")
    if stats.dropped:
        lines.append(f"{WARNING}{name}: {counted(stats.dropped, 'example')} dropped as longer than "
                     f"trainer.max_seq_len={max_len} (data.overlong={overlong}), e.g. {', '.join(stats.dropped_rows)}")
    return lines
