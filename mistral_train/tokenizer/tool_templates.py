"""Jinja chat templates of the formats with tools (v2, v3, v7, v11, v13, v15), for SentencePiece and
Tekken folders alike: each mirrors chat_formats.py piece by piece, so transformers' and vLLM's
`apply_chat_template(messages, tools=...)` give the ids of our `encode_chat`, which are mistral-common's.

Why a template can equal an encoder that tokenizes every piece on its own: in the tokenizer.json we write
(sentencepiece_json.py, tekken_json.py) every stretch of text between two special tokens is tokenized on
its own (SentencePiece gives it its own leading `▁`; Tekken's split regex and BPE never cross a special
token), and every text piece of a Mistral format sits between two control tokens (or BOS/EOS).

What a template cannot do, and the folder's tokenizer_config.json lists (TEMPLATE_LIMITS in
chat_templates.py): parse JSON. Tool call arguments and v2/v3 tool results given as JSON strings are
written as given when they look like JSON (`{`, `[`, a number, true/false/null), else as a JSON string;
our encoder re-serializes them with json.dumps, so the two agree when the string is in json.dumps form
(`{"a": 1}`, not `{"a":1}`). Text that spells a control token (`[INST]`) is that token to transformers'
tokenizer, text to ours. Per-message `weight` only changes the trained mask, which a template has not.
"""

from __future__ import annotations

import json
from typing import Optional

# Text of a content field: a string as given, or the text chunks of a list joined by `join` (empty ones
# dropped), as chat_messages.parse does.
_MACROS = r"""
{%- macro text(content) %}
  {%- if content is string %}{{- content }}
  {%- elif content is not none %}
    {%- set t = namespace(out='', any=false) %}
    {%- for c in content %}
      {%- if c['type'] != 'text' %}{{- raise_exception('only text chunks are in this chat template, got ' + c['type']|string) }}{%- endif %}
      {%- if c['text'] %}{%- set t.out = t.out + join + c['text'] if t.any else c['text'] %}{%- set t.any = true %}{%- endif %}
    {%- endfor %}
    {{- t.out }}
  {%- endif %}
{%- endmacro %}
{%- macro json_value(x) %}
  {%- if x is none or x is undefined or x == '' %}{{- '{}' }}
  {%- elif x is string %}
    {%- if x[:1] in ['{', '['] or x in ['true', 'false', 'null'] or (x|int|string) == x or (x|float|string) == x %}{{- x }}
    {%- else %}{{- x|tojson }}{%- endif %}
  {%- else %}{{- x|tojson }}
  {%- endif %}
{%- endmacro %}
{%- macro call_id(c) %}{%- if c['id'] is defined and c['id'] and c['id'] != 'null' %}{{- c['id'] }}{%- endif %}{%- endmacro %}
{%- macro result(m) %}
  {%- if v < 7 %}
    {%- set content = json_value(text(m['content'])) %}
    {%- if v == 2 %}{%- set name = m['name'] if m['name'] is defined else none %}
      {{- '[TOOL_RESULTS][{"name": ' + name|tojson + ', "content": ' + content + '}][/TOOL_RESULTS]' }}
    {%- else %}{{- '[TOOL_RESULTS]{"content": ' + content + ', "call_id": ' + m['tool_call_id']|tojson + '}[/TOOL_RESULTS]' }}
    {%- endif %}
  {%- else %}
    {{- '[TOOL_RESULTS]' + (m['tool_call_id'] + '[TOOL_CONTENT]' if v < 13 else '') + text(m['content']) + '[/TOOL_RESULTS]' }}
  {%- endif %}
{%- endmacro %}
"""

# Roles, the first and last user message, the system prompt (v2/v3 join it into the last user turn) and
# the head: tool definitions (+ v15 model settings) before the last user turn (v2-v11) or the first (v13+).
_SCAN = r"""
{%- set ns = namespace(system='', first=-1, last=-1, prev='', calls=[]) %}
{%- for message in messages %}
  {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
    {{- raise_exception('message ' + loop.index0|string + ': unknown role ' + message['role']|string) }}
  {%- endif %}
  {%- if message['role'] == 'system' and ns.prev in ['assistant', 'tool'] %}
    {{- raise_exception('message ' + loop.index0|string + ': a system message cannot follow an ' + ns.prev + ' message') }}
  {%- endif %}
  {%- if message['role'] == 'system' and text(message['content']) %}
    {%- set ns.system = ns.system + '\n\n' + text(message['content']) if ns.system else text(message['content']) %}
  {%- endif %}
  {%- if message['role'] == ns.prev and message['role'] in ['user', 'assistant'] %}
    {{- raise_exception('message ' + loop.index0|string + ': roles must alternate (two ' + ns.prev + ' messages in a row: write them as one)') }}
  {%- endif %}
  {%- if message['role'] in ['assistant', 'tool'] and ns.first < 0 %}
    {{- raise_exception('message ' + loop.index0|string + ': expected a user message first (after optional system messages)') }}
  {%- endif %}
  {%- if message['role'] == 'user' %}{%- set ns.first = loop.index0 if ns.first < 0 else ns.first %}{%- set ns.last = loop.index0 %}{%- endif %}
  {%- set ns.prev = message['role'] %}
{%- endfor %}
{%- if ns.last < 0 %}{{- raise_exception('the conversation has no user message') }}{%- endif %}
{%- if add_generation_prompt and ns.prev not in ['user', 'tool'] %}
  {{- raise_exception('add_generation_prompt needs a conversation that ends with a user message or tool results') }}
{%- endif %}
{%- set head = namespace(text='') %}
{%- if tools %}
  {%- set defs = namespace(list=[]) %}
  {%- for t in tools %}
    {%- set f = t['function'] %}
    {%- set defs.list = defs.list + [{'type': 'function', 'function': {'name': f['name'], 'description': f['description'] or '', 'parameters': f['parameters'] or {}}}] %}
  {%- endfor %}
  {%- set head.text = '[AVAILABLE_TOOLS]' + defs.list|tojson + '[/AVAILABLE_TOOLS]' %}
{%- endif %}
"""

_SETTINGS = r"""
{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort is not none else DEFAULT %}
{%- if effort not in ALLOWED %}{{- raise_exception('reasoning_effort ' + effort|string + ' not allowed; expected one of ' + ALLOWED|tojson) }}{%- endif %}
{%- set head.text = head.text + '[MODEL_SETTINGS]' + {'reasoning_effort': effort}|tojson + '[/MODEL_SETTINGS]' %}
"""

_ASSISTANT = r"""
{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] %}
{%- set ns.calls = calls|map(attribute='id')|list %}
{%- set end = '' if message['prefix'] is defined and message['prefix'] else eos_token %}
{%- if v < 7 %}
  {%- if calls and not (v == 2 and loop.index0 < ns.last) %}
    {%- set out = namespace(list=[]) %}
    {%- for c in calls %}
      {%- set id = ', "id": ' + call_id(c)|tojson if v == 3 and call_id(c) else '' %}
      {%- set out.list = out.list + ['{"name": ' + c['function']['name']|tojson + ', "arguments": ' + json_value(c['function']['arguments']) + id + '}'] %}
    {%- endfor %}
    {{- '[TOOL_CALLS][' + out.list|join(', ') + ']' + end }}
  {%- elif not calls %}{{- text(message['content']).rstrip(' ') + end }}
  {%- endif %}
{%- else %}
  {%- set thinking = message['reasoning_content'] if message['reasoning_content'] is defined else message['reasoning'] %}
  {%- set content = message['content'] if message['content'] is defined and message['content'] is not none else '' %}
  {%- set raw = [{'type': 'text', 'text': content}] if content is string else content %}
  {%- if thinking is defined and thinking is not none %}
    {%- set raw = [{'type': 'thinking', 'thinking': thinking|string, 'closed': true}] + raw %}
  {%- endif %}
  {%- set a = namespace(parts=[], think=false) %}
  {%- for c in raw %}
    {%- if c['type'] == 'text' and c['text'] %}
      {%- if a.parts and a.parts[-1][0] == 'text' %}{%- set a.parts = a.parts[:-1] + [['text', a.parts[-1][1] + join + c['text']]] %}
      {%- else %}{%- set a.parts = a.parts + [['text', c['text']]] %}{%- endif %}
    {%- elif c['type'] == 'thinking' %}
      {%- set a.parts = a.parts + [['think', c['thinking'], c['closed'] if c['closed'] is defined else true]] %}{%- set a.think = true %}
    {%- elif c['type'] != 'text' %}{{- raise_exception('assistant content chunks are text or thinking, got ' + c['type']|string) }}
    {%- endif %}
  {%- endfor %}
  {%- if not a.think %}{{- (a.parts[0][1] if a.parts else '').rstrip(' ') }}
  {%- else %}
    {%- for p in a.parts %}{{- p[1] if p[0] == 'text' else '[THINK]' + p[1] + ('[/THINK]' if p[2] else '') }}{%- endfor %}
  {%- endif %}
  {%- if calls and v == 7 %}
    {%- set out = namespace(list=[]) %}
    {%- for c in calls %}
      {%- set id = ', "id": ' + call_id(c)|tojson if call_id(c) else '' %}
      {%- set out.list = out.list + ['{"name": ' + c['function']['name']|tojson + ', "arguments": ' + json_value(c['function']['arguments']) + id + '}'] %}
    {%- endfor %}
    {{- '[TOOL_CALLS][' + out.list|join(', ') + ']' }}
  {%- endif %}
  {%- for c in calls if v >= 11 %}
    {{- '[TOOL_CALLS]' + c['function']['name'] + ('[CALL_ID]' + call_id(c) if v == 11 and call_id(c) else '') + '[ARGS]' + json_value(c['function']['arguments']) }}
  {%- endfor %}
  {{- end }}
{%- endif %}
"""

# v11+ write each run of tool results in the order of the calls they answer (at the run's first message)
_TOOL = r"""
{%- if v < 11 %}
  {%- if not (v == 2 and loop.index0 < ns.last) %}{{- result(message) }}{%- endif %}
{%- elif loop.first or loop.previtem['role'] != 'tool' %}
  {%- set run = namespace(msgs=[], done=false) %}
  {%- for m in messages[loop.index0:] %}
    {%- if not run.done and m['role'] == 'tool' %}{%- set run.msgs = run.msgs + [m] %}{%- else %}{%- set run.done = true %}{%- endif %}
  {%- endfor %}
  {%- for id in ns.calls %}{%- for m in run.msgs if m['tool_call_id'] == id %}{{- result(m) }}{%- endfor %}{%- endfor %}
  {%- for m in run.msgs if m['tool_call_id'] not in ns.calls %}{{- result(m) }}{%- endfor %}
{%- endif %}
"""

_LOOP = r"""
{{- bos_token }}
{%- for message in messages %}
  {%- if message['role'] == 'system' %}
    {%- if v >= 7 %}{{- '[SYSTEM_PROMPT]' + text(message['content']) + '[/SYSTEM_PROMPT]' }}{%- endif %}
  {%- elif message['role'] == 'user' %}
    {%- set user = text(message['content']) %}
    {%- if v < 7 and ns.system and loop.index0 == ns.last %}{%- set user = ns.system + '\n\n' + user %}{%- endif %}
    {{- (head.text if loop.index0 == (ns.first if v >= 13 else ns.last) else '') + '[INST]' + user + '[/INST]' }}
  {%- elif message['role'] == 'tool' %}""" + _TOOL + r"""
  {%- else %}""" + _ASSISTANT + r"""
  {%- endif %}
{%- endfor %}
"""


def _literal(value: object) -> str:
    """A JSON scalar as a Jinja literal (JSON strings and numbers are Jinja literals; null is none)."""
    return "none" if value is None else "true" if value is True else "false" if value is False else json.dumps(value)


def _squeeze(template: str) -> str:
    """One line: the indentation above is for reading; every tag strips the whitespace before it."""
    return "".join(line.strip() for line in template.splitlines())


def tool_template(version: str, settings_builder: Optional[dict] = None) -> str:
    """The chat template of `version` (v2 to v15); v15 bakes in the tokenizer file's reasoning-effort
    values and default (its model_settings_builder), as our encoder reads them."""
    v = int(version[1:])
    head = f"{{%- set v = {v} %}}{{%- set join = '{'' if v >= 15 else chr(92) + 'n' + chr(92) + 'n'}' %}}"
    body = _MACROS + _SCAN
    if v >= 15:
        effort = (settings_builder or {}).get("reasoning_effort")
        if settings_builder is None:
            body += "{{- raise_exception('chat format v15 needs the tokenizer file\\'s model_settings_builder; this file has none') }}"
        elif effort is not None:
            body += (_SETTINGS.replace("DEFAULT", _literal(effort.get("default")))
                     .replace("ALLOWED", "[" + ", ".join(_literal(x) for x in effort.get("values", [])) + "]"))
    return _squeeze(head + body + _LOOP)
