"""Batches as tensors: packed rows (documents told apart by position_ids) or padded examples.

Padding is always located by where it was added, never by comparing input_ids with the pad
id: with pad == eos (common for Mistral tokenizers) that comparison would also remove every
EOS label, and the model would never learn to stop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mistral_train.data.packing import PackedRow, TokenizedExample, check_example, pad_row
from mistral_train.losses.ce import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def collate_packed(rows: Sequence[PackedRow], pad_id: int = 0, pad_to: Optional[int] = None) -> Batch:
    """Stack packed rows into a batch, right-padding each to the longest row (or to `pad_to`).

    Any `pad_id` in the vocabulary is correct: the pad tail is its own document with no labels.
    There is deliberately no `attention_mask`: given one, the model would stop reading
    document boundaries from `position_ids`.

    Returns:
        input_ids, labels, position_ids: (B, T) int64;
        pad_mask: (B, T) bool, True on padding (for `padding_share`; the model ignores it).
    """
    if not rows:
        raise ValueError("collate_packed: got no rows; expected at least one packed row")
    longest = max(len(row) for row in rows)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"collate_packed: a row of {longest} tokens does not fit pad_to={pad_to}")
    padded = [pad_row(row, length, pad_id) for row in rows]
    pad_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(padded):
        if row.num_pad:
            pad_mask[i, length - row.num_pad :] = True
    return {
        "input_ids": torch.tensor([row.input_ids for row in padded], dtype=torch.long),
        "labels": torch.tensor([row.labels for row in padded], dtype=torch.long),
        "position_ids": torch.tensor([row.position_ids for row in padded], dtype=torch.long),
        "pad_mask": pad_mask,
    }


def collate_padded(
    examples: Sequence[TokenizedExample], pad_id: int, max_seq_len: int, pad_to_max: bool = False
) -> Batch:
    """One example per row, right-padded to the longest example (or to `max_seq_len`).

    Returns:
        input_ids, labels: (B, T) int64, labels -100 on padding;
        attention_mask: (B, T) int64, 1 on real tokens, 0 on padding.
    Raises:
        ValueError: naming an example longer than max_seq_len or with misaligned labels.
    """
    if not examples:
        raise ValueError("collate_padded: got no examples; expected at least one")
    for index, example in enumerate(examples):
        check_example(example, index, max_seq_len)
    length = max_seq_len if pad_to_max else max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(list(example.input_ids), dtype=torch.long)
        labels[i, :n] = torch.tensor(list(example.labels), dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def padding_share(batch: Batch) -> float:
    """Share of the batch's token slots that are padding (0.0 when there is none).

    Reads `attention_mask` (padded batches) or `pad_mask` (packed batches).
    """
    if "attention_mask" in batch:
        pad = batch["attention_mask"] == 0
    elif "pad_mask" in batch:
        pad = batch["pad_mask"]
    else:
        raise ValueError(f"padding_share: batch has keys {sorted(batch)}; expected 'attention_mask' or 'pad_mask'")
    return float(pad.sum()) / pad.numel() if pad.numel() else 0.0
