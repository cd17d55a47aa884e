"""Jinja chat templates, one per chat format, for the `chat_template` of the tokenizer_config.json we
write: transformers' and vLLM's `apply_chat_template` then give the ids of `Tokenizer.encode_chat`.

The templates lean on how our tokenizer.json tokenizes (mistral_train/sentencepiece_json.py): every
stretch of text between two special tokens gets its own leading `▁`, as mistral-common tokenizes each
turn on its own. So v2/v3 put a turn's text right after `[INST]`/`[/INST]` with no space, and v1,
where `[INST]` is plain text, writes `[INST] user [/INST] answer` as one stretch after BOS/EOS.

What mistral-common 1.13 does, and the templates repeat: the system message joins a user turn as
`system + "\n\n" + user`, the FIRST user turn in v1, the LAST in v2/v3; v2/v3 drop trailing spaces of
answers; every answer ends with EOS. A prompt ends with `[/INST]`: there is no separate generation
prompt, so `add_generation_prompt` only insists that the chat ends with a user turn.

A new format (Tekken v3, v7+) adds its entry to CHAT_TEMPLATES, the one place a folder's template comes from.
"""

from __future__ import annotations

# Checks the roles (optional leading system, then user/assistant alternating from user) and finds the
# system text and the first and last user turns among `turns` (the messages after the system one).
_PREAMBLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- set ns = namespace(first=-1, last=-1) %}"
    "{%- for message in turns %}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] %}"
    "{{- raise_exception('roles must alternate user/assistant, starting with user, after an optional system message') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if ns.first < 0 %}{%- set ns.first = loop.index0 %}{%- endif %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- if ns.last < 0 %}{{- raise_exception('the conversation has no user message') }}{%- endif %}"
    "{%- if add_generation_prompt and turns[-1]['role'] != 'user' %}"
    "{{- raise_exception('add_generation_prompt needs a conversation that ends with a user message') }}"
    "{%- endif %}"
    "{{- bos_token }}"
)


def _turns(system_turn: str, user: str, assistant: str) -> str:
    """The loop over turns; `user` and `assistant` are Jinja expressions over `text` / `message`."""
    return (
        "{%- for message in turns %}"
        "{%- if message['role'] == 'user' %}"
        "{%- set text = message['content'] %}"
        f"{{%- if system and loop.index0 == ns.{system_turn} %}}{{%- set text = system + '\\n\\n' + text %}}{{%- endif %}}"
        f"{{{{- {user} }}}}"
        "{%- else %}"
        f"{{{{- {assistant} + eos_token }}}}"
        "{%- endif %}"
        "{%- endfor %}"
    )


# v1: [INST] is text. v2/v3 (without tools they encode alike): [INST]/[/INST] are control tokens.
_V1 = _PREAMBLE + _turns("first", "'[INST] ' + text + ' [/INST]'", "' ' + message['content']")
_V2_V3 = _PREAMBLE + _turns("last", "'[INST]' + text + '[/INST]'", "message['content'].rstrip(' ')")

CHAT_TEMPLATES: dict[str, str] = {"v1": _V1, "v2": _V2_V3, "v3": _V2_V3}
