"""Unpaired preferences (KTO): rows -> canonical rows -> tokenized examples -> batches with the mismatched
(KL) sequences, the bundled files, and bad input.

Expected ids come from mistral-common 1.13 (the whole conversation in finetuning mode, the prompt alone
in test mode); expected batches from trl 1.16's own collator (DataCollatorForUnpairedPreference).
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.data.formats import detect_format, format_kind, to_canonical
from mistral_train.data.sources import bundled_unpaired_path, load_rows, load_splits
from mistral_train.data.spec import DataSpec
from mistral_train.data.unpaired import UnpairedCollate, mismatched_part, num_examples, tokenize_unpaired
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path
from tests._chat import A, S, U
from tests._tokenizers import bundled

IGNORE = -100
WHERE = "kto.jsonl line 2"
STRING_ROW = {"prompt": "What colour is the sky?", "completion": "Blue, on a clear day.", "label": True}
CONV_ROW = {"prompt": [S("Answer briefly."), U("Name a fruit."), A("An apple."), U("And a vegetable?")],
            "completion": [A("A banana, which is a fruit.")], "label": False}
ROOT = Path(__file__).resolve().parents[2]


def canon(row, index=2, fmt="unpaired"):
    return {**to_canonical(row, fmt, {}, WHERE), "source": "kto.jsonl", "row": index}


@pytest.fixture(scope="module")
def v1():
    return bundled("v1")


def test_string_and_conversational_rows_become_trl_conversational_rows():
    assert to_canonical(STRING_ROW, "unpaired", {}, WHERE) == {
        "prompt": [U(STRING_ROW["prompt"])], "completion": [A(STRING_ROW["completion"])], "label": True}
    assert to_canonical({**CONV_ROW, "score": 3}, "unpaired", {}, WHERE) == CONV_ROW  # other fields are not read
    assert to_canonical({**STRING_ROW, "answer": "blue"}, "unpaired", {}, WHERE)["answer"] == "blue"
    # auto: a label makes a prompt/completion row unpaired; without one it stays an SFT row
    assert detect_format(STRING_ROW) == "unpaired"
    assert detect_format({"prompt": "q", "completion": "a"}) == "prompt_completion"
    assert format_kind("unpaired") == "unpaired"
    fm = {"prompt": "question", "completion": "reply", "label": "good"}
    assert detect_format({"question": "q", "reply": "a", "good": False}, fm) == "unpaired"
    assert to_canonical({"question": "q", "reply": "a", "good": False}, "unpaired", fm, WHERE) == {
        "prompt": [U("q")], "completion": [A("a")], "label": False}


BAD_ROWS = [
    ({"prompt": "q", "completion": "a"}, r"missing field 'label' \(format unpaired expects 'prompt' and 'completion'"),
    ({"prompt": "q", "completion": "a", "label": 1}, "field 'label' must be a bool, got int"),
    ({"prompt": "q", "completion": "a", "label": "true"}, "field 'label' must be a bool, got str"),
    ({"prompt": "q", "label": True}, "missing field 'completion'"),
    ({"prompt": [U("q")], "completion": "a", "label": True}, "must both be strings or both be message lists"),
    ({"prompt": [U("q")], "completion": [A("a"), U("more?"), A("yes")], "label": True},
     "'completion' must hold exactly one assistant message .* got roles \\['assistant', 'user', 'assistant'\\]"),
    ({"prompt": [U("q"), A("early")], "completion": [A("a")], "label": True},
     r"prompt \+ completion\[2\] has role 'assistant' where 'user' was expected"),
    ({"prompt": "q", "completion": "  ", "label": False}, "assistant turn with empty content"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[f"{i}-{b[1][:30]}" for i, b in enumerate(BAD_ROWS)])
def test_bad_rows_are_one_line_naming_the_file_and_line(tmp_path, row, message):
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps(STRING_ROW) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_rows(DataSpec(path=str(path), format="unpaired"))
    assert str(info.value).startswith(f"{path} line 2: ") and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_tokenized_example_is_the_official_encoding_with_labels_on_the_completion(version):
    tokenizer = bundled(version)
    path = str(bundled_tokenizer_path(version))
    finetuning = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)
    serving = getattr(MistralTokenizer, version)()
    rows = [canon(STRING_ROW, 1), canon(CONV_ROW, 2)]
    examples, stats = tokenize_unpaired(rows, tokenizer, 256)
    assert (stats.desirable, stats.undesirable, stats.truncated, stats.dropped) == (1, 1, 0, 0)
    for row, ex in zip(rows, examples):
        request = ChatCompletionRequest(messages=row["prompt"] + row["completion"])
        whole = finetuning.encode_chat_completion(request).tokens
        prompt = serving.encode_chat_completion(ChatCompletionRequest(messages=row["prompt"])).tokens
        assert ex.prompt_ids + ex.completion_ids == whole
        assert ex.prompt_ids == prompt and ex.completion_ids[-1] == tokenizer.eos_id
        assert (ex.label, ex.source, ex.row) == (row["label"], "kto.jsonl", row["row"])
        seq = ex.sequence()
        assert seq.labels == [IGNORE] * len(prompt) + ex.completion_ids


def test_overlong_rows_are_cut_or_dropped_and_counted(v1):
    row = canon({"prompt": "Tell me a story. " * 20, "completion": "Once upon a time " * 20, "label": True})
    (cut,), stats = tokenize_unpaired([row], v1, 64)
    assert stats.truncated == 1 and len(cut.prompt_ids) + len(cut.completion_ids) == 64
    assert cut.prompt_ids[0] == v1.bos_id and cut.completion_ids[-1] != v1.eos_id  # a cut answer has no EOS
    kept, stats = tokenize_unpaired([row], v1, 64, overlong="drop")
    assert kept == [] and stats.dropped == 1 and stats.dropped_rows == ["kto.jsonl row 2"]


def rows_of(n: int) -> list[dict]:
    with open(bundled_unpaired_path()) as f:
        raw = [json.loads(line) for line, _ in zip(f, range(n))]
    return [canon(r, i + 1) for i, r in enumerate(raw)]


def test_batch_holds_the_examples_and_trl_mismatched_pairs(v1):
    """Sequence B + i of a batch is prompt i + completion i - 1 (prompt 0 + completion B - 1): trl's rotation,
    written out by hand here; the padded batch equals trl's own collator fed those KL completions."""
    trl_collator = pytest.importorskip("trl.trainer.kto_trainer").DataCollatorForUnpairedPreference
    examples, _ = tokenize_unpaired(rows_of(3) + [canon(CONV_ROW, 9)], v1, 256)
    B, pad = len(examples), v1.eos_id
    batch = UnpairedCollate(pad, packing=False, max_seq_len=256)(examples)
    kl = mismatched_part(batch)
    assert num_examples(batch) == B and batch["label"].tolist() == [True, False, True, False]
    by_hand = [examples[0].prompt_ids + examples[3].completion_ids] + [
        examples[i].prompt_ids + examples[i - 1].completion_ids for i in (1, 2, 3)]
    for i in range(B):
        n = int(kl["attention_mask"][i].sum())
        assert kl["input_ids"][i, :n].tolist() == by_hand[i]
        assert (kl["labels"][i, :n] != IGNORE).sum() == len(examples[i - 1].completion_ids)
        assert (kl["sequence_index"][i, :n] == i).all() and (kl["sequence_index"][i, n:] == -1).all()
    theirs = trl_collator(pad_token_id=pad)([
        {"prompt_ids": ex.prompt_ids, "completion_ids": ex.completion_ids, "label": ex.label,
         "KL_completion_ids": by_hand[i][len(ex.prompt_ids):]} for i, ex in enumerate(examples)])
    for prefix in ("", "kl_"):
        trl_prefix = prefix.upper()
        assert batch[f"{prefix}input_ids"].tolist() == theirs[f"{trl_prefix}input_ids"].tolist()
        assert batch[f"{prefix}attention_mask"].tolist() == theirs[f"{trl_prefix}attention_mask"].tolist()
        assert (batch[f"{prefix}labels"] != IGNORE).long().tolist() == theirs[f"{trl_prefix}completion_mask"].tolist()
    assert batch["label"].tolist() == theirs["label"].tolist()


def test_mismatched_sequences_are_cut_at_max_seq_len_keeping_their_start_as_trl(v1):
    """A long completion after a long prompt can exceed max_seq_len; trl's collator cuts it from the end (its
    max_length), and so do we."""
    trl_collator = pytest.importorskip("trl.trainer.kto_trainer").DataCollatorForUnpairedPreference
    long_prompt = canon({"prompt": "Say something about cats and dogs and birds. " * 3, "completion": "ok",
                         "label": True}, 1)
    long_answer = canon({"prompt": "Hi", "completion": "A very long answer about nothing at all, " * 3,
                         "label": False}, 2)
    examples, _ = tokenize_unpaired([long_prompt, long_answer], v1, 60)
    kl = mismatched_part(UnpairedCollate(v1.eos_id, packing=False, max_seq_len=60)(examples))
    rotated = [examples[1].completion_ids, examples[0].completion_ids]
    assert len(examples[0].prompt_ids) + len(rotated[0]) > 60  # the case under test
    theirs = trl_collator(pad_token_id=v1.eos_id, max_length=60)([
        {"prompt_ids": ex.prompt_ids, "completion_ids": ex.completion_ids, "KL_completion_ids": r, "label": ex.label}
        for ex, r in zip(examples, rotated)])
    assert kl["input_ids"].tolist() == theirs["KL_input_ids"].tolist()
    assert (kl["labels"] != IGNORE).long().tolist() == theirs["KL_completion_mask"].tolist()


def test_packed_batches_hold_the_same_sequences(v1):
    examples, _ = tokenize_unpaired(rows_of(6), v1, 256)
    padded = UnpairedCollate(v1.eos_id, packing=False, max_seq_len=256)(examples)
    packed = UnpairedCollate(v1.eos_id, packing=True, max_seq_len=64)(examples)
    assert packed["input_ids"].shape[0] < len(examples) and "attention_mask" not in packed
    for prefix in ("", "kl_"):
        for k in range(len(examples)):
            want = padded[f"{prefix}input_ids"][padded[f"{prefix}sequence_index"] == k]
            assert packed[f"{prefix}input_ids"][packed[f"{prefix}sequence_index"] == k].tolist() == want.tolist()


def test_without_mismatched_pairs_and_a_lone_example(v1):
    examples, _ = tokenize_unpaired(rows_of(2), v1, 256)
    collate = UnpairedCollate(v1.eos_id, packing=False, max_seq_len=256)
    plain = replace(collate, mismatched=False)(examples)
    assert mismatched_part(plain) is None and not any(k.startswith("kl_") for k in plain)
    assert plain["input_ids"].shape[0] == 2
    # a lone example (a held-out set's last batch) is its own mismatched pair, as trl's rotation of one gives
    alone = collate(examples[:1])
    assert mismatched_part(alone)["input_ids"].tolist() == alone["input_ids"].tolist()


def test_bundled_files_are_the_scripts_output_and_balanced(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_unpaired.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for split, count in (("train", 600), ("eval", 100)):
        path = bundled_unpaired_path(split)
        written = (tmp_path / path.name).read_bytes()
        assert written == path.read_bytes(), f"{path.name}: rerun scripts/make_tiny_unpaired.py"
        rows = list(load_rows(DataSpec(path=str(path), format="auto")))
        assert len(rows) == count and sum(r["label"] for r in rows) == count // 2
        assert all(("answer" in r) == (split == "eval") for r in rows)
    pairs = [json.loads(line) for line in open(bundled_unpaired_path().with_name("tiny_pairs.jsonl"))]
    first, second = (json.loads(line) for line, _ in zip(open(bundled_unpaired_path()), range(2)))
    assert first["completion"] == pairs[0]["chosen"] and second["completion"] == pairs[1]["rejected"]


def test_bundled_data_is_the_default_for_format_unpaired():
    train, held = load_splits(DataSpec(path=None, format="unpaired"))
    assert train.kind == "unpaired" and "tiny_unpaired.jsonl" in train.name and len(held) == 100
