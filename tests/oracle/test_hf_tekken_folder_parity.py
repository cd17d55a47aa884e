"""Folders written by `write_tokenizer_files` for Tekken and for the formats with tools (v2 to v15) are
complete for transformers: the tokenizer.json we convert from a tekken file encodes text as
mistral-common's Tekkenizer (BOS first), and `AutoTokenizer.from_pretrained(folder)
.apply_chat_template(messages, tools=tools)` equals our `encode_chat` ids, which equal mistral-common's,
over the hand-written conversations and the seeded random ones of test_chat_formats_parity.py (imported).
Conversations that hit a limit the folder's tokenizer_config.json names are left out of the comparison
and one test shows that limit is real. A model folder (config.json) with tekken.json is read by
transformers through mistral-common (MistralCommonBackend): its prompts equal ours too.
"""

import json
import random

import jinja2
import pytest
import transformers
from mistral_common.exceptions import MistralCommonException
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.tokenizer.chat_templates import TEMPLATE_LIMITS_KEY
from mistral_train.tokenizer.files import write_tokenizer_files
from tests.oracle.test_chat_formats_parity import (CALLS, HAND, RESULTS, TEXTS, TOOLS, _expected, _pair,
                                                   random_conversation)
from tests._chat import S, U

CASES = [("mistral_instruct_tokenizer_240216.model.v2", "v2"), ("mistral_instruct_tokenizer_240323.model.v3", "v3"),
         ("mistral_instruct_tokenizer_241114.model.v7", "v7")] + [
    ("tekken_240911.json", v) for v in ("v3", "v7", "v11", "v13", "v15")]
CODE = "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n# end\r\n"
PLAIN_TEXTS = ["안녕하세요, 세계! 오늘 날씨가 좋네요.", "emoji 🎉🚀 👩‍👩‍👧 🇰🇷", CODE, "   lots   of   space   ",
               " " * 40 + "x\n\n\n\n  \t\t ", "12345 it's 3.14 O'Neil eBay NaOH", "Ünïcödé façade naïve", ""]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{v}" for n, v in CASES])
def case(request, source, tmp_path_factory):
    """(version, ours, mistral-common fine-tuning tokenizer, folder, transformers' tokenizer of the folder)."""
    name, version = request.param
    ours, official, _ = _pair(name, version, source)
    folder = tmp_path_factory.mktemp(f"{version}-folder")
    write_tokenizer_files(ours, folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "TokenizersBackend"  # our tokenizer.json and template, not mistral-common
    return version, ours, official, folder, hf


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def expressible(msgs: list[dict]) -> bool:
    """False where the conversation hits a limit the folder names: text spelling a control token."""
    return not any(token in json.dumps(msgs, ensure_ascii=False) for token in ("[INST]", "</s>", "[TOOL_CALLS]"))


def test_text_ids_equal_ours_and_mistral_commons_with_bos(case):
    _, ours, official, _, hf = case
    raw = official.instruct_tokenizer.tokenizer
    for text in PLAIN_TEXTS + TEXTS[:-3]:
        assert hf(text).input_ids == ours.encode(text, bos=True) == raw.encode(text, bos=True, eos=False), text
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_chat_template_equals_ours_and_mistral_common(case):
    version, ours, official, _, hf = case
    compared, left_out = 0, 0
    rng = random.Random(f"hf-{version}")
    conversations = [(m, t) for m, t, lowest in HAND.values() if int(version[1:]) >= lowest]
    conversations += [random_conversation(rng, version) for _ in range(25)]
    for msgs, tools in conversations:
        try:
            expected = _expected(official, msgs, tools)[0]
        except (MistralCommonException, ValueError, AssertionError):  # mistral-common refuses it: not a case
            continue
        if not expressible(msgs):
            left_out += 1
            continue
        assert _ids(hf.apply_chat_template(msgs, tools=tools, tokenize=True)) == ours.encode_chat(msgs, tools=tools)[0] \
            == expected, (msgs, tools)
        compared += 1
    assert compared >= 15 and left_out < compared


def test_prompts_ending_with_tool_results_equal_ours(case):
    version, ours, _, _, hf = case
    calls = CALLS if version != "v2" else {"role": "assistant", "tool_calls": CALLS["tool_calls"][:1]}
    results = RESULTS if version != "v2" else [RESULTS[1]]
    for msgs in ([S("Use tools."), U("Weather and sum?"), calls, *results], [U("서울 날씨?")]):
        assert (_ids(hf.apply_chat_template(msgs, tools=TOOLS, tokenize=True, add_generation_prompt=True))
                == ours.apply_chat_template(msgs, add_generation_prompt=True, tools=TOOLS))


def test_v15_reasoning_effort_is_a_template_argument(source, tmp_path):
    ours, _, _ = _pair("tekken_240911.json", "v15", source)
    write_tokenizer_files(ours, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = HAND["parallel tool use"][0]
    for effort in ("high", "none"):
        assert (_ids(hf.apply_chat_template(msgs, tools=TOOLS, tokenize=True, reasoning_effort=effort))
                == ours.encode_chat(msgs, tools=TOOLS, reasoning_effort=effort)[0])
    with pytest.raises(jinja2.TemplateError, match="reasoning_effort medium not allowed"):
        hf.apply_chat_template(msgs, tools=TOOLS, reasoning_effort="medium")


def test_the_folder_names_its_template_limits_and_they_are_real(case):
    version, ours, _, folder, hf = case
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["mistral_train_chat_format"] == version and config["chat_template"]
    limits = config[TEMPLATE_LIMITS_KEY]
    assert any("control token" in line for line in limits) and any("weight" in line for line in limits)
    assert any("json.dumps" in line for line in limits)
    spelled = [U("what does [INST] mean?"), {"role": "assistant", "content": "a token"}]
    assert _ids(hf.apply_chat_template(spelled, tokenize=True)) != ours.encode_chat(spelled)[0]
    loose = [U("go"), {"role": "assistant", "tool_calls": [
        {"id": "abcDEF123", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}]
    assert _ids(hf.apply_chat_template(loose, tools=TOOLS, tokenize=True)) != ours.encode_chat(loose, tools=TOOLS)[0]
    dumped = [loose[0], {"role": "assistant", "tool_calls": [{**loose[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]
    assert _ids(hf.apply_chat_template(dumped, tools=TOOLS, tokenize=True)) == ours.encode_chat(dumped, tools=TOOLS)[0]


def test_a_tekken_model_folder_keeps_tekken_json_and_transformers_reads_it_through_mistral_common(source, tmp_path):
    ours, _, _ = _pair("tekken_240911.json", "v7", source)
    write_tokenizer_files(ours, tmp_path)
    transformers.MistralConfig(vocab_size=ours.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    assert (tmp_path / "tekken.json").read_bytes() == ours.path.read_bytes()
    assert MistralTokenizer.from_file(str(tmp_path / "tekken.json")).instruct_tokenizer.tokenizer.version.value == "v7"
    msgs = [S("Use tools."), U("Weather and sum?"), CALLS, *RESULTS]
    prompt = ours.apply_chat_template(msgs, add_generation_prompt=True, tools=TOOLS)
    native = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(native).__name__ == "MistralCommonBackend"
    assert _ids(native.apply_chat_template(msgs, tools=TOOLS, tokenize=True)) == prompt
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, mistral_format=False)
    assert _ids(hf.apply_chat_template(msgs, tools=TOOLS, tokenize=True, add_generation_prompt=True)) == prompt
