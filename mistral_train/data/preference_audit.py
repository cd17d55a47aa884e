"""Pre-flight audit of tokenized preference pairs: counts per source, checks, one marked pair.

Every pair is checked as two sequences (prompt + chosen, prompt + rejected) with the SFT audit's own
per-example checks (data/audit.py). On top, per pair:
- each answer ends with EOS (unless cut) and holds a token besides it (no empty answer);
- both sequences start their labels right after the same prompt tokens (the DPO boundary);
- round trip (with `rows`): each answer's trained tokens decode to the row's answer text, and the
  prompt alone, encoded as at generation time (`apply_chat_template(prompt, add_generation_prompt=True)`),
  gives exactly the pair's prompt tokens, so the model is trained on the context it will be given;
- collation keeps every label (with `collate`), EOS included when pad id == EOS id;
- chosen identical to rejected: `identical="error"` stops naming the row; `"warn"` counts them and
  lists them in the report (they carry no DPO gradient).
Any failure raises `AuditError` naming the source and row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

from mistral_train.data.audit import (MARK, AuditError, AuditReport, check_labels, check_lines, check_round_trip,
                                      count_table, dropped_eos_labels, listed_rows, located, mark_trained, pick_samples,
                                      rows_by_key, source_row)
from mistral_train.data.collate import Batch
from mistral_train.data.epochs import WARNING
from mistral_train.data.preference import ANSWERS, PreferencePair, PreferenceStats
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.wording import counted

IDENTICAL = ("error", "warn")
PairCollate = Callable[[list[PreferencePair]], Batch]


@dataclass
class PairAuditReport(AuditReport):
    """AuditReport's fields (notes also hold warnings; samples are (source, row, marked chosen, rejected)), plus:"""

    identical: list[tuple[str, int]] = field(default_factory=list)  # (source, row) of chosen == rejected pairs


def _check_pair(pair: PreferencePair, tokenizer) -> None:
    where, start = located(pair), pair.completion_start
    for which in ANSWERS:
        seq = pair.sequence(which)
        try:
            check_labels(seq, tokenizer)
        except AuditError as err:
            raise AuditError(f"{err} (in prompt + {which})") from None
        answer = seq.input_ids[start:]
        if not answer or (not seq.truncated and len(answer) < 2):
            raise AuditError(f"{where}: the {which} answer is empty ({answer}); nothing to compare")
        if not seq.truncated and (answer[-1] != tokenizer.eos_id or seq.labels[-1] != tokenizer.eos_id):
            raise AuditError(f"{where}: the {which} answer does not end with a trained EOS (id {tokenizer.eos_id}); "
                             f"last token {answer[-1]}, label {seq.labels[-1]}")
        first = next(t for t, y in enumerate(seq.labels) if y != IGNORE_INDEX)
        if first != start:
            raise AuditError(f"{where}: the {which} labels start at token {first}, its answer at {start}; the prompt "
                             "must be masked and the whole answer trained")


def _check_row(pair: PreferencePair, row: Mapping, tokenizer, chat_format: str) -> None:
    for which in ANSWERS:
        try:  # the trained span of prompt + answer, against the answer's text (data/audit.py's check)
            check_round_trip(pair.sequence(which), {"messages": list(row["prompt"]) + list(row[which])}, tokenizer,
                              "last_assistant")
        except AuditError as err:
            raise AuditError(f"{err} (in prompt + {which})") from None
    if not pair.prompt_truncated:
        alone = tokenizer.apply_chat_template(row["prompt"], chat_format, add_generation_prompt=True)
        if alone != pair.prompt_ids:
            raise AuditError(f"{located(pair)}: the prompt encoded alone (as at generation) gives "
                             f"{counted(len(alone), 'token')} that differ from the pair's "
                             f"{counted(len(pair.prompt_ids), 'prompt token')}; the model would be trained on a "
                             "context it is never given")


def _check_collated(pair: PreferencePair, collate: PairCollate, eos_id: int) -> None:
    batch = collate([pair])
    ids, labels, index = batch["input_ids"], batch["labels"], batch["sequence_index"]  # (N, T) each
    bad = dropped_eos_labels(ids, labels, eos_id)
    if len(bad):
        raise AuditError(f"{located(pair)}: after collation the EOS at row {int(bad[0, 0])}, position "
                         f"{int(bad[0, 1])} is not a label (a collator that masks pad ids equal to EOS?)")
    for k, which in enumerate(ANSWERS):
        kept = int(((labels != IGNORE_INDEX) & (index == k)).sum())
        wanted = len(pair.chosen_ids if k == 0 else pair.rejected_ids)
        if kept != wanted:
            raise AuditError(f"{located(pair)}: the collator kept {kept} of the {wanted} {which} label tokens "
                             f"(sequence_index {k})")


def audit_pairs(pairs: Sequence[PreferencePair], stats: PreferenceStats, tokenizer, identical: str = "warn",
                rows: Optional[Iterable[Mapping]] = None, collate: Optional[PairCollate] = None,
                n_show: int = 1) -> PairAuditReport:
    """Check `pairs` (from `tokenize_pairs`, with its `stats`) and report; raise AuditError on failure.

    identical: "error" stops at the first pair whose chosen and rejected tokens are equal; "warn"
        lists them in the report.
    rows: the canonical rows the pairs came from (matched by source and row) for the round-trip and
        prompt-alone checks; without them those are listed as not run.
    collate: called as `collate([pair])`, e.g. `lambda p: collate_pairs(p, pad_id, packing, max_len,
        pad_to_max=True)`; checks that collation keeps every label, EOS included.
    n_show: pairs decoded with their trained spans in «» in the report.
    """
    if identical not in IDENTICAL:
        raise ValueError(f"identical {identical!r} unknown; expected one of {IDENTICAL}")
    if not pairs:
        drops = "; ".join(f"{name}: {counted(s.dropped, 'pair')} dropped (rows {s.dropped_rows})"
                          for name, s in stats.sources.items() if s.dropped)
        raise AuditError(f"no preference pairs left to train on: {drops or 'no rows were read'} "
                         f"(max_seq_len={stats.max_seq_len}, max_prompt_len={stats.max_prompt_len})")
    by_key = rows_by_key(rows)
    same: list[tuple[str, int]] = []
    for pair in pairs:
        _check_pair(pair, tokenizer)
        if by_key is not None:
            _check_row(pair, source_row(pair, by_key), tokenizer, stats.chat_format)
        if collate is not None:
            _check_collated(pair, collate, tokenizer.eos_id)
        if pair.identical:
            if identical == "error":
                raise AuditError(f"{located(pair)}: chosen and rejected are identical "
                                 f"({counted(len(pair.chosen_ids), 'token')}"
                                 f"{' after truncation' if pair.truncated else ''}): the pair teaches nothing; "
                                 "fix the data, or set identical='warn' to keep such pairs")
            same.append((pair.source, pair.row))
    checks = ["exactly one BOS per sequence, at position 0", "labels aligned with input_ids",
              "at least one label token per answer", "EOS closes each answer and is a label",
              "no empty answer", "labels start right after the shared prompt"]
    notes = []
    if by_key is not None:
        checks += ["round trip of trained answers", "prompt alone tokenizes as inside the pair"]
    else:
        notes.append("round trip and prompt-alone checks not run: no rows given")
    if collate is not None:
        checks.append("collation keeps every label")
    if same:
        notes.append(f"{counted(len(same), 'identical pair')} (chosen == rejected, no DPO gradient), first: "
                     + ", ".join(f"{s} row {r}" for s, r in same[:5]))
    else:
        checks.append("no identical pairs")
    samples = [(p.source, p.row, mark_trained(p.sequence("chosen"), tokenizer),
                mark_trained(p.sequence("rejected"), tokenizer)) for p in pick_samples(pairs, n_show)]
    return PairAuditReport(stats, checks, notes, samples, identical=same)


def pair_length_warnings(stats: PreferenceStats, name: str) -> list[str]:
    """"warning: " lines for the pairs of `name` dropped or cut for length, each with its count and the settings
    (trainer.max_seq_len, data.max_prompt_len, data.overlong) that did it; none when nothing was lost."""
    total = stats.total()
    limits = f"trainer.max_seq_len={stats.max_seq_len}" + (
        f" or data.max_prompt_len={stats.max_prompt_len}" if stats.max_prompt_len is not None else "")
    read = counted(total.examples + total.dropped, "pair")
    lines = []
    if total.dropped:
        lines.append(f"{total.dropped} of {read} dropped as longer than {limits} (data.overlong={stats.overlong}); "
                     "raise the limit, or set data.overlong=truncate to cut them instead")
    if total.prompt_truncated:
        lines.append(f"{total.prompt_truncated} of {read} had the start of their prompt cut to fit {limits} "
                     "(data.overlong=truncate); raise the limit or set data.overlong=drop")
    if total.answer_truncated:
        lines.append(f"{total.answer_truncated} of {read} had an answer cut at trainer.max_seq_len="
                     f"{stats.max_seq_len} (data.overlong=truncate): a cut answer has no trained EOS; raise "
                     "trainer.max_seq_len or set data.overlong=drop")
    return [f"{WARNING}{name}: {line}" for line in lines]


def format_pair_report(report: PairAuditReport) -> str:
    """The report as text: settings, a table of counts per source, checks and notes, marked pairs."""
    s = report.stats
    lines = [f"Preference data audit: chat_format={s.chat_format} max_seq_len={s.max_seq_len} "
             f"max_prompt_len={s.max_prompt_len} overlong={s.overlong}"]
    lines += count_table(s, ("pairs", "tokens", "label tokens", "truncated", "cut prompts", "cut answers", "dropped",
                             "identical"),
                         lambda c: (c.examples, c.tokens, c.label_tokens, c.truncated, c.prompt_truncated,
                                    c.answer_truncated, c.dropped, c.identical))
    for name, c in s.sources.items():
        if c.dropped:
            lines.append(listed_rows(f"dropped rows in {name}: ", c.dropped_rows, c.dropped))
        if c.identical:
            lines.append(listed_rows(f"identical pairs in {name}: rows ", c.identical_rows, c.identical))
    lines += check_lines(report)
    for source, index, chosen, rejected in report.samples:
        lines += [f"--- {source} row {index}, chosen (trained text in {MARK[0]}{MARK[1]}):", chosen,
                  "--- rejected:", rejected]
    return "\n".join(lines)
