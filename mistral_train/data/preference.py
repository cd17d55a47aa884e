"""Preference pairs (DPO, reward models): canonical rows -> tokenized pairs -> batches of 2B sequences.

A canonical row (data/formats.py, format `preference`) is `{"prompt": [turns], "chosen": [answer],
"rejected": [answer], "source", "row"}`. Each of prompt + chosen and prompt + rejected is encoded ONCE,
whole, by the chat template (`Tokenizer.encode_chat`: one BOS); the answer is the template's last
assistant span (its tokens and the EOS closing it). Nothing is tokenized alone and glued together:
with SentencePiece, tok(prompt) + tok(answer) != tok(prompt + answer) at the seam (trl#2054), and a
tokenizer that adds its own BOS to text already holding one doubles it (axolotl#1616). The prompt
tokens of the two sequences must be identical, which is what lets a pair store them once.

Too long (prompt + longer answer > max_seq_len, or prompt > max_prompt_len): `overlong="drop"`
drops the pair; `"truncate"` keeps BOS + the END of the prompt (what the answer replies to) and the
START of both answers. The prompt gives way first, to max_seq_len - longer answer, but keeps at
least min(its length, max_prompt_len or max_seq_len // 2) tokens; the answers are then cut to what
is left (a cut answer has no EOS). Every cut and drop is counted per source in `PreferenceStats`.

Batches (`collate_pairs`): the B chosen sequences, then the B rejected ones (trl's concatenated
order), as sequence k = 0..2B-1, each `input_ids` = prompt + answer with `labels` -100 on the
prompt, so `labels != -100` marks exactly the completion tokens. Padded: one sequence per row.
Packed: sequences are documents of rows (data/packing.py: positions restart, no attention_mask).
Either way `sequence_index` says which sequence each token belongs to (-1 on padding); the model
sums each sequence's log-probs from it (`reduction="sequence"`, losses/logps.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Mapping, Optional, Sequence

import torch

from mistral_train.data.collate import Batch, collate_packed, collate_padded
from mistral_train.data.packing import pack_examples
from mistral_train.data.sft import OVERLONG, SFTExample, SourceStats, Stats, assistant_spans, row_where
from mistral_train.losses.ce import IGNORE_INDEX

ANSWERS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One tokenized pair. A sequence is `prompt_ids + chosen_ids` (or `+ rejected_ids`), <= max_seq_len."""

    prompt_ids: list[int]  # BOS + the prompt turns up to where the answer starts (after [/INST])
    chosen_ids: list[int]  # the chosen answer's tokens + the EOS closing it (no EOS when cut)
    rejected_ids: list[int]
    source: str
    row: int
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False
    margin: Optional[float] = None  # the row's "margin" (reward models: how much better chosen is)

    @property
    def completion_start(self) -> int:
        """Index of the first answer token in either sequence."""
        return len(self.prompt_ids)

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.chosen_truncated or self.rejected_truncated

    @property
    def identical(self) -> bool:
        """Chosen == rejected: the pair's DPO gradient is zero, and its reward margin is meaningless."""
        return self.chosen_ids == self.rejected_ids

    def sequence(self, which: str) -> SFTExample:
        """The "chosen" or "rejected" sequence: (T,) input_ids, and labels = input_ids on the answer, -100 on the
        prompt (aligned, not shifted). Its `truncated` flag says the answer was cut (so may lack its EOS)."""
        if which not in ANSWERS:
            raise ValueError(f"which must be one of {ANSWERS}, got {which!r}")
        answer = self.chosen_ids if which == "chosen" else self.rejected_ids
        cut = self.chosen_truncated if which == "chosen" else self.rejected_truncated
        labels = [IGNORE_INDEX] * len(self.prompt_ids) + list(answer)
        return SFTExample(self.prompt_ids + list(answer), labels, self.source, self.row, cut)


@dataclass
class PairSourceStats(SourceStats):
    """SFT's counts per source (examples = pairs; tokens and label_tokens over both sequences), plus cuts
    by part and identical pairs (counted after truncation: two answers can differ only past the cut)."""

    prompt_truncated: int = 0
    answer_truncated: int = 0  # pairs with at least one answer cut
    identical: int = 0
    identical_rows: list[int] = field(default_factory=list)  # the first few, for the report


@dataclass
class PreferenceStats(Stats):
    """What `tokenize_pairs` did."""

    max_prompt_len: Optional[int] = None
    counts: ClassVar[type] = PairSourceStats


def _check_settings(max_seq_len: int, max_prompt_len: Optional[int], overlong: str) -> None:
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong {overlong!r} unknown; expected one of {OVERLONG}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS and one answer token), got {max_seq_len}")
    if max_prompt_len is not None and not 1 <= max_prompt_len < max_seq_len:
        raise ValueError(f"max_prompt_len must be in [1, max_seq_len={max_seq_len}) so that an answer fits, "
                         f"got {max_prompt_len}")


def _encode(messages: list, tokenizer, chat_format: Optional[str], where: str, which: str) -> tuple[list[int], int]:
    """(ids, start of the answer) of prompt + one answer, encoded whole; the answer is the template's last
    assistant span, which must end the sequence with EOS and hold at least one token before it."""
    try:
        ids, mask = tokenizer.encode_chat(messages, chat_format)
    except ValueError as err:  # malformed conversation: say which row and which answer
        raise ValueError(f"{where}: prompt + {which}: {err}") from err
    spans = assistant_spans(mask)
    if not spans or spans[-1][1] != len(ids) or ids[-1] != tokenizer.eos_id:
        raise ValueError(f"{where}: the chat template did not end prompt + {which} with an assistant span closed by "
                         f"EOS (id {tokenizer.eos_id}); spans {spans} in {len(ids)} tokens, last id {ids[-1]}")
    start = spans[-1][0]
    if len(ids) - start < 2:
        raise ValueError(f"{where}: the {which} answer tokenizes to nothing but EOS; expected an answer to train on")
    return ids, start


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_pair(row: Mapping, tokenizer, max_seq_len: int, max_prompt_len: Optional[int] = None,
                  overlong: str = "truncate", chat_format: Optional[str] = None) -> Optional[PreferencePair]:
    """Tokenize one canonical preference row into a PreferencePair, or None when it is dropped (see the module
    docstring for truncation). Raises ValueError naming the source and row for a malformed row, or a template
    that tokenizes the shared prompt differently before the two answers."""
    _check_settings(max_seq_len, max_prompt_len, overlong)
    source, index, where = row_where(row)
    missing = [key for key in ("prompt", *ANSWERS) if key not in row]
    if missing:
        raise ValueError(f"{where}: expected a canonical preference row (data.format=preference) with 'prompt', "
                         f"'chosen' and 'rejected'; missing {missing}, got fields {sorted(row)}")
    prompt = list(row["prompt"])
    chosen, c_start = _encode(prompt + list(row["chosen"]), tokenizer, chat_format, where, "chosen")
    rejected, r_start = _encode(prompt + list(row["rejected"]), tokenizer, chat_format, where, "rejected")
    if chosen[:c_start] != rejected[:r_start]:
        t = _first_difference(chosen[:c_start], rejected[:r_start])
        raise ValueError(f"{where}: the shared prompt tokenizes differently before the chosen answer ({c_start} "
                         f"tokens) and before the rejected one ({r_start}), first at token {t}; the chat template "
                         "must encode the prompt the same way whatever answer follows")
    return _fit(PreferencePair(chosen[:c_start], chosen[c_start:], rejected[r_start:], source, index,
                               margin=row.get("margin")), max_seq_len, max_prompt_len, overlong)


def _fit(pair: PreferencePair, max_seq_len: int, max_prompt_len: Optional[int],
         overlong: str) -> Optional[PreferencePair]:
    """The pair cut to fit (module docstring), or None when it is too long and overlong == "drop"."""
    prompt, longest = pair.prompt_ids, max(len(pair.chosen_ids), len(pair.rejected_ids))
    prompt_cap = len(prompt) if max_prompt_len is None else min(len(prompt), max_prompt_len)
    if len(prompt) + longest <= max_seq_len and prompt_cap == len(prompt):
        return pair
    if overlong == "drop":
        return None
    floor = prompt_cap if max_prompt_len is not None else min(prompt_cap, max_seq_len // 2)
    keep = max(min(prompt_cap, max_seq_len - longest), floor)
    if keep < len(prompt):  # BOS, then the end of the prompt: the [/INST] the answer follows stays
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :]
    budget = max_seq_len - len(prompt)  # >= 1: keep <= max_seq_len // 2 or max_prompt_len < max_seq_len
    return PreferencePair(prompt, pair.chosen_ids[:budget], pair.rejected_ids[:budget], pair.source, pair.row,
                          len(prompt) < len(pair.prompt_ids), len(pair.chosen_ids) > budget,
                          len(pair.rejected_ids) > budget, pair.margin)


def tokenize_pairs(rows: Iterable[Mapping], tokenizer, max_seq_len: int, max_prompt_len: Optional[int] = None,
                   overlong: str = "truncate", chat_format: Optional[str] = None
                   ) -> tuple[list[PreferencePair], PreferenceStats]:
    """Tokenize every row (see `tokenize_pair`); return the kept pairs and the counts per source, so cuts,
    drops and identical pairs are always reported, never silent."""
    _check_settings(max_seq_len, max_prompt_len, overlong)
    stats = PreferenceStats(overlong, max_seq_len, tokenizer.chat_format(chat_format), max_prompt_len=max_prompt_len)
    pairs = []
    for row in rows:
        pair = tokenize_pair(row, tokenizer, max_seq_len, max_prompt_len, overlong, chat_format)
        source, index, _ = row_where(row)
        counts = stats.source(source)
        if pair is None:
            counts.count_row("dropped", index)
            continue
        pairs.append(pair)
        counts.examples += 1
        counts.tokens += 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        counts.label_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
        counts.truncated += pair.truncated
        counts.prompt_truncated += pair.prompt_truncated
        counts.answer_truncated += pair.chosen_truncated or pair.rejected_truncated
        if pair.identical:
            counts.count_row("identical", index)
    return pairs, stats


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int, packing: bool, max_seq_len: int,
                  pad_to_max: bool = False) -> Batch:
    """B pairs -> one batch of their 2B sequences: chosen k at sequence k, rejected k at sequence B + k.

    Padded (`packing=False`): row k is sequence k, right-padded to the longest (or to max_seq_len).
        input_ids, labels, attention_mask (1 on tokens, 0 on padding), sequence_index: (2B, T) int64.
    Packed: the sequences are documents in N <= 2B rows of at most max_seq_len tokens (best fit), rows
        padded to the longest (or to max_seq_len); no attention_mask, since the model reads document
        boundaries from position_ids (data/packing.py).
        input_ids, labels, position_ids, sequence_index: (N, T) int64; pad_mask: (N, T) bool.
    `sequence_index[n, t]` is the sequence token (n, t) belongs to, -1 on padding; labels are -100 on
    prompts and padding (and, packed, on each document's first token, which is BOS and never a label).
    `margin` (B,) when the pairs carry one (reward models).
    Padding is placed by position, never found by id, so pad_id may equal EOS and every EOS stays a label.
    (A sequence-classification head pools by pad id, as transformers does: see train/steps.py reward_objective.)
    """
    if not pairs:
        raise ValueError("collate_pairs: got no pairs; expected at least one")
    sequences = [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]  # 2B
    batch = collate_sequences(sequences, pad_id, packing, max_seq_len, pad_to_max)
    margins = [p.margin for p in pairs]
    if any(m is not None for m in margins):
        if None in margins:
            p = pairs[margins.index(None)]
            raise ValueError(f"{p.source} row {p.row}: no 'margin', but other pairs have one; give every pair a margin or none")
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)  # (B,)
    return batch


def collate_sequences(sequences: list[SFTExample], pad_id: int, packing: bool, max_seq_len: int,
                      pad_to_max: bool = False) -> Batch:
    """Sequences -> one padded or packed batch with `sequence_index` (as `collate_pairs` describes); also the
    collator of KTO's unpaired batches (data/unpaired.py)."""
    if not packing:
        batch = collate_padded(sequences, pad_id, max_seq_len, pad_to_max=pad_to_max)
        rows = torch.arange(len(sequences)).unsqueeze(1).expand_as(batch["input_ids"])
        batch["sequence_index"] = torch.where(batch["attention_mask"].bool(), rows, -1)
        return batch
    packed = pack_examples(sequences, max_seq_len)
    batch = collate_packed(packed, pad_id, pad_to=max_seq_len if pad_to_max else None)
    index = torch.full_like(batch["input_ids"], -1)
    for n, row in enumerate(packed):
        t = 0
        for k in row.example_indices:  # documents lie in this order, end to end, from position 0
            length = len(sequences[k].input_ids)
            index[n, t : t + length] = k
            t += length
    batch["sequence_index"] = index
    return batch
