"""Row formats -> canonical examples: each format, renamed fields, auto detection, every bad row."""

import json
import re

import pytest

from mistral_train.data.formats import FORMATS, KIND_NAMES, check_field_map, detect_format, format_kind, resolve_format, to_canonical
from mistral_train.train.objectives import OBJECTIVES, check_data_kind as check_kind, objective_entry
from mistral_train.data.sources import load_rows
from mistral_train.data.spec import DataSpec
from tests._chat import A, S, U

WHERE = "data/train.jsonl line 12"


def test_text_keeps_only_the_text():
    assert to_canonical({"text": "The cat eats fish.", "id": 7}, "text", {}, WHERE) == {"text": "The cat eats fish."}


def test_alpaca_joins_instruction_and_input_and_puts_system_first():
    row = {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "Be brief."}
    assert to_canonical(row, "alpaca", {}, WHERE)["messages"] == [
        S("Be brief."), U("Translate to French.\n\ncat"), A("chat")]
    # An empty input (common in alpaca data) or a null one (CSV/Parquet) leaves the instruction alone.
    for extra in ("", None):
        row = {"instruction": "Name a colour.", "input": extra, "output": "red"}
        assert to_canonical(row, "alpaca", {}, WHERE) == {"messages": [U("Name a colour."), A("red")]}


def test_messages_keep_role_and_content_and_the_answer():
    row = {"messages": [S("sys"), {**U("q1"), "name": "x"}, A("a1"), U("q2"), A("a2")], "answer": "a2", "id": 1}
    assert to_canonical(row, "messages", {}, WHERE) == {
        "messages": [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")], "answer": "a2"}


def test_sharegpt_maps_its_role_names():
    turns = [("system", "sys"), ("human", "q1"), ("gpt", "a1"), ("user", "q2"), ("assistant", "a2")]
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    assert to_canonical(row, "sharegpt", {}, WHERE)["messages"] == [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")]


def test_prompt_completion_as_strings_and_as_message_lists():
    assert to_canonical({"prompt": "2+2?", "completion": "4"}, "prompt_completion", {}, WHERE) == {
        "messages": [U("2+2?"), A("4")]}
    row = {"prompt": [S("sys"), U("q1"), A("a1"), U("q2")], "completion": [A("a2")]}
    assert to_canonical(row, "prompt_completion", {}, WHERE)["messages"] == [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")]


@pytest.mark.parametrize("fmt, row, field_map, expected", [
    ("messages", {"conversation": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]},
     {"messages": "conversation", "role": "speaker", "content": "text"}, [U("hi"), A("yo")]),
    ("sharegpt", {"turns": [{"who": "human", "said": "hi"}, {"who": "gpt", "said": "yo"}]},
     {"conversations": "turns", "from": "who", "value": "said"}, [U("hi"), A("yo")]),
    ("alpaca", {"question": "hi", "context": "there", "response": "yo"},
     {"instruction": "question", "input": "context", "output": "response"}, [U("hi\n\nthere"), A("yo")]),
    ("prompt_completion", {"q": "hi", "a": "yo"}, {"prompt": "q", "completion": "a"}, [U("hi"), A("yo")]),
])
def test_field_map_renames_top_level_fields_and_message_keys(fmt, row, field_map, expected):
    assert to_canonical(row, fmt, field_map, WHERE)["messages"] == expected
    assert detect_format(row, field_map) == fmt


def test_field_map_renames_text_and_answer():
    assert to_canonical({"body": "x"}, "text", {"text": "body"}, WHERE) == {"text": "x"}
    row = {"messages": [U("q"), A("a")], "gold": "a"}
    assert to_canonical(row, "messages", {"answer": "gold"}, WHERE)["answer"] == "a"


def test_field_map_rejects_a_field_we_do_not_read():
    with pytest.raises(ValueError, match="unknown field 'mesages'"):
        check_field_map({"mesages": "conversation"})
    with pytest.raises(ValueError, match="data.field_map.content"):
        check_field_map({"content": 3})


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [U("q"), A("a")], "text": "also"}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "sharegpt"),
    ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"text": "plain"}, "text"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt
    assert fmt in FORMATS


def test_detect_format_names_the_fields_it_found():
    with pytest.raises(ValueError, match=r"data/train.jsonl line 12: cannot tell the row format from its fields \['q'"):
        detect_format({"q": 1, "r": 2}, where=WHERE)


BAD = [
    # (format, row, what the message must say)
    ("alpaca", {"instruction": "q"}, "missing field 'output'"),
    ("messages", {"conversation": [U("q"), A("a")]}, "missing field 'messages'"),
    ("text", {"text": None}, "missing field 'text'"),
    ("messages", {"messages": "hi"}, "field 'messages' must be a list, got str"),
    ("messages", {"messages": [U("q"), {"role": "assistant", "content": 4}]}, r"messages\[1\].content must be a string, got int"),
    ("messages", {"messages": [U("q"), "a"]}, r"messages\[1\] must be an object"),
    ("messages", {"messages": [{"role": "user"}, A("a")]}, r"messages\[0\] is missing field 'content'"),
    ("alpaca", {"instruction": ["q"], "output": "a"}, "field 'instruction' must be a string, got list"),
    ("text", {"text": 12}, "field 'text' must be a string, got int"),
    ("text", {"text": "  \n"}, "field 'text' is empty"),
    ("messages", {"messages": [U("q"), A("a")], "answer": 3}, "field 'answer' must be a string"),
    ("prompt_completion", {"prompt": "q", "completion": [A("a")]}, "both be strings or both be message lists"),
    ("messages", {"messages": []}, "empty conversation"),
    ("sharegpt", {"conversations": []}, "empty conversation"),
    ("messages", {"messages": [U("q"), U("q again"), A("a")]}, r"messages\[1\] has role 'user' where 'assistant' was expected"),
    ("messages", {"messages": [A("a"), U("q")]}, r"messages\[0\] has role 'assistant' where 'user' was expected"),
    ("messages", {"messages": [U("q"), S("late system"), A("a")]}, r"messages\[1\] has role 'system'"),
    ("messages", {"messages": [U("q"), A("a"), U("q2")]}, "ends with a 'user' turn"),
    ("messages", {"messages": [S("only a system turn")]}, "ends with a 'system' turn"),
    ("messages", {"messages": [U("q"), {"role": "robot", "content": "x"}]}, r"messages\[1\] has unknown role 'robot'"),  # tool is a role now
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] has unknown role 'bot'"),
    ("messages", {"messages": [U("q"), A("   ")]}, r"messages\[1\] is an assistant turn with empty content"),
    ("alpaca", {"instruction": "q", "output": ""}, "assistant turn with empty content"),
    ("messages", ["not", "a", "row"], "expected an object"),
    ("chatml", {"messages": [U("q"), A("a")]}, "unknown data.format 'chatml'"),
]


@pytest.mark.parametrize("fmt, row, message", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_bad_rows_raise_naming_where_and_what(fmt, row, message):
    with pytest.raises(ValueError, match=message) as info:
        to_canonical(row, fmt, {}, WHERE)
    assert str(info.value).startswith(WHERE + ": ")


def test_chosen_only_reads_a_pair_as_its_prompt_and_chosen_answer():
    # The opt-in to SFT on a pairs file: the rejected answer never reaches the conversation.
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "answer": "4"}
    assert to_canonical(row, "chosen_only", {}, WHERE) == {"messages": [U("2+2?"), A("4")], "answer": "4"}
    implicit = {"chosen": [S("sys"), U("q"), A("yes")], "rejected": [S("sys"), U("q"), A("no")]}
    assert to_canonical(implicit, "chosen_only", {}, WHERE)["messages"] == [S("sys"), U("q"), A("yes")]
    assert format_kind("chosen_only") == "chat"
    with pytest.raises(ValueError, match="line 12: missing field 'rejected'"):
        to_canonical({"prompt": "2+2?", "chosen": "4"}, "chosen_only", {}, WHERE)


def test_auto_never_picks_chosen_only_a_pairs_row_is_preference():
    assert detect_format({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) == "preference"


@pytest.mark.parametrize("objective, fmt", [("pretrain", "text"), ("sft", "messages"), ("dpo", "preference"),
                                            ("reward", "preference")])
def test_auto_without_a_path_is_the_bundled_data_of_the_objectives_kind(objective, fmt):
    kind = objective_entry(objective).data_kind  # the objective table says what it reads
    assert resolve_format("auto", None, kind) == fmt
    assert resolve_format("auto", "my.jsonl", kind) == "auto"  # a file: decided from its first row
    assert resolve_format("sharegpt", None, kind) == "sharegpt"


def test_each_objective_accepts_its_own_kind():
    for objective, entry in OBJECTIVES.items():
        check_kind(objective, entry.data_kind, "data.path x.jsonl")  # raises nothing


def test_sft_on_pairs_is_refused_naming_the_file_and_the_opt_in():
    with pytest.raises(ValueError) as err:
        check_kind("sft", "preference", "data.path prefs.jsonl")
    message = str(err.value)
    assert message.startswith("data.path prefs.jsonl holds preference pairs, but trainer.objective=sft")
    assert "data.format=chosen_only" in message and "rejected answers" in message


@pytest.mark.parametrize("objective, kind, needs, other", [
    ("dpo", "chat", "preference pairs", "trainer.objective=sft"),
    ("reward", "text", "preference pairs", "trainer.objective=pretrain"),
    ("pretrain", "preference", "plain text", "trainer.objective=dpo, trainer.objective=reward"),
    ("sft", "text", "chat rows", "trainer.objective=pretrain")])
def test_every_other_mismatch_is_refused_naming_both_kinds(objective, kind, needs, other):
    with pytest.raises(ValueError, match=f"holds {KIND_NAMES[kind]}, but trainer.objective={objective} trains on "
                                         f"{needs}.*train on this data with {other}$"):
        check_kind(objective, kind, "data.path x")


# Tool use: OpenAI messages + tools, LLaMA-Factory's ShareGPT (function_call / observation + a tools string).
AREA = {"name": "calculate_area", "description": "Area of a shape",
        "parameters": {"type": "object", "properties": {"shape": {"type": "string"}}, "required": ["shape"]}}
TOOL = {"type": "function", "function": AREA}


def _call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _sharegpt_row() -> dict:
    """The shape of LLaMA-Factory's glaive_toolcall demo rows: system and tools (a JSON string) as columns."""
    return {"system": "Be exact.", "tools": json.dumps([AREA]), "conversations": [
        {"from": "human", "value": "Area of a square of side 7?"},
        {"from": "function_call", "value": json.dumps({"name": "calculate_area", "arguments": {"shape": "square"}})},
        {"from": "observation", "value": '{"area": 49}'},
        {"from": "gpt", "value": "49 square units."}]}


def test_openai_tool_rows_keep_calls_results_and_tools():
    row = {"tools": [TOOL], "messages": [
        U("Area of a square of side 7?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a1b2c3d4e", "type": "function",
             "function": {"name": "calculate_area", "arguments": '{"shape": "square"}'}}]},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": '{"area": 49}'},
        {**A("49 square units."), "weight": 0}]}
    assert to_canonical(row, "messages", {}, WHERE) == {"tools": [TOOL], "messages": [
        U("Area of a square of side 7?"),
        {"role": "assistant", "content": "", "tool_calls": [_call("calculate_area", {"shape": "square"}, "a1b2c3d4e")]},
        {"role": "tool", "content": '{"area": 49}', "tool_call_id": "a1b2c3d4e", "name": "calculate_area"},
        {**A("49 square units."), "weight": 0}]}


def test_sharegpt_tool_rows_become_the_same_openai_messages():
    out = to_canonical(_sharegpt_row(), "sharegpt", {}, WHERE)
    call_id = out["messages"][2]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()  # the id form chat formats v3-v11 require
    assert out == {"tools": [TOOL], "messages": [
        S("Be exact."), U("Area of a square of side 7?"),
        {"role": "assistant", "content": "", "tool_calls": [_call("calculate_area", {"shape": "square"}, call_id)]},
        {"role": "tool", "content": '{"area": 49}', "tool_call_id": call_id, "name": "calculate_area"},
        A("49 square units.")]}
    assert to_canonical(_sharegpt_row(), "sharegpt", {}, WHERE) == out  # ids fixed by place: the same every run
    assert detect_format(_sharegpt_row()) == "sharegpt"
    assert detect_format({"messages": out["messages"], "tools": out["tools"]}) == "messages"


def test_sharegpt_parallel_calls_take_one_observation_each_in_order():
    row = {"tools": "[]", "conversations": [
        {"from": "human", "value": "Areas of a square and a circle?"},
        {"from": "function_call", "value": json.dumps([{"name": "area", "arguments": {"shape": "square"}},
                                                       {"name": "area", "arguments": '{"shape": "circle"}'}])},
        {"from": "observation", "value": "49"}, {"from": "observation", "value": "50.24"},
        {"from": "function_call", "value": json.dumps({"name": "area", "arguments": {"shape": "dot"}})},
        {"from": "observation", "value": "0"}, {"from": "gpt", "value": "49, 50.24 and 0."}]}
    out = to_canonical(row, "sharegpt", {}, WHERE)
    assert "tools" not in out  # an empty definition list ("[]", as glaive writes it) is no tools
    first, second = out["messages"][1]["tool_calls"], out["messages"][4]["tool_calls"]
    assert [c["function"]["arguments"] for c in first + second] == [{"shape": "square"}, {"shape": "circle"}, {"shape": "dot"}]
    ids = [c["id"] for c in first + second]
    assert len(set(ids)) == 3  # distinct per place
    assert [(m["tool_call_id"], m["content"]) for m in out["messages"] if m["role"] == "tool"] == list(
        zip(ids, ["49", "50.24", "0"]))


def test_a_conversation_may_end_with_a_tool_call():
    row = {"messages": [U("Area?"), {"role": "assistant", "tool_calls": [
        {"function": {"name": "calculate_area", "arguments": {"shape": "square"}}}]}]}
    out = to_canonical(row, "messages", {}, WHERE)
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"shape": "square"}


def test_tool_rows_are_found_by_auto_and_errors_name_file_and_line(tmp_path):
    good = {"messages": [U("q"), {"role": "assistant", "tool_calls": [_call("calculate_area", {}, "a1b2c3d4e")]},
                         {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "1"}, A("one")], "tools": [TOOL]}
    for name, row, fmt in (("oa.jsonl", good, "messages"), ("sg.jsonl", _sharegpt_row(), "sharegpt")):
        path = tmp_path / name
        path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
        source = load_rows(DataSpec(path=str(path), format="auto"))
        assert source.formats == {str(path): fmt} and [r["tools"] for r in source] == [[TOOL], [TOOL]]
    bad = json.loads(json.dumps(good))
    bad["messages"][2]["tool_call_id"] = "zzzzzzzzz"
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 2: messages\[2\].tool_call_id 'zzzzzzzzz' "
                                         r"matches no unanswered call of messages\[1\]; expected one of \['a1b2c3d4e'\]"):
        load_rows(DataSpec(path=str(path), format="auto"))


def _calls(*calls) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def _fn(name="calculate_area", arguments="{}", call_id="a1b2c3d4e") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _result(call_id="a1b2c3d4e", content="1", **extra) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content, **extra}


def _sg(*turns, **fields) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **fields}


BAD_TOOLS = [
    # arguments that are not JSON, in both forms
    ("messages", {"messages": [U("q"), _calls(_fn(arguments="{shape: square}")), _result(), A("a")]},
     r"messages\[1\].tool_calls\[0\].function.arguments is not JSON \(.*\): '\{shape: square\}'; expected a JSON object"),
    ("messages", {"messages": [U("q"), _calls(_fn(arguments="[1, 2]")), _result(), A("a")]},
     r"messages\[1\].tool_calls\[0\].function.arguments must be a JSON object"),
    ("sharegpt", _sg(("human", "q"), ("function_call", "calculate_area(shape=square)"), ("observation", "1"), ("gpt", "a")),
     r"conversations\[1\] is a function_call whose value is not JSON \(.*\): 'calculate_area\(shape=square\)'; "
     r"expected \{\"name\": \.\.\., \"arguments\""),
    ("sharegpt", _sg(("human", "q"), ("function_call", '{"name": "f", "arguments": "x=1"}'), ("observation", "1"),
                     ("gpt", "a")), r"conversations\[1\] call 0.arguments is not JSON"),
    # a result with an unknown call id, or answering a call twice
    ("messages", {"messages": [U("q"), _calls(_fn()), _result("b1b2c3d4e"), A("a")]},
     r"messages\[2\].tool_call_id 'b1b2c3d4e' matches no unanswered call of messages\[1\]; expected one of \['a1b2c3d4e'\]"),
    ("messages", {"messages": [U("q"), _calls(_fn()), _result(), _result(), A("a")]},
     r"messages\[3\].tool_call_id 'a1b2c3d4e' matches no unanswered call of messages\[1\]; expected one of \[\]"),
    # a tool message with no call before it
    ("messages", {"messages": [U("q"), _result(), A("a")]},
     r"messages\[1\] is a tool result with no tool call before it; expected an assistant message with tool_calls"),
    ("messages", {"messages": [U("q"), A("a"), _result(), A("b")]}, r"messages\[2\] is a tool result with no tool call"),
    ("sharegpt", _sg(("human", "q"), ("observation", "1"), ("gpt", "a")),
     r"conversations\[1\] is a tool result with no tool call before it; .*\(ShareGPT: a function_call turn\)"),
    ("sharegpt", _sg(("human", "q"), ("function_call", '{"name": "f", "arguments": {}}'), ("observation", "1"),
                     ("observation", "2"), ("gpt", "a")), r"conversations\[3\] is a tool result, but every call of "
                                                           r"conversations\[1\] is already answered"),
    # calls left without results, results followed by a user turn, a call to an undefined tool
    ("messages", {"messages": [U("q"), _calls(_fn(), _fn(call_id="b1b2c3d4e")), _result(), A("a")]},
     r"messages\[1\] calls \['b1b2c3d4e'\] but no tool result answers them before messages\[3\]"),
    ("messages", {"messages": [U("q"), _calls(_fn()), _result(), U("again"), A("a")]},
     r"messages\[3\] has role 'user' where 'tool' or 'assistant' was expected"),
    ("messages", {"messages": [U("q"), _calls(_fn(name="search")), _result(), A("a")], "tools": [TOOL]},
     r"messages\[1\] calls 'search', which the row's tools do not define; expected one of \['calculate_area'\]"),
    ("messages", {"messages": [U("q"), _calls(_fn()), _result(name="search"), A("a")]},
     r"messages\[2\] is the result of 'search', but the call 'a1b2c3d4e' it answers is to 'calculate_area'"),
    # malformed fields
    ("messages", {"messages": [U("q"), _calls({"id": "x"}), A("a")]}, r"messages\[1\].tool_calls\[0\] must be an object with a 'function'"),
    ("messages", {"messages": [U("q"), _calls(_fn(name=None)), _result(), A("a")]}, r"function needs a 'name' string"),
    ("messages", {"messages": [U("q"), A("a")], "tools": "[{"}, r"field 'tools' is not JSON"),
    ("messages", {"messages": [U("q"), A("a")], "tools": [{"description": "x"}]}, r"field 'tools'\[0\] must be a definition with a 'name'"),
    ("messages", {"messages": [U("q"), {**A("a"), "weight": 0.5}]}, r"messages\[1\].weight must be 0 \(not trained\) or 1"),
    ("sharegpt", {**_sg(("system", "s"), ("human", "q"), ("gpt", "a")), "system": "t"}, "expected the system prompt once"),
]


@pytest.mark.parametrize("fmt, row, message", BAD_TOOLS, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD_TOOLS)])
def test_bad_tool_rows_raise_naming_where_and_what(fmt, row, message):
    with pytest.raises(ValueError, match=message) as info:
        to_canonical(row, fmt, {}, WHERE)
    assert str(info.value).startswith(WHERE + ": ")
