"""Preference pairs as fit()'s batches: rows -> pairs (data/preference.py) -> audit -> EpochBatches.

Every batch holds `batch_size` pairs (an epoch's last partial batch is completed from the next epoch):
their 2B sequences padded one per row, or packed as documents into rows (`data.packing`; attention stays
inside each sequence). A reward model pools the last token of each row, so its batches are always padded.
Lost pairs (dropped or cut for length) end the summary as "warning: " lines.

Pairs are items with a stable identity (source, row), so precomputed reference log-probs can ride
along: `attach_reference(data, table)` makes every batch (training and held-out) carry `ref_logps`
(2B,) in the batch's sequence order (B chosen, then B rejected).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mistral_train.config import RunConfig
from mistral_train.data.collate import Batch
from mistral_train.data.epochs import EpochBatches, TrainData, too_few
from mistral_train.data.preference import PreferencePair, collate_pairs, tokenize_pairs
from mistral_train.data.preference_audit import audit_pairs, format_pair_report, pair_length_warnings
from mistral_train.data.sources import RowSource
from mistral_train.wording import counted

PairKey = tuple[str, int]


def pair_key(pair: PreferencePair) -> PairKey:
    return (pair.source, pair.row)


def pair_collator(packing: bool, max_seq_len: int, pad_id: int,
                  reference: Optional[dict[PairKey, torch.Tensor]] = None) -> Callable[[list[PreferencePair]], Batch]:
    """pairs -> batch; with `reference` ((source, row) -> (2,) [chosen, rejected] log-probs) adds ref_logps."""
    def collate(pairs: list[PreferencePair]) -> Batch:
        batch = collate_pairs(pairs, pad_id, packing, max_seq_len)
        if reference is not None:
            table = torch.stack([reference[pair_key(p)] for p in pairs])  # (B, 2)
            batch["ref_logps"] = torch.cat([table[:, 0], table[:, 1]])  # (2B,): chosen..., rejected...
        return batch

    return collate


def pair_data(cfg: RunConfig, tokenizer, train: RowSource, held: Optional[RowSource], pad_id: int) -> TrainData:
    """Tokenize, audit and batch preference pairs (see the module docstring).

    Raises:
        AuditError: the pairs fail the audit (names the source and row).
        ValueError: unreadable rows, streaming (pairs are read whole), packing for a reward model.
    """
    data, spec = cfg.data, cfg.trainer
    if data.streaming:
        raise ValueError("data.streaming=true with preference pairs: pairs are read whole (each is audited before "
                         "step 1, and precomputed reference log-probs index them); set data.streaming=false")
    packing = data.packing
    if spec.objective == "reward" and packing:
        raise ValueError("trainer.objective=reward pools each sequence's last token, so its batches are padded: "
                         "set data.packing=false")
    max_len = spec.max_seq_len
    rows = list(train)
    pairs, stats = tokenize_pairs(rows, tokenizer, max_len, data.max_prompt_len, data.overlong, data.chat_format)
    report = audit_pairs(pairs, stats, tokenizer, data.identical_pairs, rows=rows,
                         collate=lambda p: collate_pairs(p, pad_id, packing, max_len, pad_to_max=True))
    tokens = sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    batches = EpochBatches(pairs, pair_collator(packing, max_len, pad_id), spec.batch_size, spec.seed, tokens,
                           train.name, unit="pair")
    summary = [train.describe(), format_pair_report(report),
               f"{counted(len(pairs), 'pair')}, {spec.batch_size} per batch ({'packed' if packing else 'padded'}; "
               f"{batches.per_epoch()})"]
    dropped = stats.total().dropped
    lost = f" ({counted(dropped, 'more row')} dropped for length)" if dropped else ""
    short = too_few(train.name, len(pairs), spec.batch_size, f"{counted(len(pairs), 'preference pair')}{lost}",
                    ["add pairs"])
    warnings = pair_length_warnings(stats, train.name)
    data_out = TrainData(batches, None, stats, None, report, summary, too_few=short)
    if held is None:
        summary += warnings
        return data_out
    eval_rows = list(held)
    eval_pairs, eval_stats = tokenize_pairs(eval_rows, tokenizer, max_len, data.max_prompt_len, data.overlong,
                                            data.chat_format)
    if not eval_pairs:
        raise ValueError(f"{held.name}: no held-out pair is left after tokenization ({eval_stats.total().dropped} "
                         f"dropped as longer than trainer.max_seq_len={max_len}, data.overlong={data.overlong})")
    chunk = spec.batch_size * spec.grad_accum_steps
    data_out.eval_items = eval_pairs
    data_out.eval_batches = [pair_collator(packing, max_len, pad_id)(eval_pairs[i : i + chunk])
                             for i in range(0, len(eval_pairs), chunk)]
    # held-out pairs with an "answer" also score exact match of greedy replies to their prompt
    data_out.eval_rows = [{"messages": r["prompt"] + r["chosen"], "answer": r["answer"], "source": r["source"],
                           "row": r["row"]} for r in eval_rows if "answer" in r] or None
    summary.append(f"{held.name}: {counted(len(eval_pairs), 'held-out pair')}")
    summary += warnings + pair_length_warnings(eval_stats, held.name)
    return data_out


def attach_reference(data: TrainData, table: dict[PairKey, torch.Tensor], packing: bool, max_seq_len: int,
                     pad_id: int) -> None:
    """Make every training and held-out batch carry the precomputed reference log-probs of its pairs."""
    collate = pair_collator(packing, max_seq_len, pad_id, table)
    data.train.collate = collate
    if data.eval_batches:
        size, items = num_pairs(data.eval_batches[0]), data.eval_items
        data.eval_batches = [collate(items[i : i + size]) for i in range(0, len(items), size)]


def num_pairs(batch: Batch) -> int:
    """B, the pairs of a collated batch (its 2B sequences are numbered by sequence_index)."""
    return (int(batch["sequence_index"].max()) + 1) // 2
