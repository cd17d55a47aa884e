"""Packing and collation: every example once, no row too long, documents kept apart, padding told
apart by place (never by id), and the same rows and epoch orders on every run."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from mistral_train.data.collate import collate_packed, collate_padded, padding_share
from mistral_train.data.packing import (
    best_fit_decreasing,
    epoch_order,
    pack_examples,
    packing_efficiency,
    pad_row,
)
from mistral_train.model.attention import documents_from_positions

EOS = 2


@dataclass
class Example:
    """The shape of data.sft.SFTExample that packing relies on."""

    input_ids: list[int]
    labels: list[int]
    source: Optional[str] = None
    row: Optional[int] = None


def make_examples(n: int, max_len: int, seed: int = 0) -> list[Example]:
    """Chat-like examples: a prompt without labels, then a labelled answer ending in EOS."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [rng.randint(3, 99) for _ in range(length - 1)] + [EOS]
        prompt = rng.randint(0, length - 1)
        examples.append(Example(ids, [-100] * prompt + ids[prompt:], source="chat.jsonl", row=i + 1))
    return examples


def test_rows_fit_and_hold_every_example_exactly_once():
    examples = make_examples(200, 40, seed=1)
    rows = pack_examples(examples, max_seq_len=64)
    assert all(len(row) <= 64 for row in rows)
    placed = sorted(i for row in rows for i in row.example_indices)
    assert placed == list(range(len(examples)))
    for row in rows:  # a row is its examples' tokens laid end to end
        assert row.input_ids == [t for i in row.example_indices for t in examples[i].input_ids]
    # best fit leaves little room: far fewer rows than one per example
    assert len(rows) < len(examples) / 2
    assert packing_efficiency(rows, 64) == sum(len(e.input_ids) for e in examples) / (64 * len(rows))


def test_positions_restart_and_first_label_of_each_document_is_masked():
    examples = make_examples(60, 30, seed=2)
    for row in pack_examples(examples, max_seq_len=48):
        start = 0
        for i in row.example_indices:
            ex, n = examples[i], len(examples[i].input_ids)
            assert row.position_ids[start : start + n] == list(range(n))
            assert row.labels[start] == -100
            assert row.labels[start + 1 : start + n] == ex.labels[1:]  # EOS labels survive
            start += n
        assert start == len(row)


def test_model_sees_each_document_and_the_pad_tail_as_separate_documents():
    examples = make_examples(30, 20, seed=3)
    rows = pack_examples(examples, max_seq_len=32)
    batch = collate_packed(rows, pad_id=EOS, pad_to=40)  # pad == eos on purpose
    documents = documents_from_positions(batch["position_ids"])
    assert documents is not None
    for b, row in enumerate(rows):
        lengths = [len(examples[i].input_ids) for i in row.example_indices] + [40 - len(row)]
        expected = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        # same partition as the examples plus one pad document (ids are per-row offsets of it)
        assert torch.equal(documents[b] - documents[b, 0], expected)
        tail = slice(len(row), 40)
        assert batch["position_ids"][b, tail].tolist() == list(range(40 - len(row)))
        assert (batch["labels"][b, tail] == -100).all()
        assert batch["pad_mask"][b].tolist() == [False] * len(row) + [True] * (40 - len(row))
    # EOS inside documents keeps its label although pad == eos
    real = ~batch["pad_mask"]
    assert ((batch["input_ids"] == EOS) & real & (batch["labels"] == EOS)).any()


def test_pad_row_keeps_a_full_row_and_refuses_to_shrink():
    row = pack_examples([Example([5, 6, 7], [5, 6, 7])], max_seq_len=3)[0]
    assert pad_row(row, 3, 0) is row
    padded = pad_row(row, 5, 0)
    assert padded.position_ids == [0, 1, 2, 0, 1] and padded.labels == [-100, 6, 7, -100, -100]
    assert padded.num_pad == 2
    with pytest.raises(ValueError, match="cannot pad a packed row of 5 tokens down to 4"):
        pad_row(padded, 4, 0)


def test_best_fit_puts_each_item_in_the_tightest_bin_that_fits():
    rng = random.Random(4)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 50)
    where = {item: b for b, items in enumerate(bins) for item in items}
    assert sorted(where) == list(range(len(lengths)))
    # Replay in decreasing order: each item went to an open bin with the least free space that
    # fits, or opened a new bin only when no open bin could take it.
    free: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size, b = lengths[item], where[item]
        fitting = [f for f in free if f >= size]
        if b == len(free):
            assert not fitting, f"item {item} opened bin {b} although a bin with {min(fitting)} free fits it"
            free.append(50 - size)
        else:
            assert fitting and free[b] == min(fitting), f"item {item} of {size} went to a bin with {free[b]} free"
            free[b] -= size
    assert min(free) >= 0


def test_best_fit_small_case():
    # 6 opens A (4 free), 5 opens B (5 free), 4 fills A exactly, 3 then 2 fill B
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]


def test_packing_and_epoch_orders_are_deterministic():
    examples = make_examples(100, 30, seed=5)
    assert pack_examples(examples, 32) == pack_examples(examples, 32)
    order = epoch_order(50, seed=7, epoch=3)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=7, epoch=3)
    assert order != epoch_order(50, seed=7, epoch=4)
    assert order != epoch_order(50, seed=8, epoch=3)


@pytest.mark.parametrize(
    "example, message",
    [
        (Example([1] * 9, [1] * 9, "a.jsonl", 4), r"a.jsonl row 4 \(example 0\): 9 tokens exceed .*max_seq_len=8"),
        (Example([1, 2], [1], "b.jsonl", 7), r"b.jsonl row 7 \(example 0\): 1 label for 2 input ids"),
        (Example([], []), r"example 0: empty example"),
    ],
)
def test_bad_examples_are_named(example, message):
    with pytest.raises(ValueError, match=message):
        pack_examples([example], max_seq_len=8)
    with pytest.raises(ValueError, match=message.split(":")[0]):
        collate_padded([example], pad_id=0, max_seq_len=8)


def test_collate_padded_masks_padding_by_place_not_by_id():
    examples = [Example([1, 5, 6, EOS], [-100, -100, 6, EOS]), Example([1, 7, EOS], [-100, 7, EOS])]
    batch = collate_padded(examples, pad_id=EOS, max_seq_len=8)
    assert batch["input_ids"].tolist() == [[1, 5, 6, EOS], [1, 7, EOS, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, 6, EOS], [-100, 7, EOS, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert padding_share(batch) == 1 / 8
    fixed = collate_padded(examples, pad_id=0, max_seq_len=8, pad_to_max=True)
    assert fixed["input_ids"].shape == (2, 8) and padding_share(fixed) == 9 / 16


def test_padding_share_of_packed_batches():
    rows = pack_examples([Example([3] * 5, [3] * 5), Example([4] * 2, [4] * 2), Example([5] * 6, [5] * 6)], 8)
    assert [len(row) for row in rows] == [8, 5]  # 6 + 2 fill a row; 5 stays alone
    batch = collate_packed(rows, pad_to=10)
    assert padding_share(batch) == 7 / 20
    assert padding_share(collate_packed(rows)) == 3 / 16  # padded to the longest row only
    with pytest.raises(ValueError, match="expected 'attention_mask' or 'pad_mask'"):
        padding_share({"input_ids": batch["input_ids"]})
