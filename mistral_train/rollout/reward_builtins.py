"""The built-in reward functions, named in a config as "mistral_train.rollout.rewards:NAME" (rewards.py
re-exports them): `exact_answer`, `format_regex`, `length_penalty`. Each takes trl's calling convention
(rewards.py): `completions` are strings or [{"role": "assistant", "content": text}] lists, the rows' fields
come as keyword arguments, and anything else it does not use is accepted and ignored. `tool_call_match`
("mistral_train.rollout.reward_builtins:tool_call_match", kwargs tokenizer) scores tool-use prompts.

`normalize_answer` is the one answer normalisation: held-out exact match (train/evaluate.py) uses it too.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable, Optional, Sequence

from mistral_train.errors import ConfigError
from mistral_train.tokenizer.chat_messages import call_arguments
from mistral_train.tokenizer.tokenizer import Tokenizer, load_tokenizer
from mistral_train.tokenizer.tool_calls import ToolCallError, parse_answer

_SPACES = re.compile(r"\s+")
_TRAILING = ".,!?;:"  # sentence punctuation a model may add after a short answer ("Sunday." for "Sunday")


class RewardRowError(ValueError):
    """Raised by a reward function about one completion (`index` in the batch), so the run names that row."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def normalize_answer(text: str) -> str:
    """The form exact match compares (held-out evaluation and `exact_answer`): case-folded, runs of
    whitespace made one space, leading and trailing whitespace removed, then trailing sentence punctuation
    (. , ! ? ; :) removed. "  Sunday. " and "sunday" match; "3.5" keeps its inner dot; a leading article
    is not removed."""
    text = _SPACES.sub(" ", text.casefold()).strip()
    return text.rstrip(_TRAILING).rstrip()


def completion_text(completion: Any) -> str:
    """The text of one completion in either of trl's forms: a string, or [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


# ---- built-ins: "mistral_train.rollout.rewards:NAME" --------------------------------------------------------

def exact_answer(completions: list, answer: Optional[list] = None, **_: Any) -> list[float]:
    """1.0 where the completion equals the row's `answer` once both are normalised (`normalize_answer`)."""
    if answer is None:
        raise RewardRowError(0, "the rows have no 'answer' field; exact_answer compares the completion with it")
    scores = []
    for i, (completion, expected) in enumerate(zip(completions, answer)):
        if expected is None:
            raise RewardRowError(i, "the row has no 'answer'; exact_answer compares the completion with it")
        scores.append(float(normalize_answer(completion_text(completion)) == normalize_answer(str(expected))))
    return scores


@functools.lru_cache(maxsize=64)
def _pattern(pattern: str) -> re.Pattern:
    """`pattern` compiled once (DOTALL: `.` crosses lines, as a completion's text does)."""
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ConfigError(f"format_regex: pattern {pattern!r} is not a regular expression ({err})") from err


def format_regex(completions: list, pattern: str, **_: Any) -> list[float]:
    """1.0 where the whole completion matches `pattern` (re.fullmatch, DOTALL), else 0.0."""
    compiled = _pattern(pattern)
    return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]


def length_penalty(completions: list, target_length: int, scale: float = 1.0, **_: Any) -> list[float]:
    """-scale * |len - target_length| / target_length, lengths in characters of the completion's text
    (characters, not tokens: the same score whatever the tokenizer or rollout engine); 0 at the target."""
    return [-scale * abs(len(completion_text(c)) - target_length) / target_length for c in completions]


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Tokenizer:
    """The tokenizer a tool-call reward parses with, loaded once per path (a reward is called every rollout)."""
    return load_tokenizer(path)


def _name_args(call: Any) -> tuple[str, Any]:
    """(name, arguments as a JSON value) of an OpenAI-form call ({"function": {"name", "arguments"}}) or of
    a bare {"name", "arguments"}: arguments may be an object or a JSON string, as chat rows give them."""
    function = call.get("function", call)
    return function["name"], call_arguments(function.get("arguments"))


def tool_call_match(completions: list, completion_ids: Optional[Sequence[Sequence[int]]] = None,
                    tool_calls: Optional[list] = None, tokenizer: Optional[str] = None,
                    chat_format: Optional[str] = None, **_: Any) -> list[float]:
    """1.0 where the completion's tool calls equal the row's expected `tool_calls` (same names and arguments,
    in order; call ids ignored), else 0.0 (no call, another call, malformed calls).

    The completion is parsed from its token ids (`completion_ids`) with the project's own parser
    (tokenizer/tool_calls.parse_answer, the one `generate --chat --tools` and held-out exact match use): the
    decoded text has lost the [TOOL_CALLS] control token. `tokenizer` is the model's tokenizer (its folder or
    file: the recipe passes ${model.path}); `chat_format` as trainer.chat_format (None: the tokenizer's own).
    `tool_calls` is a column of the prompt rows: OpenAI-form calls, or {"name", "arguments"} objects.
    """
    if completion_ids is None:
        raise RewardRowError(0, "tool_call_match needs the completions' token ids (completion_ids)")
    if tool_calls is None:
        raise RewardRowError(0, "the rows have no 'tool_calls' field; tool_call_match compares the completion's "
                                "calls with it")
    tok = _tokenizer(str(tokenizer))
    scores = []
    for i, (ids, expected) in enumerate(zip(completion_ids, tool_calls)):
        try:
            want = [_name_args(call) for call in expected]
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as err:
            raise RewardRowError(i, f"'tool_calls' must be a list of calls with a name and arguments ({err!r})") from err
        try:
            got = [_name_args(call) for call in parse_answer(tok, ids, chat_format).get("tool_calls", [])]
        except (ToolCallError, json.JSONDecodeError):
            got = None  # malformed calls: no match
        scores.append(float(bool(want) and got == want))
    return scores


def check_builtin(fn: Callable, kwargs: dict, where: str) -> None:
    """The built-ins' kwargs, checked when the run starts rather than at the first rollout."""
    if fn is format_regex:
        if not isinstance(kwargs.get("pattern"), str):
            raise ConfigError(f"{where}.kwargs.pattern: format_regex needs a regular expression string, "
                              f"got {kwargs.get('pattern')!r}")
        try:
            _pattern(kwargs["pattern"])
        except ConfigError as err:
            raise ConfigError(f"{where}.kwargs.pattern: {err}") from None
    if fn is tool_call_match:  # the tokenizer is loaded now: a wrong path stops the run before any rollout
        if not isinstance(kwargs.get("tokenizer"), str):
            raise ConfigError(f"{where}.kwargs.tokenizer: tool_call_match needs the model's tokenizer (a folder or "
                              f"file, e.g. ${{model.path}}), got {kwargs.get('tokenizer')!r}")
        _tokenizer(kwargs["tokenizer"])
    if fn is length_penalty:
        target = kwargs.get("target_length")
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ConfigError(f"{where}.kwargs.target_length: length_penalty needs a positive number of "
                              f"characters, got {target!r}")


