"""The batches fit() trains and evaluates on: `build_batches(cfg, tokenizer) -> TrainData`.

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

from dataclasses import replace
from itertools import islice
from typing import Callable, Optional

import torch

from mistral_train.config import RunConfig
from mistral_train.data.audit import AuditReport, audit, format_report, length_warnings
from mistral_train.data.collate import Batch, collate_packed, collate_padded
from mistral_train.data.epochs import EpochBatches, TrainData, too_few
from mistral_train.data.pair_batches import pair_data
from mistral_train.data.packing import pack_examples, packing_efficiency
from mistral_train.data.formats import check_kind, resolve_format
from mistral_train.data.sft import SFTExample, SFTStats, tokenize_conversation, tokenize_rows
from mistral_train.data.sources import RowSource, load_splits
from mistral_train.data.stream import StreamBatches, text_pieces
from mistral_train.data.text import pack_rows, tokenize_documents
from mistral_train.wording import counted

def build_batches(cfg: RunConfig, tokenizer, check: bool = True) -> TrainData:
    """Read, tokenize, audit and batch the run's data (see the module docstring).

    check: refuse data that does not fill one batch here; False leaves it to the caller, who shows
        the summary first and then calls `TrainData.check_batch_size()`.
    Raises:
        AuditError: the chat data fails the pre-flight audit (names the source and row).
        SmallDataError: (with `check`) the training data does not fill one batch.
        ValueError: unreadable or empty data.
    """
    fmt = resolve_format(cfg.data.format, cfg.data.path, cfg.trainer.objective)  # auto + bundled: the objective's kind
    train_rows, eval_rows = load_splits(replace(cfg.data, format=fmt), cfg.trainer.seed)
    check_kind(cfg.trainer.objective, train_rows.kind, train_rows.name)  # data of another kind is refused, never half-used
    if train_rows.kind == "preference":
        data = pair_data(cfg, tokenizer, train_rows, eval_rows, pad_id_of(tokenizer))
    elif cfg.data.streaming:
        data = _stream_data(cfg, tokenizer, train_rows, eval_rows)
    elif train_rows.kind == "text":
        data = _text_data(cfg, tokenizer, train_rows, eval_rows)
    else:
        data = _chat_data(cfg, tokenizer, train_rows, eval_rows)
    if check:
        data.check_batch_size()
    return data


PAIR_OBJECTIVES = ("dpo", "reward")


def pad_id_of(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad id, else EOS (padding is located by place)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def chat_collator(packing: bool, max_seq_len: int, pad_id: int, pad_to_max: bool = False) -> Callable[[list[SFTExample]], Batch]:
    """examples -> batch as training builds it. The audit calls it on single examples with
    `pad_to_max`, so that padding follows the example as it does in a batch of longer rows
    (which is where a pad id equal to EOS would swallow the EOS label)."""
    if packing:
        return lambda examples: collate_packed(pack_examples(examples, max_seq_len), pad_id,
                                               pad_to=max_seq_len if pad_to_max else None)
    return lambda examples: collate_padded(examples, pad_id, max_seq_len, pad_to_max=pad_to_max)


def _eval_chunk(cfg: RunConfig) -> int:
    # no gradients kept: a whole accumulation window fits in memory at once
    return cfg.trainer.batch_size * cfg.trainer.grad_accum_steps


def _text_data(cfg: RunConfig, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    seq_len, name, batch_size = cfg.trainer.max_seq_len, train.name, cfg.trainer.batch_size
    rows = pack_rows(tokenize_documents((r["text"] for r in train), tokenizer), seq_len, name)
    batches = EpochBatches(rows, _stack_text_rows, batch_size, cfg.trainer.seed, rows.numel(), name)
    made = f"{counted(len(train), 'document')} -> {counted(rows.shape[0], 'row')} of {seq_len} tokens"
    summary = [f"{name}: {made} ({batches.per_epoch()})"]
    short = too_few(name, rows.shape[0], batch_size, f"{made} (trainer.max_seq_len)",
                    ["lower trainer.max_seq_len (more, shorter rows)", "add text"])
    eval_batches = None
    if held is not None:
        eval_rows = pack_rows(tokenize_documents((r["text"] for r in held), tokenizer), seq_len, held.name)
        chunk = _eval_chunk(cfg)
        eval_batches = [_stack_text_rows(list(eval_rows[i : i + chunk])) for i in range(0, eval_rows.shape[0], chunk)]
        summary.append(f"{held.name}: {counted(len(held), 'document')} -> "
                       f"{counted(eval_rows.shape[0], 'held-out row')}")
    return TrainData(batches, eval_batches, summary=summary, too_few=short)


def _stack_text_rows(rows: list[torch.Tensor]) -> Batch:
    input_ids = torch.stack(rows)  # (B, T)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _chat_data(cfg: RunConfig, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    data, spec = cfg.data, cfg.trainer
    max_len, pad_id = spec.max_seq_len, pad_id_of(tokenizer)
    rows = list(train)
    examples, stats = tokenize_rows(rows, tokenizer, max_len, data.train_on, data.overlong, data.chat_format)
    report = audit(examples, stats, tokenizer, pad_id=pad_id, rows=rows,
                   collate=chat_collator(data.packing, max_len, pad_id, pad_to_max=True))
    summary = [train.describe(), format_report(report)]
    tokens = sum(len(ex.input_ids) for ex in examples)
    limit = f"(trainer.max_seq_len{_dropped_note(stats.total().dropped)})"
    if data.packing:
        packed = pack_examples(examples, max_len)
        batches = EpochBatches(packed, _item_collator(True, max_len, pad_id), spec.batch_size, spec.seed,
                               tokens, train.name)
        made = (f"packed {counted(len(examples), 'example')} into {counted(len(packed), 'row')} of at most "
                f"{max_len} tokens")
        summary.append(f"{made} ({packing_efficiency(packed, max_len):.1%} full; {batches.per_epoch()})")
        unpacked = ([f"set data.packing=false (one example per row: {counted(len(examples), 'row')})"]
                    if len(examples) >= spec.batch_size else [])
        short = too_few(train.name, len(packed), spec.batch_size, f"{made} {limit}",
                        [*unpacked, "add data"])
    else:
        batches = EpochBatches(examples, _item_collator(False, max_len, pad_id), spec.batch_size,
                               spec.seed, tokens, train.name, unit="example")
        summary.append(f"{counted(len(examples), 'example')}, one per row, padded per batch ({batches.per_epoch()})")
        short = too_few(train.name, len(examples), spec.batch_size,
                        f"{counted(len(examples), 'example')} of at most {max_len} tokens {limit}, one per row",
                        ["add data"])
    warnings = length_warnings(stats, train.name)
    eval_batches = eval_rows = None
    if held is not None:
        eval_rows = list(held)
        eval_examples, eval_stats = tokenize_rows(eval_rows, tokenizer, max_len, data.train_on, data.overlong,
                                                  data.chat_format)
        total = eval_stats.total()
        summary.append(f"{held.name}: {counted(total.examples, 'held-out example')}, "
                       f"{counted(total.label_tokens, 'label token')} ({total.truncated} truncated, "
                       f"{total.dropped} dropped)")
        warnings += length_warnings(eval_stats, held.name)
        eval_batches = _eval_batches(cfg, eval_examples, pad_id, held.name)
    return TrainData(batches, eval_batches, stats, eval_rows, report, summary + warnings, too_few=short)


def _dropped_note(dropped: int) -> str:
    """How many more rows tokenization dropped for length (said after the limit that dropped them)."""
    return f"; {counted(dropped, 'more row')} dropped for length" if dropped else ""


def _item_collator(packing: bool, max_seq_len: int, pad_id: int) -> Callable[[list], Batch]:
    """The collator of a batch's items: packed rows, or examples padded to the longest."""
    if packing:
        return lambda rows: collate_packed(rows, pad_id)
    return lambda examples: collate_padded(examples, pad_id, max_seq_len)


def _eval_batches(cfg: RunConfig, examples: list[SFTExample], pad_id: int, name: str) -> list[Batch]:
    """Held-out examples as batches of up to one accumulation window of rows, packed like training."""
    if not examples:
        raise ValueError(f"{name}: no held-out example is left after tokenization (rows longer than "
                         f"max_seq_len={cfg.trainer.max_seq_len} and data.overlong={cfg.data.overlong}?)")
    items = pack_examples(examples, cfg.trainer.max_seq_len) if cfg.data.packing else examples
    collate, chunk = _item_collator(cfg.data.packing, cfg.trainer.max_seq_len, pad_id), _eval_chunk(cfg)
    return [collate(items[i : i + chunk]) for i in range(0, len(items), chunk)]


def _stream_data(cfg: RunConfig, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    """Batches read one buffer at a time (data/stream.py). Chat data is audited on its first buffer
    before step 1; later rows are checked as they are tokenized, and a bad one stops the run naming it."""
    data, spec = cfg.data, cfg.trainer
    max_len, pad_id = spec.max_seq_len, pad_id_of(tokenizer)
    text = train.kind == "text"

    def tokenize(row: dict) -> list[SFTExample]:
        if text:
            return text_pieces(row, tokenizer, max_len)
        example = tokenize_conversation(row, tokenizer, max_len, data.train_on, data.overlong, data.chat_format)
        return [] if example is None else [example]

    batches = StreamBatches(train, tokenize, _item_collator(data.packing, max_len, pad_id), spec.batch_size,
                            spec.seed, max_len, data.packing, data.stream_buffer)
    summary = [f"{train.name}: streamed in buffers of {counted(data.stream_buffer, 'row')}"
               + ("; text documents cut into pieces of max_seq_len and packed per document" if text else "")]
    report = stats = None
    warnings: list[str] = []
    if not text:
        first = list(islice(train, data.stream_buffer))
        examples, stats = tokenize_rows(first, tokenizer, max_len, data.train_on, data.overlong, data.chat_format)
        report = audit(examples, stats, tokenizer, pad_id=pad_id, rows=first,
                       collate=chat_collator(data.packing, max_len, pad_id, pad_to_max=True))
        report.notes.append(f"streaming: audited the first {counted(len(first), 'row')}; later rows are checked as "
                            "they are read")
        summary.append(format_report(report))
        warnings = length_warnings(stats, f"{train.name} (the first {counted(len(first), 'row')})")
    if held is None:
        return TrainData(batches, None, stats, None, report, summary + warnings)
    eval_rows = list(held)
    eval_examples = [ex for row in eval_rows for ex in tokenize(row)]
    summary.append(f"{held.name}: {counted(len(eval_examples), 'held-out example')}")
    return TrainData(batches, _eval_batches(cfg, eval_examples, pad_id, held.name), stats,
                     None if text else eval_rows, report, summary + warnings)
