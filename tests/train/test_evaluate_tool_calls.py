"""Exact match on held-out rows that end with a tool call: the generated answer's parsed calls against the row's."""

import json

from mistral_train.data.formats import to_canonical
from mistral_train.data.sft import assistant_spans
from mistral_train.train.evaluate import _predicted_calls, checkable, expected_calls
from tests._tokenizers import bundled

ROW = json.loads(open("mistral_train/resources/data/tiny_tools_eval.jsonl").readline())


def test_a_row_ending_with_a_call_is_scored_by_its_call():
    row = to_canonical(ROW, "messages", {}, "tiny_tools_eval.jsonl line 1")
    calls = expected_calls(row)
    assert checkable(row) and calls == [("calculator", row["messages"][-1]["tool_calls"][0]["function"]["arguments"])]
    assert not checkable({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    tokenizer = bundled("v3")
    ids, mask = tokenizer.encode_chat(row["messages"], tools=row["tools"])
    start, end = assistant_spans(mask)[-1]
    answer = ids[start:end]  # what a perfect model generates: [TOOL_CALLS][{...}]</s>
    assert _predicted_calls(tokenizer, answer, None) == calls
    text = tokenizer.decode(answer[1:])  # the JSON after [TOOL_CALLS]
    wrong = answer[:1] + tokenizer.encode(text.replace(calls[0][1]["expression"], "1 + 1"), bos=False)
    assert _predicted_calls(tokenizer, wrong, None) == [("calculator", {"expression": "1 + 1"})]  # parsed, not equal
    assert _predicted_calls(tokenizer, answer[:-8], None) is None  # cut short: the JSON does not parse
    assert _predicted_calls(tokenizer, tokenizer.encode("19"), None) is None  # text, no call
