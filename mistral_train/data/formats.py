"""Row formats: one row of a data file -> one canonical example, checked strictly.

Canonical examples are `{"text": str}` (format `text`, pretraining),
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (every chat format):
an optional leading system turn, then user/assistant turns alternating from user and ending with
an assistant reply, or `{"prompt": [turns], "chosen": [one assistant turn], "rejected": [one
assistant turn]}` (format `preference`, trl's conversational form): prompt + either answer is such
a conversation. A chat row with an `answer` field (held-out rows whose reply can be checked by
exact match) keeps it as `"answer"`.

Formats and the fields they read (our names; `field_map` renames them, e.g.
`{"messages": "conversation", "content": "text"}`):
- `text`:              `text`
- `alpaca`:            `instruction`, optional `input`, `output`, optional `system`;
                       the user turn is `instruction + "\n\n" + input` when input is non-empty
- `messages`:          `messages`: a list of `{role, content}`
- `sharegpt`:          `conversations`: a list of `{from, value}`, from human|user, gpt|assistant, system,
                       function_call|observation (LLaMA-Factory's tool turns); optional `system`, `tools`
- `prompt_completion`: `prompt`, `completion`: two strings (one user turn, one assistant turn) or,
                       as trl accepts, two message lists (the prompt's turns, then the completion's)
- `preference`:        `prompt`, `chosen`, `rejected`: three strings (a user turn, and two answers to
                       it) or three message lists (trl's conversational form: the prompt's turns, then
                       one assistant message each); or, without `prompt`, two whole conversations
                       (trl's implicit prompt) that must share every turn before their last, the answer
- `chosen_only`:       a preference row read as one chat row, the prompt and its chosen answer (the rejected
                       answer is dropped): the explicit opt-in to fine-tune (SFT) on a pairs file; never
                       chosen by `auto`, which reads such a row as `preference`
- `prompt_only`:       `prompt`: a string (one user turn) or a message list (trl's conversational prompt, ending
                       with a user turn or tool results), no completion: prompts for online RL (grpo, rloo), read
                       as `{"prompt": [turns], "fields": {the row's other fields}}` (+ "answer", "tools")
- `unpaired`:          `prompt`, `completion`, `label`: trl's unpaired preference rows (KTO): two strings (a user
                       turn, its answer) or two message lists (the prompt's turns, one assistant message), and a
                       bool `label` (true: desirable); read as `{"prompt": [turns], "completion": [answer],
                       "label": bool}`

Tool use: `messages` (and prompt_completion's lists) and `sharegpt` rows carry tool calls, their results and
a row-level `tools` list, mapped to canonical form by data/tool_rows.py (the example gains `"tools"`). An
assistant message may also carry `weight` 0 (not trained) or 1.

Data kinds: every format yields one kind of example, "text", "chat", "preference", "prompt" or "unpaired"
(`format_kind`),
and every objective trains on one kind (its entry in train/objectives.py, the one place that says so,
whose `check_data_kind` refuses data of another kind, so nothing is half-used).

A null value counts as a missing field (Parquet and CSV store absent values as nulls). Every
problem raises ValueError starting with `where` (e.g. "data/train.jsonl line 12"); nothing is
skipped.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from mistral_train.data.tool_rows import (check_calls_defined, link_results, openai_calls, sharegpt_calls,
                                          tool_definitions)
from mistral_train.tokenizer.chat_messages import ROLES

FORMATS = ("text", "alpaca", "messages", "sharegpt", "prompt_completion", "preference", "chosen_only", "prompt_only",
           "unpaired")
CHAT_FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "chosen_only")
# the data kinds: what an objective reads
TEXT, CHAT, PAIRS, PROMPTS, UNPAIRED = KINDS = ("text", "chat", "preference", "prompt", "unpaired")
KIND_NAMES = {"text": "plain text", "chat": "chat rows", "preference": "preference pairs", "prompt": "prompts",
              "unpaired": "unpaired preferences"}
# The format of the bundled data of each kind (data.path: null), which data.format=auto stands for there.
BUNDLED_FORMATS = {"text": "text", "chat": "messages", "preference": "preference", "prompt": "prompt_only",
                   "unpaired": "unpaired"}
# Field names `field_map` may rename: top-level fields, then the keys inside one message.
TOP_FIELDS = ("text", "instruction", "input", "output", "system", "messages", "conversations",
              "prompt", "completion", "answer", "chosen", "rejected", "margin", "tools", "label")
MESSAGE_FIELDS = ("role", "content", "from", "value")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}  # function_call: see _turn
_EXPECTS = {
    "text": "a 'text' string",
    "alpaca": "'instruction' and 'output' strings (optional 'input', 'system')",
    "messages": "a 'messages' list of {role, content}",
    "sharegpt": "a 'conversations' list of {from, value}",
    "prompt_completion": "'prompt' and 'completion' (strings or message lists)",
    "preference": "'prompt', 'chosen' and 'rejected' (strings or message lists), or 'chosen' and 'rejected' "
                  "conversations that share their prompt turns",
    "chosen_only": "a preference row ('prompt', 'chosen', 'rejected'), of which the prompt and chosen answer are read",
    "prompt_only": "a 'prompt' (a string or a message list) and no completion; other fields are kept for rewards",
    "unpaired": "'prompt' and 'completion' (strings or message lists) and a bool 'label' (true: desirable)",
}


def format_kind(fmt: str) -> str:
    """What rows of format `fmt` are for: "text" (pretraining), "preference" (pairs), "prompt" (online RL:
    prompts to generate completions for), "unpaired" (KTO: single answers labelled desirable or not) or "chat"
    (SFT)."""
    return {"text": TEXT, "preference": PAIRS, "prompt_only": PROMPTS, "unpaired": UNPAIRED}.get(fmt, CHAT)


def resolve_format(fmt: str, path: Any, kind: str) -> str:
    """`data.format` as the data will be read: `auto` with no path (the bundled data) is the bundled
    data of `kind`, the kind the objective trains on; otherwise `fmt` (auto then decides per file)."""
    return BUNDLED_FORMATS[kind] if fmt == "auto" and path is None else fmt


def check_field_map(field_map: dict[str, str], origin: str = "data.field_map") -> None:
    """Raise ValueError for a key we do not read (a typo would otherwise be ignored) or a non-string name."""
    for ours, theirs in field_map.items():
        if ours not in TOP_FIELDS + MESSAGE_FIELDS:
            raise ValueError(f"{origin}: unknown field {ours!r}; the fields that can be renamed are "
                             f"{', '.join(TOP_FIELDS + MESSAGE_FIELDS)}")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"{origin}.{ours}: expected the field's name in the data files, got {theirs!r}")


def detect_format(row: Any, field_map: Optional[dict[str, str]] = None, where: str = "row") -> str:
    """The format of `row` from the fields it has (after `field_map`), for `data.format: auto`; the first that
    matches in the order below."""
    fm = field_map or {}
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object (a row of named fields), got {type(row).__name__}")
    has = lambda key: row.get(fm.get(key, key)) is not None  # noqa: E731
    if has("chosen") != has("rejected"):  # half a pair: say so rather than "cannot tell the format"
        got, missing = ("chosen", "rejected") if has("chosen") else ("rejected", "chosen")
        raise ValueError(f"{where}: field {fm.get(got, got)!r} without {fm.get(missing, missing)!r}: format "
                         f"preference needs both answers; the row has fields {sorted(row)}")
    for fmt, keys in (("preference", ("chosen", "rejected")), ("messages", ("messages",)),
                      ("sharegpt", ("conversations",)), ("alpaca", ("instruction", "output")),
                      ("unpaired", ("prompt", "completion", "label")), ("prompt_completion", ("prompt", "completion")),
                      ("prompt_only", ("prompt",)),
                      ("text", ("text",))):  # prompt_only after every format that reads a prompt and its answer
        if all(has(k) for k in keys):
            return fmt
    expected = "; ".join(f"{fmt}: {what}" for fmt, what in _EXPECTS.items())
    raise ValueError(f"{where}: cannot tell the row format from its fields {sorted(row)}; expected one of "
                     f"{expected} (set data.format, and data.field_map for other field names)")


def to_canonical(row: Any, fmt: str, field_map: dict[str, str], where: str) -> dict[str, Any]:
    """One row of format `fmt` -> `{"text": str}`, `{"messages": [...]}` (+ `"answer"` when present) or,
    for `preference`, `{"prompt": [...], "chosen": [...], "rejected": [...]}` (+ `"answer"`, and a
    numeric `"margin"` for reward models, when present)."""
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown data.format {fmt!r}; expected one of {', '.join(FORMATS)} or auto")
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object (a row of named fields), got {type(row).__name__}")
    fm = field_map or {}
    if fmt == "text":
        text = _field(row, "text", fm, where, fmt)
        if not text.strip():
            raise ValueError(f"{where}: field {fm.get('text', 'text')!r} is empty (format text)")
        return {"text": text}
    if fmt == "preference":
        pair: dict[str, Any] = _preference(row, fm, where)
        answer = _field(row, "answer", fm, where, fmt, optional=True)  # held-out pairs: exact match on the prompt
        if answer is not None:
            pair["answer"] = answer
        margin = _field(row, "margin", fm, where, fmt, optional=True, kind=(int, float))  # reward models' margin
        if margin is not None:
            pair["margin"] = float(margin)
        return pair
    if fmt == "prompt_only":
        return _prompt_only(row, fm, where)
    if fmt == "unpaired":
        return _unpaired(row, fm, where)
    if fmt == "chosen_only":  # the opt-in to SFT on pairs: prompt + chosen answer, a checked conversation
        pair = _preference(row, fm, where)
        messages, label = pair["prompt"] + pair["chosen"], "turns (prompt, then chosen)"
    elif fmt == "alpaca":
        messages, label = _alpaca(row, fm, where), "turns (from instruction/input/output)"
    elif fmt == "messages":
        messages = _message_list(row, "messages", fm, where, fmt, "role", "content", None)
        label = fm.get("messages", "messages")
    elif fmt == "sharegpt":
        messages = _message_list(row, "conversations", fm, where, fmt, "from", "value", SHAREGPT_ROLES)
        label = fm.get("conversations", "conversations")
        system = _field(row, "system", fm, where, fmt, optional=True)  # LLaMA-Factory's system column
        if system is not None and messages and messages[0]["role"] == "system":
            raise ValueError(f"{where}: field {fm.get('system', 'system')!r} and a system turn in {label!r}: "
                             "expected the system prompt once")
        messages = ([{"role": "system", "content": system}] if system else []) + messages
    else:
        messages, label = _prompt_completion(row, fm, where), "turns (prompt, then completion)"
    link_results(messages, label, where)
    check_conversation(messages, where, label)
    example: dict[str, Any] = {"messages": messages}
    tools = tool_definitions(_field(row, "tools", fm, where, fmt, optional=True, kind=(str, list)),
                             f"{where}: field {fm.get('tools', 'tools')!r}")
    if tools:
        check_calls_defined(messages, tools, label, where)
        example["tools"] = tools
    answer = _field(row, "answer", fm, where, fmt, optional=True)
    if answer is not None:
        example["answer"] = answer
    return example


def check_conversation(messages: list[dict[str, Any]], where: str, label: str = "messages") -> None:
    """Raise ValueError unless `messages` is an optional system turn, then user/assistant turns
    alternating from user and ending with an assistant reply; an assistant message with tool_calls is
    followed by its tool results, then by an assistant message. `label` names the list in errors."""
    if not messages:
        raise ValueError(f"{where}: empty conversation: {label!r} holds no turns (expected user/assistant turns)")
    expected = ("user",)
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i == 0:
            continue
        if role not in expected:
            raise ValueError(f"{where}: {label}[{i}] has role {role!r} where {' or '.join(map(repr, expected))} was "
                             "expected (roles must alternate user/assistant, starting with user, after an optional "
                             "leading system turn; tool results follow the assistant message that calls the tool)")
        calls = message.get("tool_calls")
        if role == "assistant" and not message["content"].strip() and not calls:
            raise ValueError(f"{where}: {label}[{i}] is an assistant turn with empty content (nothing to train on)")
        expected = (("assistant",) if role == "user" else ("tool",) if calls
                    else ("tool", "assistant") if role == "tool" else ("user",))
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: {label} ends with a {messages[-1]['role']!r} turn; expected the conversation "
                         "to end with an assistant reply")


def _field(row: dict, key: str, fm: dict, where: str, fmt: str, optional: bool = False, kind: type = str) -> Any:
    name = fm.get(key, key)
    value = row.get(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: missing field {name!r} (format {fmt} expects {_EXPECTS[fmt]}); "
                         f"the row has fields {sorted(row)}")
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field {name!r} must be a {_type_name(kind)}, got {type(value).__name__} "
                         f"{_short(value)}")
    return value


def _alpaca(row: dict, fm: dict, where: str) -> list[dict[str, str]]:
    instruction = _field(row, "instruction", fm, where, "alpaca")
    extra = _field(row, "input", fm, where, "alpaca", optional=True)
    output = _field(row, "output", fm, where, "alpaca")
    system = _field(row, "system", fm, where, "alpaca", optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return ([{"role": "system", "content": system}] if system else []) + turns


def _message_list(row: dict, key: str, fm: dict, where: str, fmt: str, role_key: str, content_key: str,
                  role_names: Optional[dict[str, str]], value: Any = None, start: int = 0) -> list[dict[str, Any]]:
    """The turns of a list field, each `{role_key, content_key}` (+ tool fields, see `_turn`); `role_names`
    maps the file's role names to ours (None: ours are used as they are). `start`: the index of the
    list's first turn in the whole conversation (it places generated call ids)."""
    label = fm.get(key, key)
    items = _field(row, key, fm, where, fmt, kind=list) if value is None else value
    names = role_names or {r: r for r in ROLES}
    role_field, content_field = fm.get(role_key, role_key), fm.get(content_key, content_key)
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {label}[{i}] must be an object with {role_field!r} and {content_field!r}, "
                             f"got {type(item).__name__} {_short(item)}")
        role = item.get(role_field)
        if role is None:
            raise ValueError(f"{where}: {label}[{i}] is missing field {role_field!r}; it has {sorted(item)}")
        if not isinstance(role, str) or role not in names:
            raise ValueError(f"{where}: {label}[{i}] has unknown role {role!r}; expected one of {', '.join(names)}")
        messages.append(_turn(item, names[role], content_field, f"{label}[{i}]", where, start + i))
    return messages


def _turn(item: dict, role: str, content_field: str, what: str, where: str, turn: int) -> dict[str, Any]:
    """One canonical message from a list item whose role is already ours (or ShareGPT's function_call)."""
    content = item.get(content_field)
    calls = item.get("tool_calls") if role == "assistant" else None
    if content is None and calls is None:  # an assistant message that only calls tools may have no content
        raise ValueError(f"{where}: {what} is missing field {content_field!r}; it has {sorted(item)}")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: {what}.{content_field} must be a string, got {type(content).__name__} "
                         f"{_short(content)}")
    try:
        if role == "function_call":  # ShareGPT: the value is the call's JSON; the turn is an assistant message
            return {"role": "assistant", "content": "", "tool_calls": sharegpt_calls(content, turn, what)}
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if calls is not None:
            message["tool_calls"] = openai_calls(calls, turn, f"{what}.tool_calls")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if role == "assistant" and item.get("weight") is not None:
        if item["weight"] not in (0, 1) or isinstance(item["weight"], bool):
            raise ValueError(f"{where}: {what}.weight must be 0 (not trained) or 1, got {item['weight']!r}")
        message["weight"] = item["weight"]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if item.get(key) is not None:
                if not isinstance(item[key], str):
                    raise ValueError(f"{where}: {what}.{key} must be a string, got {type(item[key]).__name__}")
                message[key] = item[key]
    return message


def _prompt_only(row: dict, fm: dict, where: str) -> dict[str, Any]:
    """A prompt for online RL -> `{"prompt": turns ending with a user turn (or tool results), "fields": the row's
    other fields under their file names (what trl passes reward functions), + "answer", "tools" when given, and
    "prompt_text": a string prompt as the file gave it}`."""
    name = fm.get("prompt", "prompt")
    prompt = _field(row, "prompt", fm, where, "prompt_only", kind=(str, list))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: field {name!r} is empty (format prompt_only)")
        turns: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    else:
        turns = _message_list(row, "prompt", fm, where, "prompt_only", "role", "content", None, value=prompt)
        if not turns or turns[-1]["role"] not in ("user", "tool"):
            last = f"ends with role {turns[-1]['role']!r}" if turns else "holds no turns"
            raise ValueError(f"{where}: {name!r} {last}; expected the prompt to end with a user turn (or tool "
                             "results): the turn the generated completion answers")
        link_results(turns, name, where)
        # a stand-in reply makes the prompt a whole conversation, so the chat rules are checked in one place
        check_conversation(turns + [{"role": "assistant", "content": "reply"}], where, name)
    example: dict[str, Any] = {"prompt": turns, "fields": {k: v for k, v in row.items() if k != name}}
    if isinstance(prompt, str):  # reward functions get it as the file gave it: a string, as trl passes it
        example["prompt_text"] = prompt
    tools = tool_definitions(_field(row, "tools", fm, where, "prompt_only", optional=True, kind=(str, list)),
                             f"{where}: field {fm.get('tools', 'tools')!r}")
    if tools:
        check_calls_defined(turns, tools, name, where)
        example["tools"] = tools
    answer = _field(row, "answer", fm, where, "prompt_only", optional=True)  # exact match on held-out prompts
    if answer is not None:
        example["answer"] = answer
    return example


def _unpaired(row: dict, fm: dict, where: str) -> dict[str, Any]:
    """trl's unpaired preference row -> `{"prompt": turns, "completion": [answer], "label": bool}`, checked so
    that prompt + completion is a valid conversation (+ "answer" when given)."""
    name = lambda key: fm.get(key, key)  # noqa: E731
    label = _field(row, "label", fm, where, "unpaired", kind=bool)  # exactly a bool: 0/1 or "yes" are refused
    turns = _prompt_completion(row, fm, where)  # strings or message lists, as prompt_completion reads them
    given = row[name("completion")]
    n = len(given) if isinstance(given, list) else 1  # the completion's turns end the conversation
    prompt, completion = turns[: len(turns) - n], turns[len(turns) - n :]
    if [m["role"] for m in completion] != ["assistant"]:
        raise ValueError(f"{where}: {name('completion')!r} must hold exactly one assistant message (the answer), got "
                         f"roles {[m['role'] for m in completion]}; earlier turns belong in {name('prompt')!r}")
    link_results(turns, f"{name('prompt')} + {name('completion')}", where)
    check_conversation(turns, where, f"{name('prompt')} + {name('completion')}")
    example: dict[str, Any] = {"prompt": prompt, "completion": completion, "label": label}
    answer = _field(row, "answer", fm, where, "unpaired", optional=True)
    if answer is not None:
        example["answer"] = answer
    return example


def _prompt_completion(row: dict, fm: dict, where: str) -> list[dict[str, str]]:
    prompt = _field(row, "prompt", fm, where, "prompt_completion", kind=(str, list))
    completion = _field(row, "completion", fm, where, "prompt_completion", kind=(str, list))
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        args = (fm, where, "prompt_completion", "role", "content", None)
        return (_message_list(row, "prompt", *args, value=prompt)
                + _message_list(row, "completion", *args, value=completion, start=len(prompt)))
    raise ValueError(f"{where}: fields {fm.get('prompt', 'prompt')!r} and {fm.get('completion', 'completion')!r} "
                     f"must both be strings or both be message lists, got {type(prompt).__name__} and "
                     f"{type(completion).__name__}")


def _preference(row: dict, fm: dict, where: str) -> dict[str, list[dict[str, str]]]:
    """A preference row -> `{"prompt": turns, "chosen": [answer], "rejected": [answer]}` (trl's
    conversational form), checked so that prompt + either answer is a valid conversation."""
    name = lambda key: fm.get(key, key)  # noqa: E731
    kinds = (str, list)
    chosen = _field(row, "chosen", fm, where, "preference", kind=kinds)
    rejected = _field(row, "rejected", fm, where, "preference", kind=kinds)
    prompt = _field(row, "prompt", fm, where, "preference", optional=True, kind=kinds)
    given = [v for v in (prompt, chosen, rejected) if v is not None]
    if not (all(isinstance(v, str) for v in given) or all(isinstance(v, list) for v in given)):
        types = ", ".join(f"{name(k)!r}: {type(v).__name__}" for k, v in
                          (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if v is not None)
        raise ValueError(f"{where}: fields {name('prompt')!r}, {name('chosen')!r} and {name('rejected')!r} must all "
                         f"be strings or all be message lists, got {types}")
    if isinstance(chosen, str):
        if prompt is None:  # a character prefix of two strings is no reliable prompt: ask for it
            raise ValueError(f"{where}: missing field {name('prompt')!r}: string answers need the prompt they "
                             f"answer (only message lists carry it inside them); the row has fields {sorted(row)}")
        for key, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ValueError(f"{where}: field {name(key)!r} is empty")
        turns = {"prompt": [{"role": "user", "content": prompt}],
                 "chosen": [{"role": "assistant", "content": chosen}],
                 "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        args = (fm, where, "preference", "role", "content", None)
        given_lists = (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
        turns = {key: _message_list(row, key, *args, value=value) for key, value in given_lists if value is not None}
        if prompt is None:
            turns = _implicit_prompt(turns["chosen"], turns["rejected"], name, where)
    if not turns["prompt"]:
        raise ValueError(f"{where}: {name('prompt')!r} holds no turns; expected the turns the answers reply to")
    for key in ("chosen", "rejected"):
        answer = turns[key]
        if [m["role"] for m in answer] != ["assistant"]:
            raise ValueError(f"{where}: {name(key)!r} must hold exactly one assistant message (the answer), got roles "
                             f"{[m['role'] for m in answer]}; earlier turns belong in {name('prompt')!r}")
        if not answer[0]["content"].strip():
            raise ValueError(f"{where}: {name(key)!r} is an empty answer (an assistant turn with no text)")
        link_results(turns["prompt"] + answer, f"{name('prompt')} + {name(key)}", where)
        check_conversation(turns["prompt"] + answer, where, f"{name('prompt')} + {name(key)}")
    return turns


def _implicit_prompt(chosen: list[dict[str, str]], rejected: list[dict[str, str]], name: Callable[[str], str],
                     where: str) -> dict[str, list[dict[str, str]]]:
    """trl's implicit prompt: two whole conversations whose shared turns are the prompt. Here they must
    share every turn but their last (the answers), so that the pair compares two answers to one prompt."""
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise ValueError(f"{where}: without a {name('prompt')!r} field, {name(key)!r} must be a whole conversation "
                             f"ending with the assistant answer, got roles {[m['role'] for m in turns]}")
    if chosen[:-1] != rejected[:-1]:
        k = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        show = lambda turns: _short(turns[k]) if k < len(turns) - 1 else "(its answer)"  # noqa: E731
        raise ValueError(f"{where}: the prompt differs between {name('chosen')!r} and {name('rejected')!r}: turn {k} "
                         f"is {show(chosen)} in one and {show(rejected)} in the other; without a {name('prompt')!r} "
                         "field the two conversations must share every turn before their last assistant answer")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _type_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "string", "list": "list"}.get(k.__name__, k.__name__) for k in kinds)


def _short(value: Any) -> str:
    text = repr(value)
    return f"({text[:60]}...)" if len(text) > 63 else f"({text})"
