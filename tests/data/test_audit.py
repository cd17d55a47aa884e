"""Pre-flight audit: a clean dataset passes with its counts; each broken case fails on its own,
naming the source and row. Broken cases are built by corrupting clean examples, by a collator
that masks pad tokens when pad == EOS, and by a chat template whose turn boundaries are off."""

import json

import pytest
import sentencepiece
import torch

from mistral_train.config import RunConfig
from mistral_train.data.audit import AuditError, audit, format_report
from mistral_train.data.sft import tokenize_rows
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer, resolve_tokenizer_path
from mistral_train.train.run_data import read_data

IGNORE = -100
TURNS = [("What is two plus two?", "Two plus two is four."), ("And three times three?", "Nine, of course."),
         ("Name a colour.", "The sky is blue today."), ("Say hello.", "Hello there, friend.")]


def chat(*pairs):
    return [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]


ROWS = [
    {"messages": chat(TURNS[0], TURNS[1]), "source": "a.jsonl", "row": 0},
    {"messages": [{"role": "system", "content": "Be kind."}, *chat(TURNS[2])], "source": "a.jsonl", "row": 1},
    {"messages": chat(*TURNS), "source": "a.jsonl", "row": 2},  # over-long: truncated / dropped
    {"messages": chat(TURNS[3]), "source": "b.jsonl", "row": 0},
    {"text": "A short plain document.", "source": "b.jsonl", "row": 1},
]
MAX_LEN = 48


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_tokenizer_path("v3"))


@pytest.fixture
def clean(tokenizer):
    examples, stats = tokenize_rows(ROWS, tokenizer, MAX_LEN)
    return examples, stats


def find(examples, source, row):
    return next(e for e in examples if (e.source, e.row) == (source, row))


def test_clean_dataset_passes_and_reports_counts(tokenizer, clean):
    examples, stats = clean
    sp = sentencepiece.SentencePieceProcessor(model_file=str(bundled_tokenizer_path("v3")))
    report = audit(examples, stats, tokenizer, rows=ROWS)
    assert not report.notes and "round trip of trained spans" in report.checks
    a, b = report.stats.sources["a.jsonl"], report.stats.sources["b.jsonl"]
    # label tokens counted independently: each answer's SentencePiece ids + EOS (b: the text + EOS)
    answers = [TURNS[0][1], TURNS[1][1], TURNS[2][1]]
    truncated = find(examples, "a.jsonl", 2)
    assert a.label_tokens == sum(len(sp.encode(x)) + 1 for x in answers) + sum(y != IGNORE for y in truncated.labels)
    assert b.label_tokens == len(sp.encode(TURNS[3][1])) + 1 + len(sp.encode("A short plain document.")) + 1
    assert (a.examples, a.truncated, a.dropped, b.examples, b.truncated, b.dropped) == (3, 1, 0, 2, 0, 0)
    text = format_report(report)
    table = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in text.splitlines()
             if line.split() and line.split()[0] in ("a.jsonl", "b.jsonl", "total")}
    assert table["a.jsonl"] == [3, a.tokens, a.label_tokens, 1, 0, 0, 0]  # no tool calls, no reasoning
    assert table["total"] == [5, a.tokens + b.tokens, a.label_tokens + b.label_tokens, 1, 0, 0, 0]
    assert "«Two plus two is four.</s>»" in text and "«Hello there, friend.</s>»" in text  # one sample per source
    assert "[INST]What is two plus two?[/INST]«" in text  # the prompt is shown outside the marks


def test_dropped_rows_are_listed_and_an_empty_dataset_fails(tokenizer):
    examples, stats = tokenize_rows(ROWS[:3], tokenizer, MAX_LEN, overlong="drop")
    text = format_report(audit(examples, stats, tokenizer, rows=ROWS))
    assert "dropped rows in a.jsonl: [2]" in text
    examples, stats = tokenize_rows(ROWS[2:3], tokenizer, MAX_LEN, overlong="drop")
    with pytest.raises(AuditError, match=r"no examples left to train on: a\.jsonl: 1 row dropped as longer than "
                                          r"trainer\.max_seq_len=48 \(data\.overlong=drop; rows \[2\]\)"):
        audit(examples, stats, tokenizer)


def test_all_labels_masked_in_one_example(tokenizer, clean):
    examples, stats = clean
    find(examples, "b.jsonl", 0).labels[:] = [IGNORE] * len(find(examples, "b.jsonl", 0).labels)
    with pytest.raises(AuditError, match=r"b\.jsonl row 0: all labels are masked"):
        audit(examples, stats, tokenizer)


def test_all_labels_masked_in_the_whole_dataset(tokenizer, clean):
    examples, stats = clean
    for ex in examples:  # what a completion mask that never finds the response template gives
        ex.labels[:] = [IGNORE] * len(ex.labels)
    with pytest.raises(AuditError, match=r"every label in the dataset is masked \(5 examples, first a\.jsonl row 0\)"):
        audit(examples, stats, tokenizer)


def test_double_bos(tokenizer, clean):
    examples, stats = clean
    ex = find(examples, "a.jsonl", 1)
    ex.input_ids.insert(0, tokenizer.bos_id)  # data that already starts with <s>, plus the template's
    ex.labels.insert(0, IGNORE)
    with pytest.raises(AuditError, match=r"a\.jsonl row 1: BOS \(id 1\) at positions \[0, 1\]; expected exactly one"):
        audit(examples, stats, tokenizer)


def test_eos_missing_from_labels(tokenizer, clean):
    examples, stats = clean
    ex = find(examples, "b.jsonl", 0)  # as a template that never emits EOS would produce it
    keep = [t for t, i in enumerate(ex.input_ids) if i != tokenizer.eos_id]
    ex.input_ids[:], ex.labels[:] = [ex.input_ids[t] for t in keep], [ex.labels[t] for t in keep]
    with pytest.raises(AuditError, match=r"b\.jsonl row 0: EOS \(id 2\) missing from the labels"):
        audit(examples, stats, tokenizer)


def test_eos_present_but_masked(tokenizer, clean):
    examples, stats = clean
    ex = find(examples, "a.jsonl", 0)
    ex.labels[ex.labels.index(tokenizer.eos_id)] = IGNORE
    with pytest.raises(AuditError, match=r"a\.jsonl row 0: the EOS at position \d+ closes a trained span but its "
                                         r"label is masked"):
        audit(examples, stats, tokenizer)


def pad_collator(pad_id, mask_by_id):
    """Right-pads to MAX_LEN. mask_by_id=True is the classic bug: labels[input_ids == pad_id] = -100."""

    def collate(examples):
        ids = torch.full((len(examples), MAX_LEN), pad_id)
        labels = torch.full((len(examples), MAX_LEN), IGNORE)
        for b, ex in enumerate(examples):
            ids[b, :len(ex.input_ids)], labels[b, :len(ex.labels)] = torch.tensor(ex.input_ids), torch.tensor(ex.labels)
        if mask_by_id:
            labels[ids == pad_id] = IGNORE
        return {"input_ids": ids, "labels": labels}

    return collate


def test_pad_equals_eos_masking_eos(tokenizer, clean):
    examples, stats = clean
    eos = tokenizer.eos_id
    with pytest.raises(AuditError, match=r"a\.jsonl row 0: after collation the EOS at position \d+ is not a label: "
                                         r"pad id 2 equals EOS id 2 and the collator masks pad tokens"):
        audit(examples, stats, tokenizer, pad_id=eos, collate=pad_collator(eos, mask_by_id=True))
    # the same collator is harmless when pad != eos, and pad == eos is fine when padding is masked by position
    for pad_id, by_id in ((0, True), (eos, False)):
        report = audit(examples, stats, tokenizer, pad_id=pad_id, collate=pad_collator(pad_id, by_id))
        assert any(c.startswith("collation keeps every label") for c in report.checks)
    note = audit(examples, stats, tokenizer, pad_id=eos).notes
    assert any("EOS labels after collation not verified" in n for n in note)


class LateMaskTemplate:
    """A real tokenizer whose chat template marks each answer one token late (wrong turn boundary)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_chat(self, messages, chat_format=None):
        ids, mask = self.inner.encode_chat(messages, chat_format)
        return ids, [m and t > 0 and mask[t - 1] for t, m in enumerate(mask)]


def test_template_that_does_not_round_trip(tokenizer):
    broken = LateMaskTemplate(tokenizer)
    examples, stats = tokenize_rows(ROWS, broken, MAX_LEN)  # every other check passes on these
    report = audit(examples, stats, broken)
    assert report.notes == ["round trip not checked: no rows given"]
    with pytest.raises(AuditError, match=r"a\.jsonl row 0: round trip failed: trained span 0 decodes to "
                                         r"'plus two is four\.', expected 'Two plus two is four\.'"):
        audit(examples, stats, broken, rows=ROWS)


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_a_corrupted_trained_token_fails_the_round_trip(tokenizer, train_on):
    examples, stats = tokenize_rows(ROWS, tokenizer, MAX_LEN, train_on=train_on)
    ex = find(examples, "b.jsonl", 0)
    t = len(ex.input_ids) - 3  # inside the answer
    ex.input_ids[t] = ex.labels[t] = tokenizer.encode("banana")[0]
    with pytest.raises(AuditError, match=r"b\.jsonl row 0: round trip failed"):
        audit(examples, stats, tokenizer, rows=ROWS)


def test_labels_must_be_aligned_not_shifted(tokenizer, clean):
    examples, stats = clean
    ex = find(examples, "a.jsonl", 1)
    ex.labels[:] = ex.labels[1:] + [IGNORE]  # pre-shifted labels: the model would shift them twice
    with pytest.raises(AuditError, match=r"a\.jsonl row 1: label \d+ at position \d+ but input \d+"):
        audit(examples, stats, tokenizer)


def run_audit(cfg: RunConfig):
    """What `mistral-train audit` reads for one stage (cli.cmd_audit): the run's data, with its tokenizer."""
    return read_data(cfg, load_tokenizer(resolve_tokenizer_path(cfg.model.tokenizer, cfg.model.path)), check=False)


@pytest.mark.parametrize("packing", [True, False])
def test_run_audit_reads_tokenizes_collates_and_audits(tmp_path, packing):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in ROWS if "messages" in r))
    cfg = RunConfig()
    cfg.model.tokenizer, cfg.trainer.max_seq_len, cfg.trainer.batch_size = "bundled:v3", MAX_LEN, 1
    cfg.trainer.objective = "sft"
    cfg.data.path, cfg.data.format, cfg.data.packing = str(path), "messages", packing
    cfg.data.train_on = "last_assistant"
    report = run_audit(cfg).report
    counts = report.stats.sources[str(path)]
    # line 3 is cut before its last answer: nothing left to train on, so it is dropped (and listed)
    assert (counts.examples, counts.dropped, counts.dropped_rows) == (3, 1, [3])
    assert report.stats.train_on == "last_assistant" and "round trip of trained spans" in report.checks
    assert "collation keeps every label (pad id == EOS id)" in report.checks  # v3 has no pad: EOS stands in
    cfg.data.train_on = "all"
    assert run_audit(cfg).report.stats.sources[str(path)].truncated == 1
