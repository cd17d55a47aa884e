"""Tool use in data rows -> canonical OpenAI-form messages: assistant tool calls, tool results, definitions.

Two row forms carry tools (data/formats.py reads the rest of the row):
- OpenAI `messages`: an assistant message's `tool_calls` (`[{"id", "type": "function", "function":
  {"name", "arguments"}}]`, arguments a JSON string or an object; content may be null), `tool` messages
  with `tool_call_id` (and optional `name`), and a row-level `tools` list of definitions;
- LLaMA-Factory's ShareGPT: `function_call` turns whose value is the JSON of `{"name", "arguments"}` (or a
  list of them: parallel calls), one `observation` turn per call with its result, in call order, and a
  `tools` field that is a JSON string of `[{"name", "description", "parameters"}]`.

Canonical form (what the tokenizer's encode_chat reads): an assistant message `{"role": "assistant",
"content": str ("" when it only calls), "tool_calls": [{"id", "type": "function", "function": {"name",
"arguments": dict}}]}`, a tool message `{"role": "tool", "content": str, "tool_call_id": id, "name": the
call's name}`, and `tools` as `[{"type": "function", "function": {...}}]`. Calls without an id get a
9-character id from their place in the row (the form chat formats v3-v11 require; the same on every run);
a result without `tool_call_id` answers the first unanswered call before it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from mistral_train.tokenizer.chat_messages import CALL_ID_CHARS, call_arguments

_CALL = '{"name": ..., "arguments": {...}}'


def call_id(turn: int, k: int) -> str:
    """The id of call `k` of message `turn` when the data gives none: 9 letters/digits, fixed by the place."""
    n = int.from_bytes(hashlib.blake2b(f"{turn}:{k}".encode(), digest_size=8).digest(), "big")
    return "".join(CALL_ID_CHARS[(n // 62**j) % 62] for j in range(9))


def _arguments(raw: Any, what: str) -> dict:
    """A call's arguments as a JSON object: given as an object or as a JSON string of one (blank: {})."""
    try:
        value = call_arguments(raw.strip() if isinstance(raw, str) else raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not JSON ({err.msg} at character {err.pos}): {raw[:80]!r}; expected a "
                         "JSON object of the call's arguments") from None
    except TypeError:
        value = raw  # refused below, naming the type
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object of the call's arguments, got {type(value).__name__} {raw!r:.80}")
    return value


def _call(name: Any, arguments: Any, given_id: Any, turn: int, k: int, what: str) -> dict:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} needs a 'name' string (the tool it calls), got {name!r}")
    if given_id is not None and not isinstance(given_id, str):
        raise ValueError(f"{what}.id must be a string, got {type(given_id).__name__}")
    return {"id": given_id or call_id(turn, k), "type": "function",
            "function": {"name": name, "arguments": _arguments(arguments, f"{what}.arguments")}}


def openai_calls(raw: Any, turn: int, what: str) -> list[dict]:
    """An OpenAI assistant message's `tool_calls` (`what` names it in errors) as canonical calls."""
    if not isinstance(raw, list):
        raise ValueError(f"{what} must be a list of {{id, type, function: {{name, arguments}}}}, got {type(raw).__name__}")
    calls = []
    for k, item in enumerate(raw):
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict):
            raise ValueError(f"{what}[{k}] must be an object with a 'function': {{name, arguments}}, got {item!r:.80}")
        calls.append(_call(fn.get("name"), fn.get("arguments"), item.get("id"), turn, k, f"{what}[{k}].function"))
    return calls


def sharegpt_calls(value: str, turn: int, what: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value (JSON of one call or a list of them) as canonical calls."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is a function_call whose value is not JSON ({err.msg} at character {err.pos}): "
                         f"{value[:80]!r}; expected {_CALL} or a list of them") from None
    listed = parsed if isinstance(parsed, list) else [parsed]
    if not listed or not all(isinstance(c, dict) for c in listed):
        raise ValueError(f"{what} is a function_call holding {parsed!r:.80}; expected {_CALL} or a list of them")
    return [_call(c.get("name"), c.get("arguments"), c.get("id"), turn, k, f"{what} call {k}")
            for k, c in enumerate(listed)]


def tool_definitions(raw: Any, what: str) -> Optional[list[dict]]:
    """A row's `tools` (a list, or a JSON string of one) as `[{"type": "function", "function": {...}}]`;
    None when there are none. Bare `{"name", "description", "parameters"}` entries (glaive, LLaMA-Factory)
    are wrapped."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} is not JSON ({err.msg} at character {err.pos}); expected a list of tool "
                             "definitions (or a JSON string of one)") from None
    if not isinstance(raw, list):
        raise ValueError(f"{what} must be a list of tool definitions, got {type(raw).__name__}")
    tools = []
    for k, item in enumerate(raw):
        fn = item.get("function") if isinstance(item, dict) and "function" in item else item
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{what}[{k}] must be a definition with a 'name' ({{\"type\": \"function\", \"function\": "
                             f"{{\"name\", \"description\", \"parameters\"}}}} or the function alone), got {item!r:.80}")
        tools.append({"type": "function", "function": fn})
    return tools or None


def link_results(messages: list[dict], label: str, where: str) -> None:
    """Give every tool result its call's id and name, in place; refuse a result with no call before it,
    one whose id matches no unanswered call, and calls left unanswered before the next turn."""
    pending: list[dict] = []  # calls of the last assistant message not yet answered
    caller = -1  # index of that assistant message, or -1 after a message that is neither it nor a result
    for i, m in enumerate(messages):
        if m["role"] != "tool":
            if pending and caller >= 0:
                ids = [c["id"] for c in pending]
                raise ValueError(f"{where}: {label}[{caller}] calls {ids} but no tool result answers them before "
                                 f"{label}[{i}]; expected one tool message per call right after the call")
            pending = list(m.get("tool_calls") or [])
            caller = i if pending else -1
            continue
        if caller < 0:
            raise ValueError(f"{where}: {label}[{i}] is a tool result with no tool call before it; expected an "
                             "assistant message with tool_calls (ShareGPT: a function_call turn) right before it")
        given = m.get("tool_call_id")
        if given is None:
            if not pending:
                raise ValueError(f"{where}: {label}[{i}] is a tool result, but every call of {label}[{caller}] is "
                                 "already answered; expected one result per call")
            call = pending[0]
        else:
            call = next((c for c in pending if c["id"] == given), None)
            if call is None:
                raise ValueError(f"{where}: {label}[{i}].tool_call_id {given!r} matches no unanswered call of "
                                 f"{label}[{caller}]; expected one of {[c['id'] for c in pending]}")
        name = m.get("name")
        if name is not None and name != call["function"]["name"]:
            raise ValueError(f"{where}: {label}[{i}] is the result of {name!r}, but the call {call['id']!r} it "
                             f"answers is to {call['function']['name']!r}")
        pending.remove(call)
        m["tool_call_id"], m["name"] = call["id"], call["function"]["name"]


def check_calls_defined(messages: list[dict], tools: Optional[list[dict]], label: str, where: str) -> None:
    """Refuse a call to a tool the row's definitions leave out (when the row defines any)."""
    if not tools:
        return
    names = [t["function"]["name"] for t in tools]
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] not in names:
                raise ValueError(f"{where}: {label}[{i}] calls {call['function']['name']!r}, which the row's tools "
                                 f"do not define; expected one of {names}")
