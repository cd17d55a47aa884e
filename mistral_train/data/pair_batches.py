"""Preference pairs as fit()'s batches: rows -> pairs (data/preference.py) -> audit -> EpochBatches.

Every batch holds `batch_size` pairs (an epoch's last partial batch is completed from the next epoch):
their 2B sequences padded one per row, or packed as documents into rows (`data.packing`; attention stays
inside each sequence). A reward model pools the last token of each row, so its batches are always padded.
Lost pairs (dropped or cut for length) end the summary as "warning: " lines.

Pairs are items with a stable identity (source, row), so precomputed reference log-probs can ride
along: `attach_reference(data, table)` swaps the collate function of training and held-out batches for one
that adds `ref_logps` (2B,) in the batch's sequence order (B chosen, then B rejected).
"""

from __future__ import annotations

from typing import Optional

import torch

from mistral_train.data.collate import Batch
from mistral_train.data.epochs import EpochBatches, TrainData, answered_rows, too_few
from mistral_train.data.preference import PreferencePair, collate_pairs, tokenize_pairs
from mistral_train.data.preference_audit import audit_pairs, format_pair_report, pair_length_warnings
from mistral_train.data.sources import RowSource
from mistral_train.data.spec import Batching, DataSpec
from mistral_train.wording import counted

PairKey = tuple[str, int]


def pair_key(pair: PreferencePair) -> PairKey:
    return (pair.source, pair.row)


def pair_data(spec: DataSpec, b: Batching, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    """Tokenize, audit and batch preference pairs (see the module docstring).

    Raises:
        AuditError: the pairs fail the audit (names the source and row).
        ValueError: unreadable rows, streaming (pairs are read whole), packing with `b.padded_only`.
    """
    if spec.streaming:
        raise ValueError("data.streaming=true with preference pairs: pairs are read whole (each is audited before "
                         "step 1, and precomputed reference log-probs index them); set data.streaming=false")
    if b.padded_only and b.packing:
        raise ValueError("the objective pools each sequence's last token (a sequence-classification head), so its "
                         "batches are padded: set data.packing=false")
    max_len, packing = b.max_seq_len, b.packing
    rows = list(train)
    pairs, stats = tokenize_pairs(rows, tokenizer, max_len, spec.max_prompt_len, spec.overlong, spec.chat_format)
    report = audit_pairs(pairs, stats, tokenizer, spec.identical_pairs, rows=rows,
                         collate=lambda p: collate_pairs(p, b.pad_id, packing, max_len, pad_to_max=True))
    tokens = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    batches = EpochBatches(pairs, lambda p: collate_pairs(p, b.pad_id, packing, max_len), b.batch_size, b.seed,
                           tokens, train.name, unit="pair")
    summary = [train.describe(), format_pair_report(report),
               f"{counted(len(pairs), 'pair')}, {b.batch_size} per batch ({'packed' if packing else 'padded'}; "
               f"{batches.per_epoch()})"]
    dropped = stats.total().dropped
    lost = f" ({counted(dropped, 'more row')} dropped for length)" if dropped else ""
    short = too_few(train.name, len(pairs), b.batch_size, f"{counted(len(pairs), 'preference pair')}{lost}",
                    ["add pairs"])
    warnings = pair_length_warnings(stats, train.name)
    if held is None:
        return TrainData(batches, None, b.eval_size, stats, None, report, summary + warnings, too_few=short)
    eval_rows = list(held)
    eval_pairs, eval_stats = tokenize_pairs(eval_rows, tokenizer, max_len, spec.max_prompt_len, spec.overlong,
                                            spec.chat_format)
    if not eval_pairs:
        raise ValueError(f"{held.name}: no held-out pair is left after tokenization ({eval_stats.total().dropped} "
                         f"dropped as longer than trainer.max_seq_len={max_len}, data.overlong={spec.overlong})")
    # held-out pairs with an "answer" also score exact match of greedy replies to their prompt
    answered = answered_rows(eval_rows, "chosen")
    summary.append(f"{held.name}: {counted(len(eval_pairs), 'held-out pair')}")
    summary += warnings + pair_length_warnings(eval_stats, held.name)
    return TrainData(batches, eval_pairs, b.eval_size, stats, answered, report, summary, too_few=short)


def attach_reference(data: TrainData, table: dict[PairKey, torch.Tensor]) -> None:
    """Make every training and held-out batch carry the precomputed reference log-probs of its pairs: `ref_logps`
    (2B,) in the batch's sequence order (B chosen, then B rejected), from `table` ((source, row) -> (2,))."""
    plain = data.train.collate

    def collate(pairs: list[PreferencePair]) -> Batch:
        batch = plain(pairs)
        logps = torch.stack([table[pair_key(p)] for p in pairs])  # (B, 2): [chosen, rejected]
        batch["ref_logps"] = torch.cat([logps[:, 0], logps[:, 1]])  # (2B,): chosen..., rejected...
        return batch

    data.swap_collate(collate)


def num_pairs(batch: Batch) -> int:
    """B, the pairs of a collated batch (its 2B sequences are numbered by sequence_index)."""
    return (int(batch["sequence_index"].max()) + 1) // 2
