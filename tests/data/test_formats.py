"""Row formats -> canonical examples: each format, renamed fields, auto detection, every bad row."""

import pytest

from mistral_train.data.formats import FORMATS, KIND_NAMES, check_field_map, detect_format, format_kind, resolve_format, to_canonical
from mistral_train.train.objectives import OBJECTIVES, check_data_kind as check_kind, objective_entry
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
