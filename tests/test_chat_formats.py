"""What is trained in a chat (answers, reasoning, tool calls; never system, user, tool results or tool
definitions; not weight-0 turns), how SFT rows and the audit see it, and the one-line refusals.
Parity of the ids with mistral-common is in tests/oracle/test_chat_formats_parity.py."""

import json
from importlib import resources
from pathlib import Path

import pytest

from mistral_train.data.audit import audit, format_report
from mistral_train.data.sft import tokenize_rows
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.tokenizer.tekken import LEGACY_SPECIALS
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer

DATA = Path(str(resources.files("mistral_common") / "data"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "function": {"name": "get_weather",
                                                                             "arguments": '{"city": "Paris"}'}}]}
CHAT = [{"role": "system", "content": "SYSTEM-TEXT"}, {"role": "user", "content": "USER-TEXT"}, CALL,
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "RESULT-TEXT"},
        {"role": "assistant", "content": "ANSWER-TEXT"}]


@pytest.fixture(scope="module")
def v7():
    return load_tokenizer(DATA / "mistral_instruct_tokenizer_241114.model.v7")


@pytest.fixture(scope="module")
def v13(tmp_path_factory):
    """tekken_240911 set to v13, with the special tokens v13 needs after the twenty legacy ones."""
    data = json.loads((DATA / "tekken_240911.json").read_text(encoding="utf-8"))
    names = list(LEGACY_SPECIALS) + ["[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"]
    data["special_tokens"] = [{"rank": i, "token_str": n, "is_control": True} for i, n in enumerate(names)]
    data["config"]["version"] = "v13"
    path = tmp_path_factory.mktemp("v13") / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return load_tokenizer(path.parent)


def _split(tok, ids, mask):
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special=False)
    return trained, untrained


@pytest.mark.parametrize("name", ["v7", "v13"])
def test_only_answers_and_tool_calls_are_trained(request, name):
    tok = request.getfixturevalue(name)
    ids, mask = tok.encode_chat(CHAT, tools=TOOLS)
    trained, untrained = _split(tok, ids, mask)
    assert "[TOOL_CALLS]" in trained and "get_weather" in trained and "Paris" in trained and "ANSWER-TEXT" in trained
    assert trained.count("</s>") == 2  # each answer's EOS
    for text in ("SYSTEM-TEXT", "USER-TEXT", "RESULT-TEXT", "Weather in a city", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]"):
        assert text in untrained and text not in trained


def test_reasoning_is_trained(v13):
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "THINKING", "content": "4"}]
    ids, mask = v13.encode_chat(chat)
    trained, _ = _split(v13, ids, mask)
    assert trained == "[THINK]THINKING[/THINK]4</s>"


def test_weight_zero_turn_is_not_trained_and_ids_are_unchanged(v7):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "SKIP"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "KEEP"}]
    ids, mask = v7.encode_chat(chat)
    chat[1] = dict(chat[1], weight=0)
    ids0, mask0 = v7.encode_chat(chat)
    assert ids0 == ids and sum(mask0) < sum(mask)
    assert _split(v7, ids0, mask0)[0] == "KEEP</s>"
    with pytest.raises(ValueError, match="message 1: weight must be 0 or 1, got 0.5"):
        v7.encode_chat([chat[0], dict(chat[1], weight=0.5)])


def test_sft_rows_with_tools_train_on_and_audit(v13):
    chat = [{"role": "user", "content": "weather?"}, {**CALL, "reasoning_content": "Look it up."},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "21C"},
            {"role": "assistant", "content": "It is 21C."}]
    rows = [{"messages": chat, "tools": TOOLS, "source": "tools.jsonl", "row": 0}]
    examples, stats = tokenize_rows(rows, v13, 512)
    counts = stats.sources["tools.jsonl"]
    assert (counts.tool_calls, counts.reasoning) == (1, 1)
    report = audit(examples, stats, v13, rows=rows)
    assert "round trip of trained spans" in report.checks
    text = format_report(report)
    assert "«[THINK]Look it up.[/THINK][TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}</s>»" in text
    assert "«It is 21C.</s>»" in text and "tool calls" in text.splitlines()[1]
    last, _ = tokenize_rows(rows, v13, 512, train_on="last_assistant")
    assert v13.decode([y for y in last[0].labels if y != IGNORE_INDEX]) == "It is 21C."


REFUSED = [
    ("v1", [{"role": "user", "content": "a"}, CALL], TOOLS, "tools: chat format v1 has no tool definitions"),
    ("v7", [{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "t", "content": "b"}],
     None, "message 1: thinking chunks need chat format v13"),
    ("v7", [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"}],
     None, "message 1: expected role 'user' first|message 1: more tool results"),
    ("v7", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], None,
     "message 2: a system message cannot follow an assistant message"),
    ("v3", [{"role": "user", "content": "a"}, {**CALL, "tool_calls": [dict(CALL["tool_calls"][0], id="short")]},
            {"role": "tool", "tool_call_id": "short", "content": "r"}, {"role": "assistant", "content": "d"}], TOOLS,
     "message 1: tool call id 'short' must be 9 letters or digits"),
    ("v3", [{"role": "user", "content": "a"}, CALL, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     TOOLS, "message 3: 1 tool calls have no result"),
]


@pytest.mark.parametrize("fmt,chat,tools,error", REFUSED)
def test_refused_shapes_name_the_message(v7, fmt, chat, tools, error):
    tok = load_tokenizer(bundled_tokenizer_path("v1")) if fmt == "v1" else v7
    with pytest.raises(ValueError, match=error) as caught:
        tok.encode_chat(chat, fmt, tools=tools)
    assert "\n" not in str(caught.value)
