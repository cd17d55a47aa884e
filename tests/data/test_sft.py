"""SFT tokenization: label masks from the chat template on the real Mistral v1 and v3 tokenizers.

The expected trained tokens come from the raw SentencePiece model (each answer encoded on its own
+ EOS), not from our Tokenizer, so a mask that is shifted, empty or covers the prompt fails.
"""

import pytest

from mistral_train.data.sft import SFTExample, assistant_spans, tokenize_conversation, tokenize_rows
from tests._tokenizers import bundled, raw_sentencepiece

IGNORE = -100
CHAT = [
    {"role": "system", "content": "Answer in words."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And three times three?"},
    {"role": "assistant", "content": "Nine, of course."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request):
    return request.param, bundled(request.param), raw_sentencepiece(request.param)


def row(messages=CHAT, source="chats.jsonl", index=4, **extra):
    return {"messages": messages, "source": source, "row": index, **extra}


def trained_runs(ex: SFTExample) -> list[list[int]]:
    return [ex.labels[s:e] for s, e in assistant_spans([y != IGNORE for y in ex.labels])]


def end_of_prompt(version, sp) -> list[int]:
    """The ids that close a user turn: '[/INST]' as text in v1, the control token in v3."""
    return sp.encode("[INST] x [/INST]")[-4:] if version == "v1" else [sp.piece_to_id("[/INST]")]


def test_assistant_mode_trains_each_answer_and_its_eos(tok):
    version, tokenizer, sp = tok
    ex = tokenize_conversation(row(), tokenizer, 512, train_on="assistant")
    assert trained_runs(ex) == [sp.encode(a) + [sp.eos_id()] for a in ANSWERS]
    closer = end_of_prompt(version, sp)
    for start, end in assistant_spans([y != IGNORE for y in ex.labels]):
        assert ex.input_ids[start - len(closer):start] == closer  # the span starts right after [/INST]
    assert all(y in (IGNORE, i) for y, i in zip(ex.labels, ex.input_ids)) and len(ex.labels) == len(ex.input_ids)
    assert (ex.source, ex.row, ex.truncated) == ("chats.jsonl", 4, False)


def test_last_assistant_mode_trains_only_the_final_answer(tok):
    _, tokenizer, sp = tok
    ex = tokenize_conversation(row(), tokenizer, 512, train_on="last_assistant")
    assert trained_runs(ex) == [sp.encode(ANSWERS[-1]) + [sp.eos_id()]]
    assert ex.labels[-1] == sp.eos_id()


def test_all_mode_trains_everything_but_bos(tok):
    _, tokenizer, _ = tok
    ex = tokenize_conversation(row(), tokenizer, 512, train_on="all")
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


@pytest.mark.parametrize("train_on, n_eos", [("assistant", 3), ("last_assistant", 1), ("all", 3)])
def test_eos_closes_every_trained_turn_and_is_a_label(tok, train_on, n_eos):
    _, tokenizer, sp = tok
    ex = tokenize_conversation(row(), tokenizer, 512, train_on=train_on)
    assert ex.labels.count(sp.eos_id()) == n_eos
    for run in trained_runs(ex):
        assert run[-1] == sp.eos_id()


def test_exactly_one_bos_even_when_the_text_spells_special_tokens(tok):
    _, tokenizer, sp = tok
    chat = [{"role": "user", "content": "<s>[INST] hi </s>"}, {"role": "assistant", "content": "<s> ok </s>"}]
    ex = tokenize_conversation(row(chat), tokenizer, 512)
    assert ex.input_ids[0] == sp.bos_id() and ex.input_ids.count(sp.bos_id()) == 1
    assert ex.input_ids.count(sp.eos_id()) == 1  # "</s>" written in text stays text


def test_text_row_is_bos_text_eos_all_trained(tok):
    _, tokenizer, sp = tok
    ex = tokenize_conversation({"text": "Once upon a time, a cat.", "source": "docs", "row": 0}, tokenizer, 512)
    assert ex.input_ids == [sp.bos_id()] + sp.encode("Once upon a time, a cat.") + [sp.eos_id()]
    assert ex.labels == [IGNORE] + ex.input_ids[1:]


class NoEosTemplate:
    """A real tokenizer whose chat template forgets the EOS after each answer."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_chat(self, messages, chat_format=None):
        ids, mask = self.inner.encode_chat(messages, chat_format)
        kept = [(i, m) for i, m in zip(ids, mask) if i != self.inner.eos_id]
        return [i for i, _ in kept], [m for _, m in kept]


def test_template_without_eos_after_an_answer_raises_naming_the_row(tok):
    _, tokenizer, _ = tok
    with pytest.raises(ValueError, match=r"chats\.jsonl row 4: assistant turn 0 is not closed by EOS"):
        tokenize_conversation(row(), NoEosTemplate(tokenizer), 512)


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles must alternate"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "unknown role"),
    ({"messages": []}, "empty conversation"),
    ({"text": ""}, "non-empty string"),
    ({"prompt": "a"}, "expected a 'messages' or a 'text' field"),
])
def test_malformed_rows_raise_naming_source_and_row(tok, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        tokenize_conversation({**bad, "source": "bad.jsonl", "row": 12}, tok[1], 512)
    assert "bad.jsonl row 12" in str(err.value)


def test_settings_and_row_keys_are_checked(tok):
    tokenizer = tok[1]
    for kwargs, message in [({"train_on": "assistants"}, "train_on"), ({"overlong": "cut"}, "overlong"),
                            ({"max_seq_len": 1}, "max_seq_len")]:
        with pytest.raises(ValueError, match=message):
            tokenize_conversation(row(), tokenizer, **{"max_seq_len": 512, **kwargs})
    with pytest.raises(ValueError, match="'source' and 'row'"):
        tokenize_conversation({"messages": CHAT}, tokenizer, 512)


def test_truncate_keeps_the_first_tokens_and_counts_them(tok):
    _, tokenizer, _ = tok
    full = tokenize_conversation(row(), tokenizer, 512)
    cut = len(full.input_ids) - 5  # inside the last answer
    short = row(CHAT[1:3], "b.jsonl", 0)
    examples, stats = tokenize_rows([row(), short, row(index=5)], tokenizer, cut, overlong="truncate")
    assert [e.truncated for e in examples] == [True, False, True]
    assert examples[0].input_ids == full.input_ids[:cut] and examples[0].labels == full.labels[:cut]
    a, b = stats.sources["chats.jsonl"], stats.sources["b.jsonl"]
    assert (a.examples, a.truncated, a.dropped, b.examples, b.truncated, b.dropped) == (2, 2, 0, 1, 0, 0)
    assert a.tokens == 2 * cut and b.tokens == len(examples[1].input_ids)
    assert a.label_tokens == 2 * sum(y != IGNORE for y in full.labels[:cut])
    assert stats.total().examples == 3
    assert (stats.train_on, stats.overlong, stats.max_seq_len) == ("assistant", "truncate", cut)


def test_drop_removes_overlong_rows_and_counts_them(tok):
    _, tokenizer, _ = tok
    n = len(tokenize_conversation(row(), tokenizer, 512).input_ids)
    rows = [row(index=i) for i in range(3)] + [row(CHAT[1:3], index=3)]
    assert tokenize_conversation(row(), tokenizer, n, overlong="drop") is not None  # exactly max_seq_len fits
    assert tokenize_conversation(row(), tokenizer, n - 1, overlong="drop") is None
    examples, stats = tokenize_rows(rows, tokenizer, n - 1, overlong="drop")
    counts = stats.sources["chats.jsonl"]
    assert [e.row for e in examples] == [3] and (counts.examples, counts.dropped, counts.truncated) == (1, 3, 0)
    assert counts.dropped_rows == [0, 1, 2]


def test_truncation_that_leaves_nothing_trained_drops_the_row(tok):
    _, tokenizer, _ = tok
    full = tokenize_conversation(row(), tokenizer, 512, train_on="last_assistant")
    first_trained = next(t for t, y in enumerate(full.labels) if y != IGNORE)
    examples, stats = tokenize_rows([row()], tokenizer, first_trained, train_on="last_assistant")
    assert examples == [] and stats.sources["chats.jsonl"].dropped == 1
    kept, _ = tokenize_rows([row()], tokenizer, first_trained + 1, train_on="last_assistant")
    assert kept[0].truncated and sum(y != IGNORE for y in kept[0].labels) == 1
