"""Pre-flight audit of tokenized SFT data: counts per source, label checks, marked samples.

Run before step 1 (and alone by `mistral-train audit recipe=...`). Any failing check raises
`AuditError` naming the source and row, so a run never trains on labels it cannot trust:
- at least one trained label per example (and in the dataset as a whole);
- exactly one BOS, at position 0;
- labels aligned with input_ids (each label is -100 or the input token at the same position);
- an EOS that closes a trained span is itself trained, and every complete example trains an EOS;
- round trip: decoding the trained tokens gives back what the row asked to train on. Each trained
  assistant span, decoded without special tokens, must equal that answer's content (text rows:
  the text; train_on=all: every answer, in order, inside the decoded text). Compared after
  stripping surrounding whitespace, because templates legitimately move spaces at the edges
  (SentencePiece's dummy prefix, v3 dropping trailing spaces); anything else, such as a mask
  shifted by one token or a tokenizer that loses characters, fails. This holds for every
  template, unlike re-encoding the decoded ids, which control tokens ([INST]) never survive;
- collation keeps every label (optional `collate`): with pad id == EOS id, a collator that masks
  labels wherever the input is the pad id silently loses every EOS label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from mistral_train.data.epochs import WARNING
from mistral_train.data.sft import SFTExample, SFTStats, SourceStats, Stats, assistant_spans
from mistral_train.errors import UserError
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.wording import counted

Collate = Callable[[list[SFTExample]], Mapping[str, torch.Tensor]]
MARK = ("«", "»")  # wraps trained text in the decoded samples
_SHOW_CHARS = 1200


class AuditError(UserError):
    """A check failed; the message names the source and row (a user error: cli.py prints it as one line)."""


@dataclass
class AuditReport:
    """What an audit found (SFT examples here; preference pairs extend it)."""

    stats: Stats
    checks: list[str]  # checks that ran and passed
    notes: list[str] = field(default_factory=list)  # checks not run, and why
    samples: list[tuple] = field(default_factory=list)  # (source, row, marked text(s))


def located(item) -> str:
    """'SOURCE row N' of an example or a pair (anything with `source` and `row`)."""
    return f"{item.source} row {item.row}"


def dropped_eos_labels(input_ids: torch.Tensor, labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(K, 2) positions (b, t) of (B, T) rows where an EOS closes a trained token but is not
    itself trained. An EOS right after another EOS is skipped: that is padding when pad == eos."""
    closes = (input_ids[:, 1:] == eos_id) & (input_ids[:, :-1] != eos_id) & (labels[:, :-1] != IGNORE_INDEX)
    bad = closes & (labels[:, 1:] != eos_id)
    return bad.nonzero() + torch.tensor([0, 1])


def check_labels(ex: SFTExample, tokenizer) -> None:
    where, ids, labels = located(ex), ex.input_ids, ex.labels
    if len(ids) != len(labels) or not ids:
        raise AuditError(f"{where}: {counted(len(ids), 'input id')} but {counted(len(labels), 'label')}; expected "
                         "equal, non-zero lengths")
    bos = [t for t, i in enumerate(ids) if i == tokenizer.bos_id]
    if bos != [0]:
        raise AuditError(f"{where}: BOS (id {tokenizer.bos_id}) at positions {bos[:5]}; expected exactly one BOS, "
                         "at position 0 (a template or data that adds its own BOS doubles it)")
    stray = next((t for t, (i, y) in enumerate(zip(ids, labels)) if y not in (IGNORE_INDEX, i)), None)
    if stray is not None:
        raise AuditError(f"{where}: label {labels[stray]} at position {stray} but input {ids[stray]}; labels must be "
                         "-100 or equal to input_ids (aligned; the model shifts them)")
    if all(y == IGNORE_INDEX for y in labels[1:]):
        raise AuditError(f"{where}: all labels are masked (-100); the example trains nothing")
    bad = dropped_eos_labels(torch.tensor([ids]), torch.tensor([labels]), tokenizer.eos_id)
    if len(bad):
        raise AuditError(f"{where}: the EOS at position {int(bad[0, 1])} closes a trained span but its label is "
                         "masked; EOS must be a label, or the model never learns to stop")
    if not ex.truncated and tokenizer.eos_id not in labels:
        raise AuditError(f"{where}: EOS (id {tokenizer.eos_id}) missing from the labels; every trained answer "
                         "must end with a trained EOS")


def _expected_texts(row: Mapping, train_on: str, chat_format: str) -> list[tuple[bool, tuple[str, ...]]]:
    """What each trained span decodes to: (True, (answer,)) for a plain answer, compared whole; else
    (False, fragments): its reasoning, text and tool names, to be found in that order (the call's
    JSON or [ARGS] surround them). Weight-0 answers are not trained, nor v2's tool calls before the
    last user turn."""
    if "text" in row:
        return [(True, (row["text"].strip(),))]
    msgs = row["messages"]
    last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
    out = []
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant" or m.get("weight", 1) == 0 or (
                chat_format == "v2" and m.get("tool_calls") and i < last_user):
            continue
        content, reasoning = m.get("content"), m.get("reasoning_content", m.get("reasoning"))
        if isinstance(content, str) and not m.get("tool_calls") and reasoning is None:
            out.append((True, (content.strip(),)))
            continue
        parts = [reasoning] + ([c.get("thinking") or c.get("text") for c in content] if isinstance(content, list)
                               else [content]) + [c["function"]["name"] for c in m.get("tool_calls") or []]
        out.append((False, tuple(p.strip() for p in parts if p and p.strip())))
    return out[-1:] if train_on == "last_assistant" else out


def _find_in_order(text: str, fragments: Sequence[str]) -> Optional[str]:
    """The first fragment not found in `text` after the previous one, None when all are."""
    cursor = 0
    for fragment in fragments:
        found = text.find(fragment, cursor)
        if found < 0:
            return fragment
        cursor = found + len(fragment)
    return None


def check_round_trip(ex: SFTExample, row: Mapping, tokenizer, train_on: str, chat_format: Optional[str] = None) -> None:
    runs = assistant_spans([y != IGNORE_INDEX for y in ex.labels])
    if ex.truncated:  # the cut run is partial by design; check the complete ones
        runs = [(s, e) for s, e in runs if ex.input_ids[e - 1] == tokenizer.eos_id]
    decoded = [tokenizer.decode(ex.input_ids[s:e]).strip() for s, e in runs]
    expected = _expected_texts(row, train_on, chat_format or tokenizer.chat_format())
    if "messages" in row and train_on == "all":  # one run: the answers must appear in it, in order
        missing = _find_in_order(decoded[0], [f for _, frags in expected for f in frags]) if decoded else None
        if missing is not None:
            raise AuditError(f"{located(ex)}: round trip failed: answer text {missing[:60]!r} is not in the decoded "
                             f"trained text {decoded[0][:200]!r}")
        return
    if len(decoded) > len(expected) or (not ex.truncated and len(decoded) != len(expected)):
        raise AuditError(f"{located(ex)}: round trip failed: {counted(len(decoded), 'trained span')} for "
                         f"{counted(len(expected), 'text')} to train on (train_on={train_on})")
    for k, (got, (whole, want)) in enumerate(zip(decoded, expected)):
        if (got != want[0]) if whole else _find_in_order(got, want) is not None:
            wanted = repr(want[0][:120]) if whole else f"to hold {list(want)!r} in order"
            raise AuditError(f"{located(ex)}: round trip failed: trained span {k} decodes to {got[:120]!r}, "
                             f"expected {wanted}; the template's turn boundaries or the tokenizer are wrong")


def _check_collated(ex: SFTExample, collate: Collate, eos_id: int, pad_id: Optional[int]) -> None:
    batch = collate([ex])
    ids, labels = batch["input_ids"], batch["labels"]  # (B, T) each
    bad = dropped_eos_labels(ids, labels, eos_id)
    if len(bad):
        why = (f"pad id {pad_id} equals EOS id {eos_id} and the collator masks pad tokens, so every EOS label is lost"
               if pad_id == eos_id else "the collator masked an EOS label")
        raise AuditError(f"{located(ex)}: after collation the EOS at position {int(bad[0, 1])} is not a label: {why}")
    kept, wanted = int((labels[:, 1:] != IGNORE_INDEX).sum()), sum(y != IGNORE_INDEX for y in ex.labels[1:])
    if kept != wanted:
        raise AuditError(f"{located(ex)}: the collator kept {kept} of the example's {wanted} label tokens")


def mark_trained(ex: SFTExample, tokenizer) -> str:
    """The example decoded with special tokens, each trained span wrapped in «». A segment's text
    is the growth of the decoded prefix, so the spaces between segments come out as in the whole."""
    flags = [y != IGNORE_INDEX for y in ex.labels]
    cuts = [0] + [t for t in range(1, len(flags)) if flags[t] != flags[t - 1]] + [len(flags)]
    parts, before = [], ""
    for a, b in zip(cuts, cuts[1:]):
        upto = tokenizer.decode(ex.input_ids[:b], skip_special=False)
        if upto.startswith(before):
            part = upto[len(before):]
        else:  # a byte-fallback character split at the boundary: decode the segment alone
            part = tokenizer.decode(ex.input_ids[a:b], skip_special=False)
        parts.append(f"{MARK[0]}{part}{MARK[1]}" if flags[a] else part)
        before = upto
    text = "".join(parts)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + " …"


def audit(examples: Sequence[SFTExample], stats: SFTStats, tokenizer, pad_id: Optional[int] = None, n_show: int = 2,
          rows: Optional[Iterable[Mapping]] = None, collate: Optional[Collate] = None) -> AuditReport:
    """Check `examples` (from `tokenize_rows`, with its `stats`) and report; raise AuditError on failure.

    rows: the canonical rows the examples came from (matched by source and row) for the round-trip
        check; without them that check is listed as not run.
    collate: called as `collate([example])`, returning (B, T) "input_ids" and "labels" as training
        sees them; checks collation keeps every label (EOS included, whatever `pad_id` is).
    """
    if not examples:
        raise AuditError(f"no examples left to train on: {_describe_drops(stats)}")
    if all(all(y == IGNORE_INDEX for y in ex.labels[1:]) for ex in examples):
        raise AuditError(f"every label in the dataset is masked ({counted(len(examples), 'example')}, first "
                         f"{located(examples[0])}); check data.train_on={stats.train_on} and the chat template")
    by_key = rows_by_key(rows)
    for ex in examples:
        check_labels(ex, tokenizer)
        if by_key is not None:
            check_round_trip(ex, source_row(ex, by_key), tokenizer, stats.train_on, stats.chat_format)
        if collate is not None:
            _check_collated(ex, collate, tokenizer.eos_id, pad_id)
    checks = ["at least one label token per example", "exactly one BOS, at position 0",
              "labels aligned with input_ids", "EOS closing a trained span is trained",
              "EOS among the labels of every complete example"]
    notes = []
    if by_key is not None:
        checks.append("round trip of trained spans")
    else:
        notes.append("round trip not checked: no rows given")
    if collate is not None:
        checks.append("collation keeps every label" + (" (pad id == EOS id)" if pad_id == tokenizer.eos_id else ""))
    elif pad_id is not None and pad_id == tokenizer.eos_id:
        notes.append(f"pad id {pad_id} equals EOS id and no collator was given: "
                     "EOS labels after collation not verified")
    return AuditReport(stats, checks, notes, [(ex.source, ex.row, mark_trained(ex, tokenizer))
                                              for ex in pick_samples(examples, n_show)])


def rows_by_key(rows: Optional[Iterable[Mapping]]) -> Optional[dict[tuple[str, int], Mapping]]:
    """Canonical rows by (source, row), for checks that compare tokens with the row they came from."""
    return None if rows is None else {(str(r["source"]), int(r["row"])): r for r in rows}


def source_row(item, by_key: dict[tuple[str, int], Mapping]) -> Mapping:
    """The canonical row an example or pair (anything with `source` and `row`) came from."""
    if (item.source, item.row) not in by_key:
        raise AuditError(f"{located(item)}: no such row among the rows given for the round-trip check")
    return by_key[(item.source, item.row)]


def pick_samples(items: Sequence, n: int) -> list:
    """Up to n items to show (examples or pairs, anything with a `source`): one per source first, then the next ones."""
    firsts: dict[str, object] = {}
    for item in items:
        firsts.setdefault(item.source, item)
    picked = list(firsts.values())[:n]
    return picked + [item for item in items if all(item is not p for p in picked)][: n - len(picked)]


def _describe_drops(stats: SFTStats) -> str:
    return "; ".join(f"{name}: {counted(s.dropped, 'row')} dropped as longer than trainer.max_seq_len="
                     f"{stats.max_seq_len} (data.overlong={stats.overlong}; rows {s.dropped_rows})"
                     for name, s in stats.sources.items()) or "no rows were read"


def length_warnings(stats: SFTStats, name: str) -> list[str]:
    """"warning: " lines for the examples of `name` that tokenization dropped or cut for length, each with
    its count and the settings (trainer.max_seq_len, data.overlong) that did it; none when nothing was lost."""
    total, limit = stats.total(), f"trainer.max_seq_len={stats.max_seq_len}"
    read = counted(total.examples + total.dropped, "example")
    lines = []
    if total.dropped and stats.overlong == "drop":
        lines.append(f"{total.dropped} of {read} dropped as longer than {limit} (data.overlong=drop); raise "
                     f"trainer.max_seq_len, or set data.overlong=truncate to train their first tokens")
    elif total.dropped:
        lines.append(f"{total.dropped} of {read} dropped: cut to {limit} (data.overlong=truncate), nothing "
                     "trained was left (the prompt fills the limit); raise trainer.max_seq_len")
    if total.truncated:
        lines.append(f"{total.truncated} of {read} cut to their first {stats.max_seq_len} tokens ({limit}, "
                     "data.overlong=truncate): what follows is not trained; raise trainer.max_seq_len or set "
                     "data.overlong=drop")
    return [f"{WARNING}{name}: {line}" for line in lines]


def count_table(stats: Stats, header: Sequence[str], values: Callable[[SourceStats], Sequence[int]]) -> list[str]:
    """A table of counts, one row per source of `stats` and the total, columns `header`."""
    width = max([len(n) for n in stats.sources] + [6])

    def row(name: str, counts: SourceStats) -> str:
        return f"{name:<{width}}  " + "  ".join(f"{v:>12}" for v in values(counts))

    lines = [f"{'source':<{width}}  " + "  ".join(f"{h:>12}" for h in header)]
    return lines + [row(name, c) for name, c in stats.sources.items()] + [row("total", stats.total())]


def listed_rows(head: str, rows: list[int], count: int) -> str:
    """'dropped rows in NAME: [3, 9] ...': `head`, then the rows (the dots when only the first few of `count`)."""
    return f"{head}{rows}{' ...' if count > len(rows) else ''}"


def check_lines(report: AuditReport) -> list[str]:
    return [f"passed: {check}" for check in report.checks] + [f"note: {note}" for note in report.notes]


def format_report(report: AuditReport) -> str:
    """The report as text: settings, a table of counts per source, checks, marked samples."""
    s = report.stats
    lines = [f"SFT data audit: train_on={s.train_on} chat_format={s.chat_format} max_seq_len={s.max_seq_len} "
             f"overlong={s.overlong}"]
    lines += count_table(s, ("examples", "tokens", "label tokens", "truncated", "dropped", "tool calls", "reasoning"),
                         lambda c: (c.examples, c.tokens, c.label_tokens, c.truncated, c.dropped, c.tool_calls,
                                    c.reasoning))
    lines += [listed_rows(f"dropped rows in {name}: ", c.dropped_rows, c.dropped)
              for name, c in s.sources.items() if c.dropped]
    lines += check_lines(report)
    for source, index, text in report.samples:
        lines += [f"--- {source} row {index} (trained text in {MARK[0]}{MARK[1]}):", text]
    return "\n".join(lines)
