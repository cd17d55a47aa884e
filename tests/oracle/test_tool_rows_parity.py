"""Tool rows as data files hold them (OpenAI messages + tools, LLaMA-Factory's ShareGPT) -> canonical rows ->
our encode_chat, against mistral-common 1.13 encoding the same conversation written by hand in OpenAI form
(fine-tuning mode): equal ids; the trained mask covers the call and the answer, never the tool result."""

import json
from importlib import resources
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.data.formats import to_canonical
from mistral_train.data.sft import tokenize_rows
from mistral_train.tokenizer.tokenizer import load_tokenizer

DATA = Path(str(resources.files("mistral_common") / "data"))
CALC = {"name": "calculator", "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}
ROW = {"tools": json.dumps([CALC]), "conversations": [
    {"from": "human", "value": "What is 12 plus 7?"},
    {"from": "function_call", "value": json.dumps({"name": "calculator", "arguments": {"expression": "12 + 7"}})},
    {"from": "observation", "value": "19"},
    {"from": "gpt", "value": "12 plus 7 is 19."}]}


def _by_hand(call_id: str) -> tuple[list[dict], list[dict]]:
    """The same conversation as a user of OpenAI's API writes it: arguments a JSON string, content null."""
    messages = [{"role": "user", "content": "What is 12 plus 7?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": "calculator", "arguments": '{"expression": "12 + 7"}'}}]},
                {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": "19"},
                {"role": "assistant", "content": "12 plus 7 is 19."}]
    return messages, [{"type": "function", "function": CALC}]


@pytest.mark.parametrize("name", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"])
def test_sharegpt_tool_row_encodes_as_mistral_common_encodes_the_openai_form(name):
    canonical = to_canonical(ROW, "sharegpt", {}, "tools.jsonl line 1")
    call_id = canonical["messages"][1]["tool_calls"][0]["id"]
    messages, tools = _by_hand(call_id)
    official = MistralTokenizer.from_file(str(DATA / name), mode=ValidationMode.finetuning)
    expected = official.encode_chat_completion(ChatCompletionRequest.from_openai(messages=messages, tools=tools)).tokens
    ours = load_tokenizer(DATA / name)
    ids, mask = ours.encode_chat(canonical["messages"], tools=canonical["tools"])
    assert ids == expected
    trained = ours.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert "calculator" in trained and "12 + 7" in trained and "12 plus 7 is 19." in trained
    assert "19" not in trained.replace("12 plus 7 is 19.", "")  # the tool's result is context, not a target
    assert "Evaluate an arithmetic" not in trained  # nor the definitions
    examples, stats = tokenize_rows([{**canonical, "source": "tools.jsonl", "row": 1}], ours, max_seq_len=512)
    assert examples[0].input_ids == expected and stats.total().tool_calls == 1  # what the audit counts
