"""Preference pairs: rows -> canonical pairs -> tokenized pairs -> batches, the pair audit, and bad input.

Expected ids come from mistral-common 1.13 (the official Mistral encoders: the whole conversation in
finetuning mode, the prompt alone in test mode) or raw SentencePiece, never from our own Tokenizer.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.data.spec import DataSpec
from mistral_train.data.audit import AuditError
from mistral_train.data.formats import detect_format, to_canonical
from mistral_train.data.preference import PreferencePair, collate_pairs, tokenize_pair, tokenize_pairs
from mistral_train.data.preference_audit import audit_pairs, format_pair_report
from mistral_train.data.sources import load_rows, load_splits
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path
from tests._chat import A, S, U
from tests._tokenizers import bundled, raw_sentencepiece

IGNORE = -100
WHERE = "prefs.jsonl line 3"


STRING_ROW = {"prompt": "What colour is the sky?", "chosen": "Blue, on a clear day.", "rejected": "Green."}
HISTORY = [S("Answer briefly."), U("Name a fruit."), A("An apple."), U("And a vegetable?")]
CONV_ROW = {"prompt": HISTORY, "chosen": [A("A carrot.")], "rejected": [A("A banana, which is a fruit.")]}


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request):
    """(version, our tokenizer, mistral-common test mode, mistral-common finetuning mode, raw sentencepiece)."""
    path = bundled_tokenizer_path(request.param)
    return (request.param, bundled(request.param), getattr(MistralTokenizer, request.param)(),
            MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning), raw_sentencepiece(request.param))


@pytest.fixture(scope="module")
def v1():
    return bundled("v1")


def canon(row, source="prefs.jsonl", index=3, fmt="preference", field_map=None):
    return {**to_canonical(row, fmt, field_map or {}, WHERE), "source": source, "row": index}


def official(mistral_tokenizer, messages):
    return mistral_tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


# --- rows -> canonical pairs ----------------------------------------------------------------------

def test_string_and_conversational_rows_become_trl_conversational_pairs():
    assert to_canonical(STRING_ROW, "preference", {}, WHERE) == {
        "prompt": [U(STRING_ROW["prompt"])], "chosen": [A(STRING_ROW["chosen"])], "rejected": [A(STRING_ROW["rejected"])]}
    assert to_canonical({**CONV_ROW, "score": 7}, "preference", {}, WHERE) == CONV_ROW


def test_implicit_prompt_is_every_shared_turn_before_the_answers():
    row = {"chosen": HISTORY + CONV_ROW["chosen"], "rejected": HISTORY + CONV_ROW["rejected"]}
    assert to_canonical(row, "preference", {}, WHERE) == CONV_ROW
    assert detect_format(row) == "preference"


def test_auto_detection_and_field_map():
    assert detect_format({"prompt": "q", "chosen": "a", "rejected": "b"}) == "preference"
    with pytest.raises(ValueError, match=f"{WHERE}: field 'good' without 'rejected': format preference needs both"):
        detect_format({"prompt": "q", "good": "a"}, {"chosen": "good"}, WHERE)
    fm = {"prompt": "question", "chosen": "good", "rejected": "bad", "role": "from", "content": "text"}
    row = {"question": [{"from": "user", "text": "q"}], "good": [{"from": "assistant", "text": "a"}],
           "bad": [{"from": "assistant", "text": "b"}]}
    assert detect_format(row, fm) == "preference"
    assert to_canonical(row, "preference", fm, WHERE) == {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]}


BAD_ROWS = [
    # (format, row, what the message must say)
    ("preference", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ("auto", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),  # auto: the first row made it preference
    ("preference", {"chosen": "a", "rejected": "b"}, "missing field 'prompt': string answers need the prompt"),
    ("preference", {"chosen": [U("q"), A("a")], "rejected": [U("other q"), A("b")]},
     "the prompt differs between 'chosen' and 'rejected': turn 0"),
    ("preference", {"chosen": [U("q"), A("a"), U("q2"), A("a2")], "rejected": [U("q"), A("b"), U("q2"), A("b2")]},
     "the prompt differs between 'chosen' and 'rejected': turn 1"),
    ("preference", {"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ("preference", {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("")]}, "'rejected' is an empty answer"),
    ("preference", {"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string or list, got int"),
    ("preference", {"prompt": "q", "chosen": [A("a")], "rejected": [A("b")]},
     "must all be strings or all be message lists, got 'prompt': str, 'chosen': list"),
    ("preference", {"prompt": [U("q")], "chosen": [A("a"), U("more?"), A("yes")], "rejected": [A("b")]},
     "'chosen' must hold exactly one assistant message"),
    ("preference", {"prompt": [U("q"), A("early")], "chosen": [A("a")], "rejected": [A("b")]},
     r"prompt \+ chosen\[2\] has role 'assistant' where 'user' was expected"),
    ("preference", {"prompt": [U("q")], "chosen": [{"role": "assistant", "content": 5}], "rejected": [A("b")]},
     r"chosen\[0\].content must be a string, got int"),
]


@pytest.mark.parametrize("fmt, row, message", BAD_ROWS, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD_ROWS)])
def test_bad_rows_name_the_file_and_line(tmp_path, fmt, row, message):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "fine", "chosen": "yes", "rejected": "no"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_rows(DataSpec(path=str(path), format=fmt))
    assert str(info.value).startswith(f"{path} line 2: "), str(info.value)


def test_preference_rows_do_not_mix_with_chat_rows_and_default_to_the_bundled_pairs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(STRING_ROW) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [U("q"), A("a")]}) + "\n")
    rows = load_rows(DataSpec(path=str(tmp_path / "a.jsonl"), format="auto"))
    assert rows.kind == "preference" and rows.formats == {str(tmp_path / "a.jsonl"): "preference"}
    with pytest.raises(ValueError, match="cannot mix chat and preference rows"):
        load_rows(DataSpec(path=str(tmp_path), format="auto"))
    train, held = load_splits(DataSpec(path=None, format="preference"))
    assert train.kind == held.kind == "preference" and len(train) == 600 and len(held) == 100
    assert all(row["answer"] == row["chosen"][0]["content"] for row in held)  # checkable held-out pairs


# --- tokenization ---------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [STRING_ROW, CONV_ROW], ids=["string", "conversational"])
def test_each_sequence_is_the_whole_conversation_encoded_at_once(tok, row):
    """prompt_ids + answer == mistral-common's encoding of the whole conversation; the boundary is where
    mistral-common's prompt alone ends; the answer is SentencePiece's answer + EOS; one BOS."""
    version, ours, test_mode, finetuning, sp = tok
    canonical = canon(row)
    pair = tokenize_pair(canonical, ours, 512)
    assert pair.prompt_ids == official(test_mode, canonical["prompt"])
    for which in ("chosen", "rejected"):
        seq = pair.sequence(which)
        assert seq.input_ids == official(finetuning, canonical["prompt"] + canonical[which])
        answer = canonical[which][0]["content"]
        assert seq.input_ids[pair.completion_start:] == sp.encode(answer) + [sp.eos_id()]
        assert seq.labels == [IGNORE] * pair.completion_start + seq.input_ids[pair.completion_start:]
        assert seq.input_ids.count(ours.bos_id) == 1 and seq.input_ids[0] == ours.bos_id
        assert seq.labels[-1] == ours.eos_id  # EOS closes the answer and is trained
    assert (pair.source, pair.row, pair.truncated, pair.identical) == ("prefs.jsonl", 3, False, False)


def test_history_answers_stay_in_the_prompt_unlabelled(v1):
    pair = tokenize_pair(canon(CONV_ROW), v1, 512)
    seq = pair.sequence("chosen")
    assert sum(y != IGNORE for y in seq.labels) == len(pair.chosen_ids)
    assert v1.decode(pair.prompt_ids).endswith("An apple. [INST] And a vegetable? [/INST]")


def test_implicit_and_explicit_prompts_tokenize_the_same(v1):
    implicit = {"chosen": HISTORY + CONV_ROW["chosen"], "rejected": HISTORY + CONV_ROW["rejected"]}
    assert tokenize_pair(canon(implicit), v1, 512) == tokenize_pair(canon(CONV_ROW), v1, 512)


def test_template_text_in_the_data_never_becomes_a_second_bos(v1):
    """A prompt that already holds a rendered template stays text: exactly one BOS id per sequence."""
    pair = tokenize_pair(canon({"prompt": "<s>[INST] hi [/INST]", "chosen": "</s> yo", "rejected": "no"}), v1, 512)
    for which in ("chosen", "rejected"):
        ids = pair.sequence(which).input_ids
        assert ids.count(v1.bos_id) == 1 and ids.count(v1.eos_id) == 1 and ids[-1] == v1.eos_id


def test_truncation_keeps_bos_the_prompt_end_and_the_answer_start_and_counts_per_source(v1):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    rows = [canon({"prompt": long_prompt, "chosen": "short", "rejected": "also short"}, "a.jsonl", 1),
            canon({"prompt": "q", "chosen": " ".join(["yes"] * 80), "rejected": "no"}, "b.jsonl", 1),
            canon(STRING_ROW, "b.jsonl", 2)]
    full = [tokenize_pair(r, v1, 4096) for r in rows]
    pairs, stats = tokenize_pairs(rows, v1, 48)
    # a: the prompt gives way first (the answers fit whole): BOS + the prompt's last tokens
    cut, whole = pairs[0], full[0]
    assert len(cut.prompt_ids) + len(cut.rejected_ids) == 48 and cut.prompt_truncated
    assert cut.prompt_ids == whole.prompt_ids[:1] + whole.prompt_ids[-(len(cut.prompt_ids) - 1):]
    assert (cut.chosen_ids, cut.rejected_ids) == (whole.chosen_ids, whole.rejected_ids)
    # b: a short prompt stays whole; the long answer keeps its start (and loses its EOS)
    cut, whole = pairs[1], full[1]
    assert cut.prompt_ids == whole.prompt_ids and cut.chosen_ids == whole.chosen_ids[: 48 - len(cut.prompt_ids)]
    assert cut.chosen_truncated and not cut.rejected_truncated and cut.rejected_ids == whole.rejected_ids
    assert pairs[2] == full[2]
    a, b = stats.sources["a.jsonl"], stats.sources["b.jsonl"]
    assert (a.examples, a.truncated, a.prompt_truncated, a.answer_truncated) == (1, 1, 1, 0)
    assert (b.examples, b.truncated, b.prompt_truncated, b.answer_truncated) == (2, 1, 0, 1)
    assert stats.total().truncated == 2 and stats.total().dropped == 0
    # the prompt keeps at least half the window before the answers are cut further
    pair = tokenize_pair(canon({"prompt": long_prompt, "chosen": " ".join(["yes"] * 80), "rejected": "no"}), v1, 48)
    assert len(pair.prompt_ids) == 24 and len(pair.chosen_ids) == 24 and pair.prompt_truncated and pair.chosen_truncated


def test_max_prompt_len_and_overlong_drop(v1):
    long_prompt = " ".join(f"word{i}" for i in range(60))
    rows = [canon({"prompt": long_prompt, "chosen": "short", "rejected": "x"}, "a.jsonl", 7), canon(STRING_ROW, "a.jsonl", 8)]
    pairs, stats = tokenize_pairs(rows, v1, 4096, max_prompt_len=16)  # STRING_ROW's prompt is 14 tokens
    assert len(pairs[0].prompt_ids) == 16 and pairs[0].prompt_truncated and not pairs[1].prompt_truncated
    pairs, stats = tokenize_pairs(rows, v1, 48, overlong="drop")
    assert [p.row for p in pairs] == [8]
    assert (stats.sources["a.jsonl"].dropped, stats.sources["a.jsonl"].dropped_rows) == (1, [7])
    with pytest.raises(ValueError, match="max_prompt_len must be in"):
        tokenize_pairs(rows, v1, 48, max_prompt_len=48)


class _PromptDependsOnAnswer:
    """A tokenizer whose template encodes the prompt differently depending on the answer that follows."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_chat(self, messages, chat_format=None):
        ids, mask = self.inner.encode_chat(messages, chat_format)
        if messages[-1]["content"] == "Green.":
            ids, mask = ids[:1] + [ids[1]] + ids[1:], mask[:1] + [False] + mask[1:]
        return ids, mask


def test_a_prompt_tokenized_differently_for_the_two_answers_is_an_error(v1):
    with pytest.raises(ValueError, match=r"prefs.jsonl row 3: the shared prompt tokenizes differently .* first at token 2"):
        tokenize_pair(canon(STRING_ROW), _PromptDependsOnAnswer(v1), 512)


def test_a_non_canonical_row_is_named(v1):
    with pytest.raises(ValueError, match=r"prefs.jsonl row 3: expected a canonical preference row"):
        tokenize_pair({"messages": [U("q"), A("a")], "source": "prefs.jsonl", "row": 3}, v1, 512)


# --- batches --------------------------------------------------------------------------------------

def _pairs(v1):
    rows = [canon(STRING_ROW, index=1), canon(CONV_ROW, index=2), canon({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, index=3)]
    return tokenize_pairs(rows, v1, 128)[0]


def test_padded_batch_is_chosen_rows_then_rejected_rows(v1):
    pairs = _pairs(v1)
    batch = collate_pairs(pairs, pad_id=v1.eos_id, packing=False, max_seq_len=128)  # pad == EOS on purpose
    sequences = [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "sequence_index"}
    assert batch["input_ids"].shape == (6, max(len(s.input_ids) for s in sequences))
    for k, seq in enumerate(sequences):
        n = len(seq.input_ids)
        assert batch["input_ids"][k, :n].tolist() == seq.input_ids and batch["labels"][k, :n].tolist() == seq.labels
        assert batch["attention_mask"][k].sum() == n and (batch["labels"][k, n:] == IGNORE).all()
        assert batch["sequence_index"][k, :n].eq(k).all() and batch["sequence_index"][k, n:].eq(-1).all()
    # every answer's EOS survives padding with the same id
    assert int((batch["labels"] == v1.eos_id).sum()) == 6


def test_packed_batch_holds_each_sequence_as_a_document(v1):
    pairs = _pairs(v1)
    batch = collate_pairs(pairs, pad_id=0, packing=True, max_seq_len=64)
    sequences = [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < 6
    seen = []
    for n in range(batch["input_ids"].shape[0]):
        index = batch["sequence_index"][n]
        for k in index[index >= 0].unique_consecutive().tolist():
            where = index == k
            seen.append(k)
            assert batch["input_ids"][n][where].tolist() == sequences[k].input_ids
            assert batch["labels"][n][where].tolist() == sequences[k].labels  # BOS label already -100
            assert batch["position_ids"][n][where].tolist() == list(range(len(sequences[k].input_ids)))
        assert (batch["labels"][n][index < 0] == IGNORE).all() and batch["pad_mask"][n].eq(index < 0).all()
    assert sorted(seen) == list(range(6))


def _token_logps(logits, labels):
    """(N, T-1) log p(labels[:, t+1] | tokens <= t), as the DPO step computes it (0 where not a label)."""
    targets = labels[:, 1:].clamp(min=0)
    return F.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_packed_and_padded_batches_give_each_sequence_the_same_summed_logps(v1, our_model, tiny):
    """What the DPO step does with a batch: the model's per-sequence log-probs (`reduction="sequence"`,
    `sequence_index` from the collated batch). Both layouts give each sequence the sums and completion
    lengths of running it alone through full logits."""
    model = our_model(tiny(vocab_size=32000), seed=0)
    pairs = _pairs(v1)
    alone = []
    with torch.no_grad():
        for seq in [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]:
            ids, labels = torch.tensor([seq.input_ids]), torch.tensor([seq.labels])
            keep = labels[:, 1:] != IGNORE
            alone.append(float(_token_logps(model(ids), labels)[keep].sum()))
        padded = collate_pairs(pairs, v1.eos_id, packing=False, max_seq_len=128)
        sums_padded, counts_padded = model(padded["input_ids"], attention_mask=padded["attention_mask"],
                                           labels=padded["labels"], reduction="sequence",
                                           sequence_index=padded["sequence_index"], num_sequences=6)
        packed = collate_pairs(pairs, v1.eos_id, packing=True, max_seq_len=64)
        sums_packed, counts_packed = model(packed["input_ids"], position_ids=packed["position_ids"],
                                           labels=packed["labels"], reduction="sequence",
                                           sequence_index=packed["sequence_index"], num_sequences=6)
    expected_counts = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert counts_padded.tolist() == counts_packed.tolist() == expected_counts
    torch.testing.assert_close(sums_padded, torch.tensor(alone), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums_packed, torch.tensor(alone), rtol=1e-5, atol=1e-4)


# --- the pair audit -------------------------------------------------------------------------------

def test_audit_passes_clean_pairs_and_reports_counts_and_a_marked_pair(v1):
    rows = [canon(STRING_ROW, index=1), canon(CONV_ROW, index=2)]
    pairs, stats = tokenize_pairs(rows, v1, 128)
    report = audit_pairs(pairs, stats, v1, rows=rows,
                         collate=lambda p: collate_pairs(p, v1.eos_id, True, 128, pad_to_max=True))
    text = format_pair_report(report)
    assert "prompt alone tokenizes as inside the pair" in report.checks and "no identical pairs" in report.checks
    assert "collation keeps every label" in report.checks and not report.notes
    assert "prefs.jsonl  " in text and "--- prefs.jsonl row 1, chosen" in text
    assert "[/INST]« Blue, on a clear day.</s>»" in text and "[/INST]« Green.</s>»" in text


def test_identical_pairs_warn_or_stop(v1):
    rows = [canon(STRING_ROW, index=1), canon({"prompt": "q", "chosen": "same", "rejected": "same"}, index=2),
            canon({"prompt": "q", "chosen": "one two three four five six seven eight, then A",
                         "rejected": "one two three four five six seven eight, then B"}, index=3)]
    pairs, stats = tokenize_pairs(rows, v1, 16)  # row 3's answers differ only past the cut
    assert [p.identical for p in pairs] == [False, True, True]
    assert (stats.sources["prefs.jsonl"].identical, stats.sources["prefs.jsonl"].identical_rows) == (2, [2, 3])
    report = audit_pairs(pairs, stats, v1, identical="warn")
    assert report.identical == [("prefs.jsonl", 2), ("prefs.jsonl", 3)]
    assert "2 identical pairs" in format_pair_report(report) and "identical pairs in prefs.jsonl: rows [2, 3]" in \
        format_pair_report(report)
    with pytest.raises(AuditError, match="prefs.jsonl row 2: chosen and rejected are identical"):
        audit_pairs(pairs, stats, v1, identical="error")


def _broken(pair: PreferencePair, **fields) -> PreferencePair:
    return PreferencePair(**{**pair.__dict__, **fields})


def test_audit_catches_each_broken_pair(v1):
    rows = [canon(STRING_ROW)]
    pairs, stats = tokenize_pairs(rows, v1, 128)
    good = pairs[0]
    bos, eos = v1.bos_id, v1.eos_id
    cases = [
        (_broken(good, prompt_ids=[bos] + good.prompt_ids), r"BOS .* at positions \[0, 1\].*\(in prompt \+ chosen\)"),
        (_broken(good, rejected_ids=good.rejected_ids[:-1]), r"EOS \(id 2\) missing from the labels.*prompt \+ rejected"),
        (_broken(good, rejected_ids=[eos] + good.rejected_ids[:-1]), "rejected answer does not end with a trained EOS"),
        (_broken(good, chosen_ids=[eos]), "the chosen answer is empty"),
    ]
    for pair, message in cases:
        with pytest.raises(AuditError, match=message):
            audit_pairs([pair], stats, v1)
    # a prompt that differs from the prompt encoded alone, as a template rendering it differently would
    with pytest.raises(AuditError, match="prefs.jsonl row 3: the prompt encoded alone"):
        audit_pairs([_broken(good, prompt_ids=good.prompt_ids[:-1] + [733])], stats, v1, rows=rows)
    # a collator that masks pad ids equal to EOS loses every EOS label
    def masking(p):
        batch = collate_pairs(p, eos, False, 128, pad_to_max=True)
        batch["labels"][batch["input_ids"] == eos] = IGNORE
        return batch
    with pytest.raises(AuditError, match="after collation the EOS"):
        audit_pairs(pairs, stats, v1, collate=masking)
    with pytest.raises(AuditError, match="no preference pairs left"):
        audit_pairs([], tokenize_pairs(rows, v1, 8, overlong="drop")[1], v1)
