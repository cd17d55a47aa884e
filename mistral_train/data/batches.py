"""The batches fit() trains and evaluates on: `build_batches(spec, batching, tokenizer, train, held) -> TrainData`.

Text rows (pretraining): each document becomes BOS + tokens + EOS, the documents are laid end to
end and cut into rows of `max_seq_len` (data/text.py); labels equal the inputs.

Chat rows (SFT): sources.load_splits -> sft.tokenize_rows (one pass of the chat template per row,
labels from its turn boundaries) -> audit.audit with the collator training uses (an AuditError
stops the run before step 1) -> with `data.packing`, best-fit packing once into rows of at most
`max_seq_len` (position_ids restart per document; no attention_mask) and `collate_packed`;
without, one example per row and `collate_padded` (right padding, attention_mask).

Either way the training iterator visits its items (rows or examples) in a fresh permutation per
epoch, `packing.epoch_order(n, seed, epoch)`, `batch_size` items per batch; an epoch's last partial
batch is completed from the next epoch (data/epochs.py), so no item is skipped and every batch has
`batch_size` rows. Its position is (epoch, index): a resumed run rebuilds the same items and order
and continues mid-epoch.

Data that does not fill one batch is refused (`TrainData.check_batch_size`, after the summary is
shown), counting what the user gave (documents, examples, pairs), what packing made of them and the
setting to change. Examples dropped or cut for length end the summary as "warning: " lines.

Rows are padded to the longest row of their batch, never by comparing ids with the pad id (pad
may equal EOS), so a batch's `padding_share` (collate.padding_share) is the honest share of
wasted token slots; the loop logs its average.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Optional

import torch

from mistral_train.data.audit import AuditReport, audit, format_report, length_warnings
from mistral_train.data.collate import Batch, collate_packed, collate_padded
from mistral_train.data.epochs import EpochBatches, TrainData, too_few
from mistral_train.data.formats import PAIRS, PROMPTS, TEXT, UNPAIRED
from mistral_train.data.pair_batches import pair_data
from mistral_train.data.prompt_batches import prompt_data
from mistral_train.data.packing import pack_examples, packing_efficiency
from mistral_train.data.sft import SFTExample, SFTStats, tokenize_conversation, tokenize_rows
from mistral_train.data.sources import RowSource
from mistral_train.data.spec import Batching, DataSpec
from mistral_train.data.stream import StreamBatches, text_pieces
from mistral_train.data.text import pack_rows, tokenize_documents
from mistral_train.data.unpaired import unpaired_data
from mistral_train.wording import counted


def build_batches(spec: DataSpec, batching: Batching, tokenizer, train: RowSource, held: Optional[RowSource],
                  check: bool = True) -> TrainData:
    """Tokenize, audit and batch the rows of `train` and `held` (`sources.load_splits(spec)`; see the module
    docstring), dispatching on their kind.

    check: refuse data that does not fill one batch here; False leaves it to the caller, who shows
        the summary first and then calls `TrainData.check_batch_size()`.
    Raises:
        AuditError: the chat data fails the pre-flight audit (names the source and row).
        SmallDataError: (with `check`) the training data does not fill one batch.
        ValueError: unreadable or empty data.
    """
    if train.kind == PAIRS:
        data = pair_data(spec, batching, tokenizer, train, held)
    elif train.kind == PROMPTS:  # grpo, rloo: prompts to generate from (data/prompt_batches.py)
        data = prompt_data(spec, batching, tokenizer, train, held)
    elif train.kind == UNPAIRED:  # kto: single completions labelled desirable or not (data/unpaired.py)
        data = unpaired_data(spec, batching, tokenizer, train, held)
    elif spec.streaming:
        data = _stream_data(spec, batching, tokenizer, train, held)
    elif train.kind == TEXT:
        data = _text_data(batching, tokenizer, train, held)
    else:
        data = _chat_data(spec, batching, tokenizer, train, held)
    if check:
        data.check_batch_size()
    return data


def _audited(spec: DataSpec, b: Batching, tokenizer, rows: list[dict],
             name: str) -> tuple[list[SFTExample], SFTStats, AuditReport, list[str]]:
    """(examples, stats, report, warnings) of chat `rows`: tokenized and audited with the collator training uses,
    padded to max_seq_len, so that padding follows a single example as in a batch of longer rows (where a pad id
    equal to EOS would swallow the EOS label)."""
    examples, stats = tokenize_rows(rows, tokenizer, b.max_seq_len, spec.train_on, spec.overlong, spec.chat_format)
    if b.packing:
        collate = lambda exs: collate_packed(pack_examples(exs, b.max_seq_len), b.pad_id, pad_to=b.max_seq_len)  # noqa: E731
    else:
        collate = lambda exs: collate_padded(exs, b.pad_id, b.max_seq_len, pad_to_max=True)  # noqa: E731
    report = audit(examples, stats, tokenizer, pad_id=b.pad_id, rows=rows, collate=collate)
    return examples, stats, report, length_warnings(stats, name)


def _text_data(b: Batching, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    seq_len, name = b.max_seq_len, train.name
    rows = pack_rows(tokenize_documents((r["text"] for r in train), tokenizer), seq_len, name)
    batches = EpochBatches(rows, _stack_text_rows, b.batch_size, b.seed, rows.numel(), name)
    made = f"{counted(len(train), 'document')} -> {counted(rows.shape[0], 'row')} of {seq_len} tokens"
    summary = [f"{name}: {made} ({batches.per_epoch()})"]
    short = too_few(name, rows.shape[0], b.batch_size, f"{made} (trainer.max_seq_len)",
                    ["lower trainer.max_seq_len (more, shorter rows)", "add text"])
    eval_items = None
    if held is not None:
        eval_items = list(pack_rows(tokenize_documents((r["text"] for r in held), tokenizer), seq_len, held.name))
        summary.append(f"{held.name}: {counted(len(held), 'document')} -> "
                       f"{counted(len(eval_items), 'held-out row')}")
    return TrainData(batches, eval_items, b.eval_size, summary=summary, too_few=short)


def _stack_text_rows(rows: list[torch.Tensor]) -> Batch:
    input_ids = torch.stack(rows)  # (B, T)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _chat_data(spec: DataSpec, b: Batching, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    max_len, batch_size = b.max_seq_len, b.batch_size
    examples, stats, report, warnings = _audited(spec, b, tokenizer, list(train), train.name)
    summary = [train.describe(), format_report(report)]
    tokens = sum(len(ex.input_ids) for ex in examples)
    dropped = stats.total().dropped  # said after the limit that dropped them
    limit = "(trainer.max_seq_len" + (f"; {counted(dropped, 'more row')} dropped for length)" if dropped else ")")
    items = pack_examples(examples, max_len) if b.packing else examples
    batches = EpochBatches(items, _item_collator(b), batch_size, b.seed, tokens, train.name,
                           unit="row" if b.packing else "example")
    if b.packing:
        made = (f"packed {counted(len(examples), 'example')} into {counted(len(items), 'row')} of at most "
                f"{max_len} tokens")
        summary.append(f"{made} ({packing_efficiency(items, max_len):.1%} full; {batches.per_epoch()})")
        unpacked = ([f"set data.packing=false (one example per row: {counted(len(examples), 'row')})"]
                    if len(examples) >= batch_size else [])
        short = too_few(train.name, len(items), batch_size, f"{made} {limit}", [*unpacked, "add data"])
    else:
        summary.append(f"{counted(len(examples), 'example')}, one per row, padded per batch ({batches.per_epoch()})")
        short = too_few(train.name, len(examples), batch_size,
                        f"{counted(len(examples), 'example')} of at most {max_len} tokens {limit}, one per row",
                        ["add data"])
    eval_items = eval_rows = None
    if held is not None:
        eval_rows = list(held)
        eval_examples, eval_stats = tokenize_rows(eval_rows, tokenizer, max_len, spec.train_on, spec.overlong,
                                                  spec.chat_format)
        total = eval_stats.total()
        summary.append(f"{held.name}: {counted(total.examples, 'held-out example')}, "
                       f"{counted(total.label_tokens, 'label token')} ({total.truncated} truncated, "
                       f"{total.dropped} dropped)")
        warnings += length_warnings(eval_stats, held.name)
        eval_items = _eval_items(spec, b, eval_examples, held.name)
    return TrainData(batches, eval_items, b.eval_size, stats, eval_rows, report, summary + warnings, too_few=short)


def _item_collator(b: Batching) -> Callable[[list], Batch]:
    """The collator of a batch's items: packed rows, or examples padded to the longest."""
    if b.packing:
        return lambda rows: collate_packed(rows, b.pad_id)
    return lambda examples: collate_padded(examples, b.pad_id, b.max_seq_len)


def _eval_items(spec: DataSpec, b: Batching, examples: list[SFTExample], name: str) -> list:
    """Held-out examples as the items of their batches: packed like training."""
    if not examples:
        raise ValueError(f"{name}: no held-out example is left after tokenization (rows longer than "
                         f"max_seq_len={b.max_seq_len} and data.overlong={spec.overlong}?)")
    return pack_examples(examples, b.max_seq_len) if b.packing else examples


def _stream_data(spec: DataSpec, b: Batching, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    """Batches read one buffer at a time (data/stream.py). Chat data is audited on its first buffer
    before step 1; later rows are checked as they are tokenized, and a bad one stops the run naming it."""
    max_len, text = b.max_seq_len, train.kind == TEXT

    def tokenize(row: dict) -> list[SFTExample]:
        if text:
            return text_pieces(row, tokenizer, max_len)
        example = tokenize_conversation(row, tokenizer, max_len, spec.train_on, spec.overlong, spec.chat_format)
        return [] if example is None else [example]

    batches = StreamBatches(train, tokenize, _item_collator(b), b.batch_size, b.seed, max_len, b.packing,
                            spec.stream_buffer)
    summary = [f"{train.name}: streamed in buffers of {counted(spec.stream_buffer, 'row')}"
               + ("; text documents cut into pieces of max_seq_len and packed per document" if text else "")]
    report = stats = None
    warnings: list[str] = []
    if not text:
        first = list(islice(train, spec.stream_buffer))
        _, stats, report, warnings = _audited(spec, b, tokenizer, first,
                                              f"{train.name} (the first {counted(len(first), 'row')})")
        report.notes.append(f"streaming: audited the first {counted(len(first), 'row')}; later rows are checked as "
                            "they are read")
        summary.append(format_report(report))
    if held is None:
        return TrainData(batches, None, b.eval_size, stats, None, report, summary + warnings)
    eval_rows = list(held)
    eval_examples = [ex for row in eval_rows for ex in tokenize(row)]
    summary.append(f"{held.name}: {counted(len(eval_examples), 'held-out example')}")
    return TrainData(batches, _eval_items(spec, b, eval_examples, held.name), b.eval_size, stats,
                     None if text else eval_rows, report, summary + warnings)
