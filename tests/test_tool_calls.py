"""Tool calls of a generated answer (tokenizer/tool_calls.py) and generation with tools (chat.py, the
`generate --chat --tools --messages` verb).

Round trip: our encoder writes a conversation whose last assistant turn calls tools; that turn's trained
ids, parsed, give the same calls back (names, arguments, ids where the format writes them), for every
format with tools; mistral-common's own decoder (experimental `_decode_tool_calls`) reads the same ids to
the same calls. Tool results appended to the parsed answer encode as the next turn.
"""

import json
import random

import pytest
import torch
from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls

from mistral_train.chat import chat
from mistral_train.cli import main
from mistral_train.tokenizer.tool_calls import ToolCallError, parse_answer
from tests._chat import U
from tests._tiny import save_tiny_folder
from tests.oracle.test_chat_formats_parity import CALLS, TOOLS, _call, _pair

FILES = {"v2": "mistral_instruct_tokenizer_240216.model.v2", "v3": "mistral_instruct_tokenizer_240323.model.v3",
         "v7": "mistral_instruct_tokenizer_241114.model.v7"}
CASES = [(FILES[v], v) for v in ("v2", "v3", "v7")] + [("tekken_240911.json", v) for v in ("v3", "v7", "v11", "v13", "v15")]
WRITES_IDS = {"v3", "v7", "v11"}  # the formats that put the call id into the answer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tool_calls"))


def _answer_ids(ours, msgs):
    """The trained ids of the last assistant turn (its calls and EOS)."""
    ids, mask = ours.encode_chat(msgs, tools=TOOLS)
    start = max(i for i in range(len(mask)) if not mask[i]) + 1
    return ids[start:]


def _calls(version, rng):
    """A tool-call turn of `version`'s shape: one call in v2, up to three after; arguments as objects."""
    calls = [_call(rng) for _ in range(1 if version == "v2" else rng.randint(1, 3))]
    for c in calls:
        c["function"]["arguments"] = {"city": rng.choice(["서울", "Paris 🎉", "a\n\tb  c"]), "n": rng.randint(0, 9)}
    return {"role": "assistant", "tool_calls": calls}


@pytest.mark.parametrize("name,version", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_parsed_calls_round_trip_and_equal_mistral_common(folder, name, version):
    ours, official, _ = _pair(name, version, folder)
    rng = random.Random(version)
    for turn in [{"role": "assistant", "tool_calls": CALLS["tool_calls"][:1 if version == "v2" else 2]},
                 *(_calls(version, rng) for _ in range(5))]:
        answer = _answer_ids(ours, [U("weather?"), turn])
        assert answer[-1] == ours.eos_id
        parsed = parse_answer(ours, answer)
        assert parsed["content"] == "" and "reasoning_content" not in parsed
        expected = [(c["function"]["name"], json.loads(c["function"]["arguments"])
                     if isinstance(c["function"]["arguments"], str) else c["function"]["arguments"]) for c in turn["tool_calls"]]
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]]
        assert got == expected
        assert all(c["type"] == "function" and len(c["id"]) == 9 and c["id"].isalnum() for c in parsed["tool_calls"])
        if version in WRITES_IDS:
            assert [c["id"] for c in parsed["tool_calls"]] == [c["id"] for c in turn["tool_calls"]]
        # mistral-common's decoder on the same ids (without the EOS) reads the same calls
        raw = official.instruct_tokenizer.tokenizer
        content, parts = _split_content_and_tool_calls(answer[:-1], raw.get_special_token("[TOOL_CALLS]"))
        theirs = _decode_tool_calls(parts, raw)
        assert content == [] and [(c.function.name, json.loads(c.function.arguments)) for c in theirs] == got
        if version in WRITES_IDS:
            assert [c.id for c in theirs] == [c["id"] for c in parsed["tool_calls"]]


@pytest.mark.parametrize("version", ["v7", "v11", "v13"])
def test_content_and_reasoning_before_the_calls(folder, version):
    ours = _pair("tekken_240911.json", version, folder)[0]
    turn = {**CALLS, "content": "Let me check 🎉."}
    if version == "v13":
        turn["reasoning_content"] = "Two tools: weather, then add."
    parsed = parse_answer(ours, _answer_ids(ours, [U("go"), turn]))
    assert parsed["content"] == "Let me check 🎉."
    assert parsed.get("reasoning_content") == turn.get("reasoning_content")
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["get_weather", "add-2"]


def test_a_plain_answer_has_no_tool_calls_and_stops_at_eos(folder):
    ours = _pair("tekken_240911.json", "v11", folder)[0]
    ids = ours.encode("Sunny, 21 °C.") + [ours.eos_id] + ours.encode("junk after EOS")
    assert parse_answer(ours, ids) == {"role": "assistant", "content": "Sunny, 21 °C."}


@pytest.mark.parametrize("version,body,needle", [("v7", "[{\"name\": \"f\", \"arguments\": {", "not JSON"),
                                                 ("v7", "{\"name\": \"f\"}", "JSON list"),
                                                 ("v11", None, "exactly one [ARGS]")])
def test_malformed_calls_are_one_clear_error(folder, version, body, needle):
    ours = _pair("tekken_240911.json", version, folder)[0]
    calls = ours.control_id("[TOOL_CALLS]")
    ids = [calls] + (ours.encode(body) if body else ours.encode("get_weather"))
    with pytest.raises(ToolCallError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_answer(ours, ids)


@pytest.mark.parametrize("version", ["v3", "v11", "v13"])
def test_tool_results_after_a_parsed_answer_encode_as_the_next_turn(folder, version):
    """The parsed answer + one result per call is a conversation our encoder (and mistral-common) takes:
    its prompt is the conversation's ids so far, ending with the results, ready for the next answer."""
    from tests.oracle.test_chat_formats_parity import _expected

    ours, official, _ = _pair("tekken_240911.json", version, folder)
    msgs = [U("Weather in Seoul and 1+2?")]
    answer = parse_answer(ours, _answer_ids(ours, [*msgs, CALLS]))
    results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": "21"}
               for c in answer["tool_calls"]]
    conversation = [*msgs, answer, *results]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True, tools=TOOLS)
    full, _ = ours.encode_chat([*conversation, {"role": "assistant", "content": "21 and 3."}], tools=TOOLS)
    assert full[:len(prompt)] == prompt and ours.decode(full[len(prompt):]) == "21 and 3."
    assert full == _expected(official, [*conversation, {"role": "assistant", "content": "21 and 3."}], TOOLS)[0]


# ---- the Python API and the CLI, with a tiny model whose answers are forced


@pytest.fixture(scope="module")
def tekken_model(tmp_path_factory, folder):
    """A tiny random model with a Tekken v11 tokenizer folder (its answers are noise: tests force them)."""
    from mistral_train.tokenizer.files import write_tokenizer_files

    ours = _pair("tekken_240911.json", "v11", folder)[0]
    path = save_tiny_folder(tmp_path_factory.mktemp("tekken_model"), seed=0, vocab_size=ours.vocab_size, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            bos_token_id=ours.bos_id, eos_token_id=ours.eos_id)
    write_tokenizer_files(ours, path)
    return path, ours


def _forced(answer_ids):
    """A stand-in for generate that appends `answer_ids` to the prompt, and records the prompt."""
    seen = {}

    def fake(model, input_ids, max_new_tokens, **kwargs):
        prompt = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([list(input_ids)])
        seen["prompt"] = prompt[0].tolist()
        return torch.cat([prompt.cpu(), torch.tensor([answer_ids])], dim=1)

    return fake, seen


def test_chat_returns_the_parsed_answer_and_takes_results_next(tekken_model, monkeypatch):
    import mistral_train.chat as chat_module
    from mistral_train import Mistral

    path, ours = tekken_model
    model = Mistral.from_pretrained(path).eval()
    answer_ids = _answer_ids(ours, [U("weather?"), CALLS])
    fake, seen = _forced(answer_ids)
    monkeypatch.setattr(chat_module, "generate", fake)
    msgs = [U("weather?")]
    answer = chat(model, ours, msgs, tools=TOOLS)
    assert seen["prompt"] == ours.apply_chat_template(msgs, add_generation_prompt=True, tools=TOOLS)
    assert [c["id"] for c in answer["tool_calls"]] == ["abcDEF123", "XYZ987abc"]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in answer["tool_calls"]]
    chat(model, ours, [*msgs, answer, *results], tools=TOOLS)
    assert seen["prompt"] == ours.apply_chat_template([*msgs, answer, *results], add_generation_prompt=True, tools=TOOLS)
    monkeypatch.undo()
    plain = chat(model, ours, msgs, tools=TOOLS, max_new_tokens=3)  # the real generate: noise, but a message
    assert plain["role"] == "assistant" and isinstance(plain["content"], str)


def test_cli_prints_the_parsed_calls_as_an_assistant_message(tekken_model, tmp_path, monkeypatch, capsys):
    import mistral_train.generate as generate_module

    path, ours = tekken_model
    answer_ids = _answer_ids(ours, [U("weather?"), CALLS])
    fake, seen = _forced(answer_ids)
    monkeypatch.setattr(generate_module, "generate", fake)
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps([{"role": "system", "content": "Use tools."}]), encoding="utf-8")
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS), encoding="utf-8")
    assert main(["generate", str(path), "--chat", "--prompt", "weather?", "--messages", str(conversation),
                 "--tools", str(tmp_path / "tools.json"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-1])
    assert printed == parse_answer(ours, answer_ids) and printed["tool_calls"][0]["id"] == "abcDEF123"
    msgs = [{"role": "system", "content": "Use tools."}, U("weather?")]
    assert seen["prompt"] == ours.apply_chat_template(msgs, add_generation_prompt=True, tools=TOOLS)
    # the printed message and its results, as the next --messages, give the next prompt
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "21"} for c in printed["tool_calls"]]
    conversation.write_text(json.dumps([*msgs, printed, *results]), encoding="utf-8")
    fake2, seen2 = _forced(ours.encode("Sunny.") + [ours.eos_id])
    monkeypatch.setattr(generate_module, "generate", fake2)
    assert main(["generate", str(path), "--chat", "--messages", str(conversation), "--tools",
                 str(tmp_path / "tools.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n").endswith("Sunny.") and "tool_calls" not in out
    assert seen2["prompt"] == ours.apply_chat_template([*msgs, printed, *results], add_generation_prompt=True, tools=TOOLS)


def test_cli_tools_without_chat_and_a_bad_conversation_are_one_line_errors(tekken_model, tmp_path, capsys):
    path, _ = tekken_model
    (tmp_path / "tools.json").write_text("{}", encoding="utf-8")
    assert main(["generate", str(path), "--prompt", "x", "--tools", str(tmp_path / "tools.json"), "--device", "cpu"]) == 2
    assert "need --chat" in capsys.readouterr().err
    assert main(["generate", str(path), "--chat", "--prompt", "x", "--tools", str(tmp_path / "tools.json")]) == 2
    assert "tools.json: expected a JSON list of tools" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps([{"role": "assistant", "content": "hi"}]), encoding="utf-8")
    assert main(["generate", str(path), "--chat", "--messages", str(tmp_path / "c.json"), "--device", "cpu"]) == 2
    assert "c.json: message 0" in capsys.readouterr().err
