"""Jinja chat templates, one per chat format, for the `chat_template` of the tokenizer_config.json we
write: transformers' and vLLM's `apply_chat_template` then give the ids of `Tokenizer.encode_chat`.

The templates lean on how our tokenizer.json tokenizes (mistral_train/tokenizer/sentencepiece_json.py): every
stretch of text between two special tokens gets its own leading `▁`, as mistral-common tokenizes each
turn on its own. So v2/v3 put a turn's text right after `[INST]`/`[/INST]` with no space, and v1,
where `[INST]` is plain text, writes `[INST] user [/INST] answer` as one stretch after BOS/EOS.

What mistral-common 1.13 does, and the templates repeat: the system messages, wherever they are
(joined by a blank line), go into one user turn as `system + "\n\n" + user`: the FIRST user turn in
v1, the LAST in v2/v3; v2/v3 drop trailing spaces of answers; every answer ends with EOS. A prompt
ends with `[/INST]`: there is no separate generation prompt, so `add_generation_prompt` only insists
that the chat ends with a user turn. v1 has no tools (the template refuses them).

That is v1 here; v2 to v15 (SentencePiece or Tekken, with tools, calls, results and thinking) come from
tool_templates.py. `chat_template` is the one place a folder's template comes from.
"""

from __future__ import annotations

from typing import Optional

from mistral_train.tokenizer.tool_templates import tool_template

# Checks the conversation as our encoder does (chat_messages.check, for text conversations: system, user
# and assistant messages with string content; tools are refused), joins the non-empty system messages
# with a blank line, and finds the first and last user messages. ns.prev: the previous message's role;
# ns.turn: the previous user or assistant message's role.
_PREAMBLE = (
    "{%- if tools %}{{- raise_exception('tool definitions are not in this chat template: encode tool "
    "conversations with mistral-train or mistral-common') }}{%- endif %}"
    "{%- set ns = namespace(system='', first=-1, last=-1, prev='', turn='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] or message['tool_calls'] is defined and "
    "message['tool_calls'] %}"
    "{{- raise_exception('only system, user and assistant messages without tool calls are in this chat template') }}"
    "{%- endif %}"
    "{%- if message['content'] is not string %}{{- raise_exception('message content must be a string') }}{%- endif %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if ns.prev == 'assistant' %}{{- raise_exception('a system message cannot follow an assistant message') }}"
    "{%- endif %}"
    "{%- if message['content'] %}"
    "{%- set ns.system = ns.system + '\\n\\n' + message['content'] if ns.system else message['content'] %}"
    "{%- endif %}"
    "{%- else %}"
    "{%- if message['role'] != ('assistant' if ns.turn == 'user' else 'user') %}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user (system messages aside)') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if ns.first < 0 %}{%- set ns.first = loop.index0 %}{%- endif %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}"
    "{%- set ns.turn = message['role'] %}"
    "{%- endif %}"
    "{%- set ns.prev = message['role'] %}"
    "{%- endfor %}"
    "{%- if ns.last < 0 %}{{- raise_exception('the conversation has no user message') }}{%- endif %}"
    "{%- if ns.prev == 'system' %}{{- raise_exception('the conversation ends with a system message') }}{%- endif %}"
    "{%- if add_generation_prompt and ns.turn != 'user' %}"
    "{{- raise_exception('add_generation_prompt needs a conversation that ends with a user message') }}"
    "{%- endif %}"
    "{{- bos_token }}"
)


def _turns(system_turn: str, user: str, assistant: str) -> str:
    """The loop over messages; `user` and `assistant` are Jinja expressions over `text` / `message`."""
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{%- set text = message['content'] %}"
        f"{{%- if ns.system and loop.index0 == ns.{system_turn} %}}{{%- set text = ns.system + '\\n\\n' + text %}}"
        "{%- endif %}"
        f"{{{{- {user} }}}}"
        "{%- elif message['role'] == 'assistant' %}"
        f"{{{{- {assistant} + eos_token }}}}"
        "{%- endif %}"
        "{%- endfor %}"
    )


# v1: [INST] is text.
_V1 = _PREAMBLE + _turns("first", "'[INST] ' + text + ' [/INST]'", "' ' + message['content']")

# v2 to v13: with tools (tool_templates.py); v15 bakes in its tokenizer's model settings: `chat_template`
CHAT_TEMPLATES: dict[str, str] = {"v1": _V1, **{v: tool_template(v) for v in ("v2", "v3", "v7", "v11", "v13")}}

# our key in tokenizer_config.json: what the folder's template cannot express (README: "Chat templates")
TEMPLATE_LIMITS_KEY = "mistral_train_chat_template_limits"
_TEXT = ("text that spells a control token ([INST], </s>, ...) is that token to transformers' tokenizer, plain text "
         "to mistral-common and mistral-train")
_WEIGHT = "per-message weight: it changes only the trained mask, which a template has not"
_JSON = ("tool call arguments (and v2/v3 tool results) given as JSON strings are written as given; mistral-common "
         "re-serializes them with json.dumps: they agree when the string is in json.dumps form or arguments are objects")
TEMPLATE_LIMITS: dict[str, list[str]] = {"v1": [_TEXT, _WEIGHT, "tools: chat format v1 has none"],
                                         **{v: [_TEXT, _WEIGHT, _JSON] for v in ("v2", "v3", "v7", "v11", "v13", "v15")}}


def chat_template(chat_format: str, settings_builder: Optional[dict] = None) -> Optional[str]:
    """The Jinja template of `chat_format` (None: none written); v15's carries the reasoning-effort values
    and default of the tokenizer file's model_settings_builder."""
    if chat_format == "v15":
        return tool_template("v15", settings_builder)
    return CHAT_TEMPLATES.get(chat_format)
