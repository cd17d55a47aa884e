"""The built-in reward functions, named in a config as "mistral_train.rollout.rewards:NAME" (rewards.py
re-exports them): `exact_answer`, `format_regex`, `length_penalty`. Each takes trl's calling convention
(rewards.py): `completions` are strings or [{"role": "assistant", "content": text}] lists, the rows' fields
come as keyword arguments, and anything else it does not use is accepted and ignored.

`normalize_answer` is the one answer normalisation: held-out exact match (train/evaluate.py) uses it too.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional

from mistral_train.errors import ConfigError

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
    if fn is length_penalty:
        target = kwargs.get("target_length")
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ConfigError(f"{where}.kwargs.target_length: length_penalty needs a positive number of "
                              f"characters, got {target!r}")


