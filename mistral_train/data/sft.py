"""SFT tokenization: canonical rows -> (input_ids, labels) with the trained spans marked.

A chat row is encoded ONCE, whole, by the tokenizer's chat template; the label mask comes from
the template's own turn boundaries (`Tokenizer.encode_chat` returns the ids and a mask over each
assistant answer + its EOS). Nothing is tokenized piece by piece and matched up afterwards, which
is how completion masks silently come out empty with SentencePiece tokenizers.

Labels are aligned with input_ids (-100 where not trained); the model shifts them. Rows are the
canonical rows of `data/sources.py`: `{"messages": [{"role", "content"}, ...], "source", "row"}`
(optionally `"tools"`: OpenAI tool definitions; messages as chat_messages.py reads them: tool calls,
tool results, reasoning, `weight`), or `{"text": ..., "source", "row"}` for documents inside SFT
data. Trained: assistant answers, their reasoning and tool calls; never system prompts, user turns,
tool results or tool definitions, nor an answer with weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Iterable, Mapping, Optional

from mistral_train.losses.ce import IGNORE_INDEX

TRAIN_ON = ("assistant", "last_assistant", "all")
OVERLONG = ("truncate", "drop")
_MAX_LISTED = 5  # row numbers listed per source for the report (dropped, identical)


@dataclass
class SFTExample:
    """One tokenized row. `input_ids` and `labels` have the same length T <= max_seq_len."""

    input_ids: list[int]
    labels: list[int]  # input_ids where trained, -100 elsewhere; aligned (not shifted)
    source: str
    row: int
    truncated: bool


@dataclass
class SourceStats:
    """Counts for one data source (a file, or the name `sources.py` gives it)."""

    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0  # labels != -100
    truncated: int = 0  # kept, cut to max_seq_len
    dropped: int = 0  # over-long rows removed (overlong=drop, or nothing trained left after the cut)
    dropped_rows: list[int] = field(default_factory=list)  # the first few, for the report
    tool_calls: int = 0  # trained [TOOL_CALLS] tokens (one per call from v11, one per answer before)
    reasoning: int = 0  # trained [THINK] tokens (one per reasoning chunk)

    def count_row(self, what: str, row: int) -> None:
        """Count a row as `what` ("dropped"; pairs: "identical"), listing the first few row numbers for the report."""
        setattr(self, what, getattr(self, what) + 1)
        if len(getattr(self, f"{what}_rows")) < _MAX_LISTED:
            getattr(self, f"{what}_rows").append(row)


@dataclass
class Stats:
    """What a tokenization pass did (SFT examples, or preference pairs): its settings, the counts per source."""

    overlong: str
    max_seq_len: int
    chat_format: str  # the resolved format (v1 | v2 | v3)
    sources: dict[str, SourceStats] = field(default_factory=dict)
    counts: ClassVar[type] = SourceStats  # what one source's counts are

    def source(self, name: str) -> SourceStats:
        return self.sources.setdefault(name, self.counts())

    def total(self) -> SourceStats:
        out = self.counts()
        for counts in self.sources.values():
            for f in fields(out):
                value = getattr(counts, f.name)
                if isinstance(value, int):  # the listed row numbers stay per source
                    setattr(out, f.name, getattr(out, f.name) + value)
        return out


@dataclass
class SFTStats(Stats):
    """What `tokenize_rows` did."""

    train_on: str = "assistant"


def row_where(row: Mapping) -> tuple[str, int, str]:
    """(source, row number, 'SOURCE row N') of a canonical row; both keys are required."""
    if not isinstance(row, Mapping) or "source" not in row or "row" not in row:
        got = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise ValueError(f"expected a canonical row with 'source' and 'row' keys (from data/sources.py), got {got}")
    return str(row["source"]), int(row["row"]), f"{row['source']} row {row['row']}"


def assistant_spans(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True in `mask` (T,)."""
    spans, start = [], None
    for t, flag in enumerate([*mask, False]):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _chat(messages, tokenizer, train_on: str, chat_format: Optional[str], where: str,
          tools: Optional[list] = None) -> tuple[list[int], list[int]]:
    try:
        ids, mask = tokenizer.encode_chat(messages, chat_format, **({"tools": tools} if tools else {}))
    except ValueError as err:  # malformed conversation: say which row
        raise ValueError(f"{where}: {err}") from err
    spans = assistant_spans(mask)
    # weight 0 answers are not trained; v2 also writes no tool calls before the last user turn
    n_answers = sum(m.get("role") == "assistant" and m.get("weight", 1) != 0 for m in messages)
    if len(spans) > n_answers or (n_answers and not spans):
        raise ValueError(f"{where}: the chat template marked {len(spans)} assistant spans for {n_answers} "
                         "trained assistant messages; expected one span per answer")
    for k, (start, end) in enumerate(spans):
        if ids[end - 1] != tokenizer.eos_id:
            raise ValueError(f"{where}: assistant turn {k} is not closed by EOS (id {tokenizer.eos_id}); its "
                             f"span ends with id {ids[end - 1]}. The chat template must end every answer with EOS")
    if train_on == "all":
        keep = [False] + [True] * (len(ids) - 1)  # BOS is never a target
    elif train_on == "assistant":
        keep = list(mask)
    else:
        keep = [False] * len(ids)
        if spans:
            start, end = spans[-1]
            keep[start:end] = [True] * (end - start)
    return ids, [i if k else IGNORE_INDEX for i, k in zip(ids, keep)]


def _text(text, tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    ids = tokenizer.encode(text, bos=True, eos=True)
    return ids, [IGNORE_INDEX] + ids[1:]


def tokenize_conversation(row: Mapping, tokenizer, max_seq_len: int, train_on: str = "assistant",
                          overlong: str = "truncate", chat_format: Optional[str] = None) -> Optional[SFTExample]:
    """Tokenize one canonical row (chat or text) into an SFTExample, or None when it is dropped.

    train_on: "assistant" trains every assistant answer + its EOS; "last_assistant" only the final
        one; "all" every token but the BOS. Text rows are BOS + text + EOS, all trained but the BOS.
    overlong: "truncate" keeps the first `max_seq_len` tokens (an example left with nothing to
        train on is dropped: it would teach nothing); "drop" returns None for any longer row.
    Raises ValueError naming the source and row for a malformed row, or a template that does not
    close every assistant answer with EOS.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.train_on {train_on!r} unknown; expected one of {TRAIN_ON}")
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong {overlong!r} unknown; expected one of {OVERLONG}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS and one trained token), got {max_seq_len}")
    source, index, where = row_where(row)
    if "messages" in row:
        ids, labels = _chat(row["messages"], tokenizer, train_on, chat_format, where, row.get("tools"))
    elif "text" in row:
        ids, labels = _text(row["text"], tokenizer, where)
    else:
        raise ValueError(f"{where}: expected a 'messages' or a 'text' field, got fields {sorted(row)}")
    truncated = len(ids) > max_seq_len
    if truncated:
        if overlong == "drop":
            return None
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            return None
    return SFTExample(ids, labels, source, index, truncated)


def tokenize_rows(rows: Iterable[Mapping], tokenizer, max_seq_len: int, train_on: str = "assistant",
                  overlong: str = "truncate", chat_format: Optional[str] = None) -> tuple[list[SFTExample], SFTStats]:
    """Tokenize every row (see `tokenize_conversation`); return the kept examples and the counts
    per source, so truncated and dropped rows are always reported, never silent."""
    stats = SFTStats(overlong, max_seq_len, tokenizer.chat_format(chat_format), train_on=train_on)
    control = getattr(tokenizer, "control_id", lambda token: None)
    tool_call, think = control("[TOOL_CALLS]"), control("[THINK]")  # None: never equal to a label
    examples = []
    for row in rows:
        example = tokenize_conversation(row, tokenizer, max_seq_len, train_on, overlong, chat_format)
        source, index, _ = row_where(row)
        counts = stats.source(source)
        if example is None:
            counts.count_row("dropped", index)
            continue
        examples.append(example)
        counts.examples += 1
        counts.tokens += len(example.input_ids)
        counts.label_tokens += sum(label != IGNORE_INDEX for label in example.labels)
        counts.truncated += example.truncated
        counts.tool_calls += sum(label == tool_call for label in example.labels)
        counts.reasoning += sum(label == think for label in example.labels)
    return examples, stats
