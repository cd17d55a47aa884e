"""OpenAI-form chat messages -> checked `Message` records for the chat formats (chat_formats.py).

Accepted, per message: `role` (system | user | assistant | tool); `content` (a string, or a list of
`{"type": "text", "text": ...}` chunks, plus `{"type": "thinking", "thinking": ..., "closed": bool}`
for the assistant); the assistant's `tool_calls` (`[{"id", "function": {"name", "arguments"}}]`,
arguments a JSON string or an object), `reasoning_content` / `reasoning` (a closed thinking chunk
before the content), `weight` (0 or 1: mistral-common's fine-tuning weight; 0 leaves the turn
untrained) and `prefix` (last message only: the answer is left open, no EOS); the tool's
`tool_call_id` and `name`.

The checks refuse what mistral-common 1.13 refuses in fine-tuning mode, each as one line naming the
message. Where we are stricter, it is on purpose and cheap to follow: two user (or two assistant)
messages in a row are refused (mistral-common joins them with a blank line: write one message), and
the first message after the system messages must be a user message.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

ROLES = ("system", "user", "assistant", "tool")
VERSIONS = ("v1", "v2", "v3", "v7", "v11", "v13", "v15")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # v3 to v11
CALL_ID_CHARS = string.ascii_letters + string.digits  # what a call id is made of
Chunk = tuple  # ("text", str) | ("think", str, closed)


@dataclass
class Call:
    id: str  # "null" when the data gives none
    name: str
    arguments: Any  # the parsed JSON value, or the raw string when it is not JSON


@dataclass
class Message:
    role: str
    content: Union[str, list[Chunk]]  # a string unless thinking chunks are present
    calls: list[Call] = field(default_factory=list)
    call_id: Optional[str] = None
    name: Optional[str] = None
    trained: bool = True  # weight != 0 (assistant only)
    prefix: bool = False


def number(version: str) -> int:
    return int(version[1:])


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or `text` itself when it is not JSON (as mistral-common)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def call_arguments(raw: Any) -> Any:
    """A tool call's `arguments` as a JSON value: an object as given, a JSON string parsed (json.JSONDecodeError
    when it is not JSON: the caller keeps or refuses it), {} for None or ""; TypeError for any other type."""
    if raw is not None and not isinstance(raw, (str, dict)):
        raise TypeError(f"tool call arguments must be a JSON string or an object, got {type(raw).__name__}")
    if isinstance(raw, str) and raw:
        return json.loads(raw)
    return raw or {}


def _chunks(raw: Any, role: str, where: str) -> list[Chunk]:
    if raw is None or isinstance(raw, str):
        return [("text", raw or "")]
    if not isinstance(raw, list):
        raise ValueError(f"{where}: content must be a string or a list of chunks, got {type(raw).__name__}")
    bad = [c for c in raw if not isinstance(c, dict)]
    if bad:
        raise ValueError(f"{where}: content must be a string or a list of chunk dicts, got {bad[0]!r} in the list")
    out = []
    for chunk in raw:
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind == "text" and isinstance(chunk.get("text"), str):
            out.append(("text", chunk["text"]))
        elif kind == "thinking" and role == "assistant" and isinstance(chunk.get("thinking"), str):
            out.append(("think", chunk["thinking"], bool(chunk.get("closed", True))))
        else:
            allowed = "text or thinking" if role == "assistant" else "text"
            raise ValueError(f"{where}: content chunk {chunk!r} not understood; expected {allowed} chunks")
    return out


def _join(chunks: list[Chunk], join: str) -> Union[str, list[Chunk]]:
    """Adjacent text chunks joined by `join`, empty ones dropped; a plain string unless a thinking
    chunk remains."""
    out: list[Chunk] = []
    for chunk in chunks:
        if chunk[0] == "text":
            if not chunk[1]:
                continue
            if out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + join + chunk[1])
                continue
        out.append(chunk)
    if all(c[0] == "text" for c in out):
        return out[0][1] if out else ""
    return out


def _call(raw: Any, where: str) -> Call:
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: tool call {raw!r} needs a 'function' with a 'name'")
    try:
        args = call_arguments(fn.get("arguments"))
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None
    except json.JSONDecodeError:
        args = fn["arguments"]  # kept as the string, as mistral-common does
    return Call(str(raw.get("id") or "null"), fn["name"], args)


def parse(messages: Sequence[dict], version: str) -> list[Message]:
    """Messages as `Message` records; raises ValueError naming the message on a malformed one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"empty conversation: expected a non-empty list of messages, got {messages!r}")
    join = "" if number(version) >= 15 else "\n\n"  # how mistral-common joins text chunks of one message
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        chunks = _chunks(m.get("content"), role, where)
        if role == "assistant":
            thinking = m.get("reasoning_content", m.get("reasoning"))
            if thinking is not None:
                chunks.insert(0, ("think", str(thinking), True))
        msg = Message(role, _join(chunks, join))
        if role == "assistant":
            msg.calls = [_call(c, where) for c in (m.get("tool_calls") or [])]
            weight = m.get("weight", 1)
            if weight not in (0, 1):
                raise ValueError(f"{where}: weight must be 0 or 1, got {weight!r}")
            msg.trained, msg.prefix = weight == 1, bool(m.get("prefix", False))
            if not msg.content and not msg.calls:
                raise ValueError(f"{where}: assistant content is empty and there are no tool_calls")
        elif role == "tool":
            if not isinstance(msg.content, str):
                raise ValueError(f"{where}: tool content must be text")
            msg.call_id, msg.name = m.get("tool_call_id"), m.get("name")
        elif any(k in m for k in ("tool_calls", "weight", "prefix")):
            raise ValueError(f"{where}: only assistant messages take tool_calls, weight or prefix")
        out.append(msg)
    return out


def check(msgs: list[Message], version: str, tools: Optional[list]) -> None:
    """Refuse the conversations mistral-common refuses for `version` (and the two stricter rules)."""
    v = number(version)
    if tools and v < 2:
        raise ValueError(f"tools: chat format {version} has no tool definitions; use a v2+ tokenizer")
    for tool in tools or []:
        name = tool.get("function", {}).get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools: tool {tool!r} needs function.name of 1-64 letters, digits, '_' or '-'")
    seen_user, prev, expected, observed = False, None, [], []
    last_user = max(i for i, m in enumerate(msgs) if m.role == "user") if any(m.role == "user" for m in msgs) else -1
    for i, m in enumerate(msgs):
        where = f"message {i}"
        if m.role == "system" and prev in ("assistant", "tool"):
            raise ValueError(f"{where}: a system message cannot follow an {prev} message (mistral-common refuses it)")
        if m.role == prev and m.role in ("user", "assistant"):
            other = "assistant" if m.role == "user" else "user"
            raise ValueError(f"{where}: expected role {other!r}: roles must alternate (two {m.role} messages in a "
                             "row: write them as one)")
        if m.role in ("assistant", "tool") and not seen_user:
            raise ValueError(f"{where}: expected role 'user' first (after optional system messages), got {m.role!r}")
        seen_user |= m.role == "user"
        if m.prefix and i != len(msgs) - 1:
            raise ValueError(f"{where}: prefix=True is only allowed on the last message")
        if m.role == "assistant":
            if len(observed) < len(expected):
                raise ValueError(f"{where}: {len(expected) - len(observed)} tool calls have no result before this answer")
            _check_assistant(m, i, version, is_last=i == len(msgs) - 1)
            expected, observed = [c.id for c in m.calls], []
        elif m.role == "tool":
            _check_tool(m, i, version, expected, observed, after_last_user=i > last_user)
        prev = m.role
    if msgs[-1].role == "system":
        raise ValueError(f"message {len(msgs) - 1}: conversation has no user message after the system message"
                         if len(msgs) == 1 else f"message {len(msgs) - 1}: conversation ends with a system message")


def _check_assistant(m: Message, i: int, version: str, is_last: bool) -> None:
    v, where = number(version), f"message {i}"
    if m.calls and v < 2:
        raise ValueError(f"{where}: chat format {version} has no tool calls; use a v2+ tokenizer")
    if m.calls and m.content and v < 7:
        raise ValueError(f"{where}: chat format {version} cannot hold content and tool_calls in one message (v7+ can)")
    if isinstance(m.content, list) and v < 13:
        raise ValueError(f"{where}: thinking chunks need chat format v13+, the tokenizer's is {version}")
    for call in m.calls:
        if not _NAME.match(call.name):
            raise ValueError(f"{where}: tool call name {call.name!r} must be 1-64 letters, digits, '_' or '-'")
        if v >= 13 and call.id == "null":
            raise ValueError(f"{where}: tool call {call.name!r} needs an 'id' (chat format {version})")
        if 3 <= v < 13 and not _CALL_ID.match(call.id) and not (call.id == "null" and is_last):
            raise ValueError(f"{where}: tool call id {call.id!r} must be 9 letters or digits (chat format {version})")
    ids = [c.id for c in m.calls]
    if v >= 11 and len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate tool call ids {ids}")


def _check_tool(m: Message, i: int, version: str, expected: list, observed: list, after_last_user: bool) -> None:
    v, where = number(version), f"message {i}"
    if v < 2:
        raise ValueError(f"{where}: chat format {version} has no tool results; use a v2+ tokenizer")
    if m.name is not None and not _NAME.match(str(m.name)):
        raise ValueError(f"{where}: tool name {m.name!r} must be 1-64 letters, digits, '_' or '-'")
    if v >= 3 and not m.call_id:
        raise ValueError(f"{where}: a tool result needs tool_call_id (chat format {version})")
    if 3 <= v < 13 and not _CALL_ID.match(str(m.call_id)):
        raise ValueError(f"{where}: tool_call_id {m.call_id!r} must be 9 letters or digits (chat format {version})")
    if v >= 13 and m.call_id == "null":
        raise ValueError(f"{where}: tool_call_id must not be 'null' (chat format {version})")
    if v >= 11 and (m.call_id not in expected or m.call_id in observed):
        raise ValueError(f"{where}: tool_call_id {m.call_id!r} answers no pending call of the previous assistant "
                         f"message (calls {expected}, answered {observed})")
    observed.append(m.call_id)
    if len(observed) > len(expected):
        raise ValueError(f"{where}: more tool results than tool calls in the previous assistant message")
    if v == 2 and after_last_user and len(observed) > 1:
        raise ValueError(f"{where}: chat format v2 takes one tool result per assistant turn after the last user "
                         "message (v3+ takes several)")
