"""Best-fit-decreasing packing of tokenized examples into rows of at most `max_seq_len` tokens.

A packed row is several documents laid end to end. Three things keep them independent:
- `position_ids` restart at 0 at every document. With `attention_mask=None` the model reads a
  restart as a document boundary and builds a block-diagonal causal mask (combined with the
  sliding window), so no token attends across documents.
- The first label of every document is -100. The model shifts labels (logits[t] predicts
  labels[t + 1]), so the label at a document's first token would be predicted by the last
  token of the document before it.
- Padding (added by `pad_row`) is a document of its own: its positions restart at 0 and its
  labels are -100, so it neither joins the last document nor carries a loss.

When packing happens: once, up front, over the whole example list. Best-fit decreasing sorts
by length first, so packing a freshly shuffled list each epoch would change only how ties are
broken; packing once makes the rows a pure function of (examples, max_seq_len), and an epoch
shuffles the *rows* with `epoch_order(n_rows, seed, epoch)`. Exact resume then needs only
(epoch, index into that order). Data streamed from files larger than memory is packed the same
way one buffer of examples at a time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.wording import counted


class TokenizedExample(Protocol):
    """What packing needs of an example (`data.sft.SFTExample` has it): labels aligned with input_ids."""

    input_ids: Sequence[int]
    labels: Sequence[int]


@dataclass(frozen=True)
class PackedRow:
    """One packed row; all lists have the same length.

    `example_indices` are indices into the list given to `pack_examples`, in row order;
    `num_pad` counts the padding tokens at the end of the row (0 until `pad_row`).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    example_indices: tuple[int, ...]
    num_pad: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def describe_example(example: TokenizedExample, index: int) -> str:
    """Name an example by its source and row when it has them (SFTExample does), else by index."""
    source, row = getattr(example, "source", None), getattr(example, "row", None)
    if source is not None and row is not None:
        return f"{source} row {row} (example {index})"
    return f"example {index}"


def check_example(example: TokenizedExample, index: int, max_seq_len: int) -> int:
    """Length of an example that fits a row; a ValueError naming it when it does not.

    Truncating or dropping over-long examples is the tokenizer stage's job, where it is
    counted and reported; here an over-long example is a bug upstream.
    """
    n = len(example.input_ids)
    if len(example.labels) != n:
        raise ValueError(
            f"{describe_example(example, index)}: {counted(len(example.labels), 'label')} for "
            f"{counted(n, 'input id')}; "
            "expected one label per token"
        )
    if n == 0:
        raise ValueError(f"{describe_example(example, index)}: empty example; expected at least one token")
    if n > max_seq_len:
        raise ValueError(
            f"{describe_example(example, index)}: {n} tokens exceed trainer.max_seq_len={max_seq_len}; "
            "truncate or drop over-long examples first"
        )
    return n


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to bins of `capacity`: longest first, each into the bin it fills most tightly.

    Deterministic: ties in length keep input order, and among bins with equal free space the
    most recently used one is chosen. Cost O(n log n + n * capacity) memory moves at worst,
    because only distinct free-space values (at most capacity + 1) are kept sorted.

    Args:
        lengths: size of each item, each in [1, capacity].
        capacity: size of a bin.
    Returns:
        bins in the order they were opened, each a list of item indices in insertion order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    bins: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct free spaces of open bins
    bins_with_free: dict[int, list[int]] = {}  # free space -> bin ids (a stack)
    for item in order:
        size = lengths[item]
        slot = bisect.bisect_left(free_values, size)
        if slot < len(free_values):
            free = free_values[slot]
            stack = bins_with_free[free]
            bin_id = stack.pop()
            if not stack:
                del bins_with_free[free]
                free_values.pop(slot)
            bins[bin_id].append(item)
        else:
            free, bin_id = capacity, len(bins)
            bins.append([item])
        left = free - size
        if left > 0:  # a full bin can take nothing more: stop tracking it
            if left not in bins_with_free:
                bins_with_free[left] = []
                bisect.insort(free_values, left)
            bins_with_free[left].append(bin_id)
    return bins


def pack_examples(examples: Sequence[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """Pack examples into rows of at most `max_seq_len` tokens (not padded; see `pad_row`).

    Every example appears in exactly one row. Examples must already fit (`check_example`).

    Raises:
        ValueError: naming the example (source and row when known) that is empty, longer than
            max_seq_len, or whose labels do not align with its input_ids.
    """
    if max_seq_len < 1:
        raise ValueError(f"trainer.max_seq_len must be at least 1 to pack examples, got {max_seq_len}")
    lengths = [check_example(example, index, max_seq_len) for index, example in enumerate(examples)]
    rows = []
    for members in best_fit_decreasing(lengths, max_seq_len):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for index in members:
            example = examples[index]
            input_ids.extend(example.input_ids)
            # No label crosses a boundary: the previous document's last token would predict this one.
            labels.append(IGNORE_INDEX)
            labels.extend(example.labels[1:])
            position_ids.extend(range(lengths[index]))
        rows.append(PackedRow(input_ids, labels, position_ids, tuple(members)))
    return rows


def pad_row(row: PackedRow, length: int, pad_id: int) -> PackedRow:
    """Right-pad a row to `length` with a separate pad document (positions 0, 1, ...; labels -100).

    The pad tail restarts its positions so that the model sees a new document instead of a
    continuation of the last real one. `pad_id` may equal EOS: pad tokens are told apart by
    position and `num_pad`, never by their id.
    """
    n_pad = length - len(row)
    if n_pad < 0:
        raise ValueError(f"cannot pad a packed row of {len(row)} tokens down to {length}")
    if n_pad == 0:
        return row
    return PackedRow(
        row.input_ids + [pad_id] * n_pad,
        row.labels + [IGNORE_INDEX] * n_pad,
        row.position_ids + list(range(n_pad)),
        row.example_indices,
        row.num_pad + n_pad,
    )


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits `n_rows` rows: a permutation drawn from seed + epoch.

    A pure function of its arguments, so a resumed run recomputes the same order and
    continues from its saved index.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()


def packing_efficiency(rows: Sequence[PackedRow], max_seq_len: int) -> float:
    """Share of the row capacity filled with real tokens (1.0 means no padding at max_seq_len)."""
    if not rows:
        return 0.0
    real = sum(len(row) - row.num_pad for row in rows)
    return real / (len(rows) * max_seq_len)
