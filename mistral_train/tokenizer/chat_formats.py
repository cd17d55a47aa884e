"""Mistral chat formats v1 to v15: messages -> (ids, trained mask), one builder per format family.

Written from the formats mistral-common 1.13 encodes in fine-tuning mode (tests/oracle checks every
shipped tokenizer file against it). The conversation is built message by message: BOS, then one
piece per message, each text tokenized on its own (as mistral-common does), so the trained mask is
the assistant pieces (answer, thinking, tool calls and the EOS closing them), never found by
searching the ids. System prompts, user turns, tool results and tool definitions are never trained.

- v1: `[INST] {system}\\n\\n{user} [/INST]` written as text; the system prompt in the first user turn.
- v2, v3: [INST]/[/INST] control tokens; the system prompt and the tool definitions in the LAST user
  turn; tool calls `[TOOL_CALLS][{"name", "arguments"(, "id")}]`; v2 drops tool calls and results
  before the last user turn and writes results `[{"name", "content"}]`, v3 `{"content", "call_id"}`.
- v7: system messages in place as [SYSTEM_PROMPT]...[/SYSTEM_PROMPT]; results
  `[TOOL_RESULTS]{id}[TOOL_CONTENT]{content}[/TOOL_RESULTS]`; content and tool calls in one answer.
- v11: one `[TOOL_CALLS]{name}[CALL_ID]{id}[ARGS]{arguments}` per call.
- v13: tool definitions in the FIRST user turn; no call ids; `[THINK]...[/THINK]` reasoning.
- v15: v13 plus `[MODEL_SETTINGS]{"reasoning_effort": ...}[/MODEL_SETTINGS]` after the tool definitions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from mistral_train.tokenizer.chat_messages import VERSIONS, Message, check, number, parse, parse_json

# control tokens each format needs from the tokenizer
NEEDS = {"v1": (), "v2": ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                        "[/TOOL_RESULTS]", "[TOOL_CALLS]")}
NEEDS["v3"] = NEEDS["v2"]
NEEDS["v7"] = NEEDS["v3"] + ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
NEEDS["v11"] = NEEDS["v7"] + ("[ARGS]", "[CALL_ID]")
NEEDS["v13"] = NEEDS["v11"]
NEEDS["v15"] = NEEDS["v13"] + ("[MODEL_SETTINGS]", "[/MODEL_SETTINGS]")


@dataclass
class Vocab:
    """What a chat format needs from a tokenizer."""

    encode: Callable[[str], list[int]]  # text -> ids, no BOS/EOS, control tokens in text stay text
    control: Callable[[str], Optional[int]]  # "[INST]" -> its id, None when absent
    bos: int
    eos: int
    settings_builder: Optional[dict] = None  # a v15 tekken file's model_settings_builder


def encode_chat(vocab: Vocab, version: str, messages: Sequence[dict], tools: Optional[list] = None,
                reasoning_effort: Optional[str] = None) -> tuple[list[int], list[bool]]:
    """(ids, mask) of `messages` in chat format `version`; mask[t] is True on trained tokens."""
    msgs = parse(messages, version)
    check(msgs, version, tools)
    c = _Controls(vocab, version)
    v = number(version)
    if v >= 11:
        msgs = _results_in_call_order(msgs)
    ids, mask = [vocab.bos], [False]
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    tools_at = users[0] if v >= 13 else users[-1]
    head = _tools(vocab, c, tools) + _settings(vocab, c, version, reasoning_effort)
    build = _v1 if v == 1 else _v2_v3 if v < 7 else _v7_up
    for i, m in enumerate(msgs):
        piece = build(vocab, c, v, msgs, i, head if i == tools_at else [])
        ids += piece
        mask += [m.role == "assistant" and m.trained] * len(piece)
    return ids, mask


class _Controls(dict):
    """Control token ids, looked up when a piece needs them: a v3 tokenizer without tool tokens still
    encodes chats without tools; a missing one is a one-line error."""

    def __init__(self, vocab: Vocab, version: str):
        super().__init__()
        self.vocab, self.version = vocab, version

    def __missing__(self, token: str) -> int:
        i = self.vocab.control(token)
        if i is None:
            raise ValueError(f"chat_format {self.version!r} needs the control token {token}, which the tokenizer lacks")
        self[token] = i
        return i


def _tools(vocab: Vocab, c: dict, tools: Optional[list]) -> list[int]:
    if not tools:
        return []
    dumped = [{"type": "function", "function": {"name": t["function"]["name"],
                                                "description": t["function"].get("description") or "",
                                                "parameters": t["function"].get("parameters") or {}}}
              for t in tools]
    return [c["[AVAILABLE_TOOLS]"], *vocab.encode(json.dumps(dumped, ensure_ascii=False)), c["[/AVAILABLE_TOOLS]"]]


def _settings(vocab: Vocab, c: dict, version: str, reasoning_effort: Optional[str]) -> list[int]:
    """v15's model settings (from the tokenizer file's builder: allowed values and default)."""
    if number(version) < 15:
        if reasoning_effort is not None:
            raise ValueError(f"reasoning_effort needs chat format v15, the tokenizer's is {version}")
        return []
    builder = vocab.settings_builder
    if builder is None:
        raise ValueError("chat format v15 needs the tokenizer file's model_settings_builder; this file has none")
    effort = builder.get("reasoning_effort")
    if effort is None:
        if reasoning_effort is not None:
            raise ValueError("reasoning_effort: this tokenizer's model_settings_builder takes no reasoning effort")
        return []
    value = reasoning_effort if reasoning_effort is not None else effort.get("default")
    if value not in effort.get("values", []):
        raise ValueError(f"reasoning_effort {value!r} not allowed; expected one of {effort.get('values')}")
    text = json.dumps({"reasoning_effort": value}, ensure_ascii=False)
    return [c["[MODEL_SETTINGS]"], *vocab.encode(text), c["[/MODEL_SETTINGS]"]]


def _results_in_call_order(msgs: list[Message]) -> list[Message]:
    """v11+: each run of tool results sorted into the order of the calls they answer."""
    out, order = [], {}
    for m in msgs:
        if m.role == "assistant":
            order = {call.id: k for k, call in enumerate(m.calls)}
        if m.role == "tool" and out and out[-1].role == "tool":
            run = len(out)
            while run > 0 and out[run - 1].role == "tool":
                run -= 1
            out[run:] = sorted(out[run:] + [m], key=lambda t: order.get(t.call_id, len(order)))
            continue
        out.append(m)
    return out


def _system_prompt(msgs: list[Message]) -> str:
    return "\n\n".join(m.content for m in msgs if m.role == "system" and m.content)


def _answer_end(vocab: Vocab, m: Message) -> list[int]:
    return [] if m.prefix else [vocab.eos]


def _v1(vocab: Vocab, c: dict, v: int, msgs: list[Message], i: int, head: list[int]) -> list[int]:
    m = msgs[i]
    if m.role == "system":
        return []
    if m.role == "user":
        system = _system_prompt(msgs)
        first = next(k for k, x in enumerate(msgs) if x.role == "user")
        text = system + "\n\n" + m.content if system and i == first else m.content
        return vocab.encode(f"[INST] {text} [/INST]")
    return vocab.encode(m.content) + _answer_end(vocab, m)


def _v2_v3(vocab: Vocab, c: dict, v: int, msgs: list[Message], i: int, head: list[int]) -> list[int]:
    m = msgs[i]
    last_user = max(k for k, x in enumerate(msgs) if x.role == "user")
    if m.role == "system":
        return []
    if m.role == "user":
        system = _system_prompt(msgs)
        text = system + "\n\n" + m.content if system and i == last_user else m.content
        return head + [c["[INST]"], *vocab.encode(text), c["[/INST]"]]
    if m.role == "tool":
        content = parse_json(m.content or "{}")
        if v == 2:
            if i < last_user:
                return []
            result: Any = [{"name": m.name, "content": content}]
        else:
            result = {"content": content, "call_id": m.call_id}
        return [c["[TOOL_RESULTS]"], *vocab.encode(json.dumps(result, ensure_ascii=False)), c["[/TOOL_RESULTS]"]]
    if m.calls:
        if v == 2 and i < last_user:
            return []  # v2 writes no tool calls before the last user turn (not even the EOS)
        calls = [{"name": k.name, "arguments": k.arguments, **({"id": k.id} if v == 3 and k.id != "null" else {})}
                 for k in m.calls]
        return [c["[TOOL_CALLS]"], *vocab.encode(json.dumps(calls, ensure_ascii=False))] + _answer_end(vocab, m)
    return vocab.encode(m.content.rstrip(" ")) + _answer_end(vocab, m)


def _v7_up(vocab: Vocab, c: dict, v: int, msgs: list[Message], i: int, head: list[int]) -> list[int]:
    m = msgs[i]
    if m.role == "system":
        return [c["[SYSTEM_PROMPT]"], *vocab.encode(m.content), c["[/SYSTEM_PROMPT]"]]
    if m.role == "user":
        return head + [c["[INST]"], *vocab.encode(m.content), c["[/INST]"]]
    if m.role == "tool":
        call_id = [*vocab.encode(m.call_id), c["[TOOL_CONTENT]"]] if v < 13 else []
        return [c["[TOOL_RESULTS]"], *call_id, *vocab.encode(m.content), c["[/TOOL_RESULTS]"]]
    out: list[int] = []
    if isinstance(m.content, str):
        out += vocab.encode(m.content.rstrip(" ")) if m.content else []
    else:  # chunks: text as written (no strip), thinking between [THINK] and [/THINK] (open: no end)
        for chunk in m.content:
            if chunk[0] == "text":
                out += vocab.encode(chunk[1])
            else:
                out += [c["[THINK]"], *vocab.encode(chunk[1])] + ([c["[/THINK]"]] if chunk[2] else [])
    if m.calls and v == 7:
        calls = [{"name": k.name, "arguments": k.arguments, **({"id": k.id} if k.id != "null" else {})}
                 for k in m.calls]
        out += [c["[TOOL_CALLS]"], *vocab.encode(json.dumps(calls, ensure_ascii=False))]
    for k in m.calls if v >= 11 else []:
        call_id = [c["[CALL_ID]"], *vocab.encode(k.id)] if v == 11 and k.id != "null" else []
        out += [c["[TOOL_CALLS]"], *vocab.encode(k.name), *call_id, c["[ARGS]"],
                *vocab.encode(json.dumps(k.arguments, ensure_ascii=False))]
    return out + _answer_end(vocab, m)
