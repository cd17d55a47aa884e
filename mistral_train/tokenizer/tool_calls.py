"""A generated assistant answer -> an OpenAI-form assistant message: content, reasoning and tool calls.

The syntax per chat format, as chat_formats.py writes it (and mistral-common's experimental
`_decode_tool_calls` reads it; tests/test_tool_calls.py compares the two):
- v2, v3, v7: `content? [TOOL_CALLS] [{"name": ..., "arguments": {...}(, "id": ...)}, ...]` (ids from v3);
- v11: one `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` per call ([CALL_ID] may be absent);
- v13, v15: one `[TOOL_CALLS]name[ARGS]{...}` per call, no ids; `[THINK]...[/THINK]` reasoning first.

A call gets the id written in the answer; where the format writes none, a fresh 9-character id, so the
call's result can be sent as the next turn (`{"role": "tool", "tool_call_id": id, ...}`): v13+ need one
there and never encode it, v2 answers results by name.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Optional, Sequence

from mistral_train.tokenizer.chat_messages import CALL_ID_CHARS, number
from mistral_train.tokenizer.tokenizer import Tokenizer


class ToolCallError(ValueError):
    """The answer's tool calls do not parse (the model wrote malformed calls)."""


def fresh_call_id() -> str:
    """A 9-character id, the form v3 to v11 require."""
    return "".join(secrets.choice(CALL_ID_CHARS) for _ in range(9))


def _split(ids: list[int], token: Optional[int]) -> list[list[int]]:
    """`ids` cut before every `token` (each later part starts with it); one part when token is None."""
    parts: list[list[int]] = [[]]
    for i in ids:
        if token is not None and i == token:
            parts.append([])
        parts[-1].append(i)
    return parts


def _call(name: str, arguments: Any, call_id: Optional[str]) -> dict:
    if not isinstance(arguments, dict):
        raise ToolCallError(f"tool call {name!r}: arguments must be a JSON object, got {arguments!r}")
    return {"id": call_id or fresh_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ToolCallError(f"{what} is not JSON ({err.msg} at character {err.pos}): {text[:200]!r}") from err


def _calls_json_list(tokenizer: Tokenizer, part: list[int]) -> list[dict]:
    """v2-v7: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"(, "id")}."""
    listed = _json(tokenizer.decode(part[1:]), "the tool call list")
    if not isinstance(listed, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in listed):
        raise ToolCallError(f"expected a JSON list of {{\"name\", \"arguments\"}} objects after [TOOL_CALLS], got {listed!r}")
    return [_call(c["name"], c.get("arguments", {}), c.get("id") if c.get("id") not in (None, "null") else None)
            for c in listed]


def _call_v11(tokenizer: Tokenizer, part: list[int]) -> dict:
    """v11+: `[TOOL_CALLS]name([CALL_ID]id)[ARGS]{...}`."""
    args_id, call_id_id = tokenizer.control_id("[ARGS]"), tokenizer.control_id("[CALL_ID]")
    if part.count(args_id) != 1:
        raise ToolCallError(f"a tool call needs exactly one [ARGS], got {tokenizer.decode(part, skip_special=False)!r}")
    cut = part.index(args_id)
    head, args = part[1:cut], part[cut + 1:]
    call_id = None
    if call_id_id is not None and call_id_id in head:
        k = head.index(call_id_id)
        head, call_id = head[:k], tokenizer.decode(head[k + 1:]).strip()
    name = tokenizer.decode(head).strip()
    return _call(name, _json(tokenizer.decode(args), f"tool call {name!r}: the arguments"), call_id)


def _content(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, Optional[str]]:
    """(answer text, reasoning) of the ids before the first call: [THINK]...[/THINK] chunks are reasoning."""
    think, end = tokenizer.control_id("[THINK]"), tokenizer.control_id("[/THINK]")
    text, reasoning, inside = [], [], False
    run: list[int] = []
    for i in ids + [None]:  # type: ignore[list-item]  # None flushes the last run
        if i is None or i in (think, end) and think is not None:
            (reasoning if inside else text).append(tokenizer.decode(run))
            run, inside = [], i == think
        else:
            run.append(i)
    return "".join(text), ("".join(reasoning) if any(reasoning) or think in ids else None)


def parse_answer(tokenizer: Tokenizer, ids: Sequence[int], chat_format: Optional[str] = None) -> dict:
    """The assistant message of generated answer `ids` (the tokens after the prompt; an EOS and whatever
    follows it are dropped): `{"role": "assistant", "content": str, "tool_calls": [...]}` with
    `tool_calls` only when there are calls, `reasoning_content` only when the answer thinks (v13+).
    Each call is `{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}`.

    Raises:
        ToolCallError: the answer has [TOOL_CALLS] but its calls do not parse.
    """
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    version = number(tokenizer.chat_format(chat_format))
    calls_id = tokenizer.control_id("[TOOL_CALLS]") if version >= 2 else None
    head, *parts = _split(ids, calls_id)
    content, reasoning = _content(tokenizer, head)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if parts:
        if version < 11:  # one [TOOL_CALLS] and a list; a second one would be text the list cannot hold
            calls = [c for part in parts for c in _calls_json_list(tokenizer, part)]
        else:
            calls = [_call_v11(tokenizer, part) for part in parts]
        message["tool_calls"] = calls
    return message
