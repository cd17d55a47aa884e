"""The tool-call reward (rollout/reward_builtins.py tool_call_match) on Tekken completions encoded by
mistral-common itself: the expected call scores 1, any other answer 0 (another argument, another function,
plain text, a broken call list), through build_rewards as a GRPO run calls it with tool prompt rows."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.data.formats import to_canonical
from mistral_train.errors import ConfigError
from mistral_train.rollout.reward_builtins import tool_call_match
from mistral_train.rollout.rewards import build_rewards
from mistral_train.tokenizer.tokenizer import load_tokenizer

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"  # Mistral-Nemo's tokenizer
REWARD = "mistral_train.rollout.reward_builtins:tool_call_match"
TOOL = {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression",
                                         "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                        "required": ["expression"]}}}
EXPECTED = [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3 * 4"}}}]


@pytest.fixture(scope="module")
def official():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MistralTokenizer.from_file(str(TEKKEN)).instruct_tokenizer


def answer_ids(official, name: str = "calculator", arguments: str = '{"expression": "3 * 4"}') -> list[int]:
    """mistral-common's tokens of an assistant turn making one call (v3: [TOOL_CALLS][{...,"id"}] then EOS)."""
    call = ToolCall(id="abcdefghi", function=FunctionCall(name=name, arguments=arguments))
    return official.encode_assistant_message(AssistantMessage(tool_calls=[call]), is_before_last_user_message=False)


def test_the_right_call_scores_1_and_a_wrong_one_0(official):
    right = answer_ids(official)
    assert official.tokenizer.decode(right, special_token_policy="keep").startswith("[TOOL_CALLS][{")
    text = official.tokenizer.encode("The answer is 12.", bos=False, eos=True)
    cases = {"right": right,
             "other argument": answer_ids(official, arguments='{"expression": "3 * 5"}'),
             "other function": answer_ids(official, name="search"),
             "plain text": text,
             "broken call list": right[:8] + [official.tokenizer.eos_id]}
    rows = [EXPECTED] * len(cases)
    scores = tool_call_match(["(text)"] * len(cases), completion_ids=list(cases.values()), tool_calls=rows,
                             tokenizer=str(TEKKEN))
    assert dict(zip(cases, scores)) == {"right": 1.0, "other argument": 0.0, "other function": 0.0,
                                        "plain text": 0.0, "broken call list": 0.0}
    # expected calls may also be bare {name, arguments as a JSON string}: compared as JSON values, not text
    bare = [{"name": "calculator", "arguments": json.dumps({"expression": "3 * 4"}, indent=2)}]
    assert tool_call_match(["x"], completion_ids=[right], tool_calls=[bare], tokenizer=str(TEKKEN)) == [1.0]


def test_scored_through_build_rewards_with_tool_prompt_rows(official):
    """As a run scores: prompt_only rows with tools and their expected `tool_calls` column (kept in fields),
    completions decoded without special tokens (the [TOOL_CALLS] token is gone from the text: parsing
    needs the ids)."""
    row = to_canonical({"prompt": [{"role": "user", "content": "What is 3 times 4?"}], "tools": [TOOL],
                        "tool_calls": EXPECTED}, "prompt_only", {}, "tools.jsonl row 1")
    assert row["tools"] == [TOOL] and row["fields"]["tool_calls"] == EXPECTED
    ours = load_tokenizer(TEKKEN)
    rewards = build_rewards(SimpleNamespace(reward_funcs=[{"function": REWARD, "kwargs": {"tokenizer": str(TEKKEN)}}],
                                            reward_weights=None), ours)
    ids = [answer_ids(official), answer_ids(official, arguments='{"expression": "4 * 3"}')]
    texts = [ours.decode(i, skip_special=True) for i in ids]
    assert "[TOOL_CALLS]" not in texts[0]
    scores = rewards.score([row["prompt"]] * 2, texts, [row["fields"]] * 2, completion_ids=ids)
    assert rewards.names == ["tool_call_match"] and scores[:, 0].tolist() == [1.0, 0.0]


def test_without_a_tokenizer_the_config_entry_is_named():
    entry = SimpleNamespace(reward_funcs=[{"function": REWARD}], reward_weights=None)
    with pytest.raises(ConfigError, match=r"trainer\.grpo\.reward_funcs\[0\]\.kwargs\.tokenizer: tool_call_match "
                                          r"needs the model's tokenizer"):
        build_rewards(entry, load_tokenizer(TEKKEN))
