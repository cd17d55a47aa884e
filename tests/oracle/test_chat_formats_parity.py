"""Chat formats v1 to v15 against mistral-common 1.13 in fine-tuning mode, for every tokenizer file it
ships and every version that file supports (the version set in a copy: a `.model.vN` name for
SentencePiece, `config.version` for Tekken, plus for v11+ the special-token list those versions need,
built from mistral-common's own `SpecialTokens`). A version mistral-common cannot build for a file is
not a case. Ids must be equal; the mask must be mistral-common's assistant message pieces (minus
weight-0 turns). Conversations: hand-written shapes and a seeded random generator over many shapes.

`python tests/oracle/test_chat_formats_parity.py` prints the file x version table of cases compared.
"""

import json
import random
import shutil
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_train.tokenizer.chat_messages import VERSIONS
from mistral_train.tokenizer.tokenizer import load_tokenizer

DATA = Path(str(resources.files("mistral_common") / "data"))
FILES = ["tokenizer.model.v1", "mistral_instruct_tokenizer_240216.model.v2", "mistral_instruct_tokenizer_240323.model.v3",
         "mistral_instruct_tokenizer_241114.model.v7", "mistral_instruct_tokenizer_241114.model.v7m1",
         "tekken_240718.json", "tekken_240911.json"]
SETTINGS_BUILDER = {"reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none",
                                         "values": ["none", "high"]}}
TEXTS = ["Hi", "What colour is grass?", "Green.  ", " spaced answer ", "안녕하세요, 세계! 오늘 날씨가 좋네요.",
         "emoji 🎉🚀 👩‍👩‍👧 🇰🇷", "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n# end\r\n", "   lots   of   space   ",
         "[INST] literal <s> and </s> [/INST] [TOOL_CALLS]", "line\n\nline", "12345 it's 3.14 O'Neil eBay NaOH"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "add-2", "parameters": {"type": "object", "properties": {}}}}]


def _special_tokens() -> list[dict]:
    """Tekken's first twenty special tokens, then every other token mistral-common defines."""
    names = [t["token_str"] for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    names += [t.value for t in SpecialTokens if t.value not in names]
    return [{"rank": i, "token_str": n, "is_control": True} for i, n in enumerate(names)]


@lru_cache(maxsize=None)
def _tekken_data(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def _copy(name: str, version: str, folder: Path) -> Path:
    """The shipped file set to `version`, as mistral-common reads versions."""
    if name.endswith(".json"):
        data = json.loads(_tekken_data(name))
        data["config"]["version"] = version
        if int(version[1:]) >= 11:
            data["special_tokens"] = _special_tokens()
        if version == "v15":
            data["model_settings_builder"] = SETTINGS_BUILDER
        path = folder / f"tekken_{version}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        return path
    path = folder / f"{name.split('.model')[0]}.model.{version}"
    shutil.copy(DATA / name, path)
    return path


@lru_cache(maxsize=None)
def _pair(name: str, version: str, folder: str):
    """(ours, mistral-common fine-tuning, mistral-common test mode) or None when mistral-common
    cannot build `version` for this file."""
    path = _copy(name, version, Path(folder))
    try:
        official = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    except (AssertionError, KeyError, ValueError, MistralCommonException):
        return None
    inst = official.instruct_tokenizer
    controls = [i for key, i in vars(inst).items() if key.isupper() and isinstance(i, int)
                and key not in ("PREFIX", "SUFFIX")]  # fill-in-the-middle tokens: not chat
    if inst.tokenizer.unk_id in controls:
        return None  # SentencePiece maps a missing control token to <unk>: mistral-common builds it, but it is no format
    return load_tokenizer(path), official, MistralTokenizer.from_file(str(path), mode=ValidationMode.test)


OWN = dict(zip(FILES, ["v1", "v2", "v3", "v7", "v7", "v3", "v3"]))
CASES = [(n, v) for n in FILES for v in VERSIONS]
COMPARED: dict = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chat_formats"))


# ---- conversations -------------------------------------------------------------------------

def _id(rng) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9))


def _call(rng, name=None) -> dict:
    args = rng.choice([{"city": rng.choice(TEXTS)}, json.dumps({"a": 1, "b": [1, 2]}), "{}", "not json", ""])
    return {"id": _id(rng), "type": "function", "function": {"name": name or rng.choice(["get_weather", "add-2"]),
                                                              "arguments": args}}


def random_conversation(rng: random.Random, version: str) -> tuple[list[dict], list | None]:
    """A conversation ending with an assistant answer, of a shape `version` accepts."""
    v = int(version[1:])
    msgs = [{"role": "system", "content": rng.choice(TEXTS)} for _ in range(rng.choice([0, 0, 1, 2]))]
    uses_tools = v >= 2 and rng.random() < 0.6
    for turn in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": rng.choice(TEXTS + [""])})
        if rng.random() < 0.2:  # a system message that is not first
            msgs.append({"role": "system", "content": rng.choice(TEXTS)})
        if uses_tools and rng.random() < 0.6:
            n = 1 if v == 2 else rng.randint(1, 3)
            call = {"role": "assistant", "tool_calls": [_call(rng) for _ in range(n)]}
            if v >= 7 and rng.random() < 0.3:
                call["content"] = rng.choice(TEXTS)
            msgs.append(call)
            results = [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                        "content": rng.choice(TEXTS + ['{"temp": 21, "unit": "°C"}', "[1, 2]", ""])}
                       for c in call["tool_calls"]]
            if v >= 11:
                rng.shuffle(results)  # v11+ sort results into call order
            msgs += results
        answer = {"role": "assistant", "content": rng.choice(TEXTS)}
        if v >= 13 and rng.random() < 0.4:
            answer["reasoning_content"] = rng.choice(TEXTS)
        if rng.random() < 0.2:
            answer["weight"] = 0
        msgs.append(answer)
    tools = rng.sample(TOOLS, rng.randint(1, 2)) if uses_tools else None
    return msgs, tools


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731
CALLS = {"role": "assistant", "tool_calls": [
    {"id": "abcDEF123", "function": {"name": "get_weather", "arguments": '{"city": "서울"}'}},
    {"id": "XYZ987abc", "function": {"name": "add-2", "arguments": {"a": 1, "b": 2}}}]}
RESULTS = [{"role": "tool", "tool_call_id": "XYZ987abc", "name": "add-2", "content": "3"},
           {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"temp": 21}'}]
HAND = {  # name: (messages, tools, lowest version)
    "system first": ([S("Be brief."), U("Hi"), A("Hello! 🎉")], None, 1),
    "system not first": ([U("Hi"), S("Be brief."), A("Hello")], None, 1),
    "several systems": ([S("One."), S("Two."), U("Hi"), A("Yo"), U("again"), S("Three."), A("ok")], None, 1),
    "korean code": ([U(TEXTS[4]), A(TEXTS[6]), U(TEXTS[5]), A(TEXTS[7])], None, 1),
    "parallel tool use": ([S("Use tools."), U("Weather and sum?"), CALLS, *RESULTS, A("21 and 3."),
                           U("thanks"), A("welcome")], TOOLS, 3),
    "tools no calls": ([U("hi"), A("hello")], TOOLS, 2),
    "content and calls": ([U("go"), {**CALLS, "content": "Let me check."}, *RESULTS, A("done")], TOOLS, 7),
    "reasoning": ([U("2+2?"), {"role": "assistant", "reasoning_content": "Add them.", "content": "4"}], None, 13),
    "thinking chunks": ([U("q"), {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "closed": True}, {"type": "text", "text": "a"},
        {"type": "text", "text": "b"}]}], None, 13),
    "weight 0": ([U("a"), {"role": "assistant", "content": "skip me", "weight": 0}, U("b"), A("train me")], None, 1),
}


# ---- the comparison ------------------------------------------------------------------------

def _expected(official: MistralTokenizer, msgs: list[dict], tools, reasoning_effort=None):
    """mistral-common's ids, and its assistant message pieces as the mask (rebuilt message by
    message from its own encoders, checked to add up to its encoding)."""
    request = ChatCompletionRequest.from_openai(messages=msgs, tools=tools,
                                                **({"reasoning_effort": reasoning_effort} if reasoning_effort else {}))
    ids = official.encode_chat_completion(request).tokens
    normalized = official._instruct_request_normalizer.from_chat_completion_request(request)
    inst = official.instruct_tokenizer
    first, last = inst.find_first_last_user(normalized)
    weights = iter([m.get("weight", 1) for m in msgs if m["role"] == "assistant"])
    pieces, mask = inst.start(), [False]
    for k, m in enumerate(normalized.messages):
        if isinstance(m, UserMessage):
            piece = inst.encode_user_message(m, normalized.available_tools, k == last, k == first,
                                             system_prompt=normalized.system_prompt, force_img_first=True,
                                             settings=normalized.settings)[0]
        elif isinstance(m, ToolMessage):
            piece = inst.encode_tool_message(m, k < last)[0]
        elif isinstance(m, SystemMessage):
            piece = inst.encode_system_message(m)[0]
        else:
            piece = inst.encode_assistant_message(m, is_before_last_user_message=k < last)
        pieces += piece
        mask += [isinstance(m, AssistantMessage) and next(weights) != 0] * len(piece)
    assert pieces == ids
    return ids, mask


def _compare(pair, msgs, tools, name, version, reasoning_effort=None) -> bool:
    """Assert ours equals mistral-common, or that both refuse; True when compared."""
    ours, official, _ = pair
    try:
        expected = _expected(official, msgs, tools, reasoning_effort)
    except (MistralCommonException, ValueError, AssertionError):
        with pytest.raises(ValueError):
            ours.encode_chat(msgs, tools=tools, reasoning_effort=reasoning_effort)
        return False
    assert ours.encode_chat(msgs, tools=tools, reasoning_effort=reasoning_effort) == expected, (msgs, tools)
    COMPARED[(name, version)] = COMPARED.get((name, version), 0) + 1
    return True


@pytest.mark.parametrize("name,version", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_every_file_and_version_equals_mistral_common(folder, name, version):
    pair = _pair(name, version, folder)
    if pair is None:  # mistral-common cannot build this version for this file: not a case
        assert version != OWN[name]  # (a file's own version always builds)
        return
    ours = pair[0]
    assert ours.chat_format() == version
    for key, (msgs, tools, lowest) in HAND.items():
        if int(version[1:]) >= lowest:
            assert _compare(pair, msgs, tools, name, version), key
    rng = random.Random(f"{name}-{version}")
    compared = sum(_compare(pair, *random_conversation(rng, version), name, version) for _ in range(25))
    assert compared >= 20  # the generator makes shapes this version accepts
    if version == "v15":
        for effort in ("high", None):
            assert _compare(pair, HAND["parallel tool use"][0], TOOLS, name, version, effort)


@pytest.mark.parametrize("version", ["v3", "v7", "v13"])
def test_assistant_prefix_equals_mistral_common_test_mode(folder, version):
    """An open last answer (prefix, for generation): no EOS, as mistral-common's test mode writes it."""
    ours, _, test_mode = _pair("tekken_240911.json", version, folder)
    msgs = [S("Be brief."), U("Hi"), {"role": "assistant", "content": "Hello, I am", "prefix": True}]
    plain = [{k: x for k, x in m.items() if k != "prefix"} for m in msgs]
    request = ChatCompletionRequest.from_openai(messages=plain, continue_final_message=True)
    expected = test_mode.encode_chat_completion(request).tokens
    ids, mask = ours.encode_chat(msgs)
    assert ids == expected and ids[-1] != ours.eos_id and mask[-1]


def table() -> str:
    """Markdown: file x version -> conversations compared (all equal), '-' where mistral-common has
    no such version for the file."""
    import tempfile

    folder = tempfile.mkdtemp()
    rows = ["| file | " + " | ".join(VERSIONS) + " |", "|---" * (len(VERSIONS) + 1) + "|"]
    for name in FILES:
        cells = []
        for version in VERSIONS:
            pair = _pair(name, version, folder)
            if pair is None:
                cells.append("-")
                continue
            n = 0
            for msgs, tools, lowest in HAND.values():
                n += int(version[1:]) >= lowest and _compare(pair, msgs, tools, name, version)
            rng = random.Random(f"{name}-{version}")
            n += sum(_compare(pair, *random_conversation(rng, version), name, version) for _ in range(25))
            cells.append(str(n))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
