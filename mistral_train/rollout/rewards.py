"""Reward functions for online RL (GRPO, RLOO): built from `trainer.grpo.reward_funcs`, called as trl's
GRPOTrainer calls them, scored into an (N, F) matrix, combined as trl combines them.

An entry of `reward_funcs` is
- a string "package.module:function" (imported with importlib, never evaluated), or
- a mapping {function: "module:fn", weight: float, kwargs: {...}, name: str} (all but `function` optional), or
- a mapping {model: FOLDER, weight: float, name: str}: a reward model trained by this project (the tiny_reward
  recipe's final/), scoring prompt + completion as it was trained to (reward_model.py).
Built-ins (reward_builtins.py, re-exported here): "mistral_train.rollout.rewards:exact_answer",
":format_regex" (kwargs pattern), ":length_penalty" (kwargs target_length in characters, scale).
Weights come from `reward_weights` (trl's list, one per entry) or from the entries, never both; default 1.
A function's name is its `__name__` (or the entry's `name`), a model's its folder name; repeats get _2, _3.

Calling convention (trl's `_calculate_rewards`): `fn(prompts=..., completions=..., completion_ids=...,
**columns, **kwargs)`, one call per batch of N completions, returning N floats (None: no score, NaN in the
matrix, skipped by `combine`'s nansum as trl). `columns` are the rows' other fields (trl's dataset columns, e.g.
`answer`), one list entry per completion; the entry's `kwargs` win over a column of the same name. As trl
does for its two dataset kinds: when the prompts are message lists (conversational rows), `prompts` are
those lists and `completions` are `[{"role": "assistant", "content": text}]` lists; when the prompts are
strings, both are plain strings. An async function is awaited. trl's `trainer_state`, `log_extra` and
`log_metric` are not passed.

A function that raises, returns something other than a list of N numbers (bool and str are refused), stops
the run with RewardError naming the function, its config entry and the row (file and row number).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch

from mistral_train.errors import ConfigError, UserError
from mistral_train.rollout.reward_builtins import (RewardRowError, check_builtin, exact_answer, format_regex,
                                                   length_penalty, normalize_answer)
from mistral_train.rollout.reward_model import RewardModel
from mistral_train.tokenizer.tokenizer import Tokenizer

__all__ = ["RewardError", "RewardRowError", "RewardSet", "RewardFunction", "build_rewards", "import_function",
           "exact_answer", "format_regex", "length_penalty", "normalize_answer", "RewardModel"]
KEY = "trainer.grpo.reward_funcs"
ENTRY_KEYS = ("function", "model", "weight", "kwargs", "name")


class RewardSpec(Protocol):
    """What build_rewards reads of trainer.grpo (config.GRPOSpec; config/ sits above rollout/, so not imported)."""

    reward_funcs: list[Any]
    reward_weights: Optional[list[float]]


class RewardError(UserError):
    """A reward function failed or returned something that is not one score per completion; the message
    names the function, its config entry and the row."""


# ---- building and scoring ----------------------------------------------------------------------------------

@dataclass
class RewardFunction:
    name: str
    fn: Callable[..., Any]
    kwargs: dict
    where: str  # its config entry, "trainer.grpo.reward_funcs[i]"


def _plain(value: Any) -> Any:
    """Config values as plain dicts and lists (Hydra hands containers of its own)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return [_plain(v) for v in value]
    return value


def import_function(path: Any, where: str) -> Callable:
    """The callable "package.module:function" names (attributes may be dotted: "module:Class.method")."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"{where}={path!r}: expected 'package.module:function' (a reward function's import path)")
    module_name, attribute = path.split(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure of the user's module at import is the user's to fix
        raise ConfigError(f"{where}={path!r}: module {module_name!r} does not import "
                          f"({type(err).__name__}: {err})") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}={path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}={path!r}: {attribute!r} is a {type(target).__name__}, not a callable")
    return target


def _callable_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):  # as trl's get_callable_name
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _entry(entry: Any, where: str, tokenizer: Tokenizer,
           device: torch.device) -> tuple[RewardFunction, Optional[float]]:
    """One reward_funcs entry -> (its function, its own weight or None)."""
    if isinstance(entry, str):
        fn = import_function(entry, where)
        return RewardFunction(_callable_name(fn), fn, {}, where), None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected 'module:function' or a mapping with 'function' or 'model', "
                          f"got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown or ("function" in entry) == ("model" in entry):
        raise ConfigError(f"{where}: expected exactly one of 'function' or 'model' and only the keys {ENTRY_KEYS}, "
                          f"got {sorted(entry)}")
    weight = _weight(entry["weight"], f"{where}.weight") if entry.get("weight") is not None else None
    kwargs = _plain(entry.get("kwargs") or {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.kwargs: expected a mapping of keyword arguments, got {kwargs!r}")
    if "model" in entry:
        if kwargs:
            raise ConfigError(f"{where}.kwargs: a reward model takes no kwargs, got {sorted(kwargs)}")
        model = RewardModel(str(entry["model"]), tokenizer, f"{where}.model", device)
        name = entry.get("name") or Path(str(entry["model"])).resolve().name
        return RewardFunction(str(name), model, {}, where), weight
    fn = import_function(entry["function"], f"{where}.function")
    check_builtin(fn, kwargs, where)
    return RewardFunction(str(entry.get("name") or _callable_name(fn)), fn, kwargs, where), weight


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _location(rows: Sequence[Mapping], where: Optional[Sequence[str]], i: int) -> str:
    if where is not None:
        return f"{where[i]} (completion {i})"
    row = rows[i]
    if isinstance(row, Mapping) and "source" in row and "row" in row:
        return f"{row['source']} row {row['row']} (completion {i})"
    return f"completion {i}"


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@dataclass
class RewardSet:
    """The run's reward functions: `score` -> (N, F) float32 (NaN where a function gave None),
    `combine` -> (N,) rewards, trl's nansum of the weighted columns."""

    functions: list[RewardFunction]
    weights: torch.Tensor  # (F,) float32

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def score(self, prompts: Sequence[Any], completions: Sequence[str], rows: Sequence[Mapping],
              completion_ids: Optional[Sequence[Sequence[int]]] = None,
              where: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Every function's scores of N completions. `prompts`: each completion's prompt as its row gave it
        (a message list, or a string); `completions`: decoded texts; `rows`: each completion's other fields
        (the columns passed to the functions); `where`: each completion's row for messages ("FILE row K"),
        else taken from the rows' source/row keys."""
        N = len(completions)
        if not len(prompts) == N == len(rows) or (completion_ids is not None and len(completion_ids) != N):
            raise ValueError(f"score needs one prompt, row (and completion_ids) per completion: {len(prompts)} "
                             f"prompts, {N} completions, {len(rows)} rows")
        conversational = N > 0 and not isinstance(prompts[0], str)  # trl's is_conversational
        shown = [[{"role": "assistant", "content": c}] for c in completions] if conversational else list(completions)
        skip = ("prompt", "completion", "completion_ids")  # trl passes these itself, not as columns
        keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in skip]
        columns = {k: [row.get(k) for row in rows] for k in keys}
        out = torch.empty(N, len(self.functions), dtype=torch.float32)
        for j, f in enumerate(self.functions):
            try:
                values = f.fn(prompts=list(prompts), completions=shown,
                              completion_ids=None if completion_ids is None else [list(c) for c in completion_ids],
                              **{**columns, **f.kwargs})
                if inspect.isawaitable(values):  # an async reward function (trl awaits those too)
                    values = asyncio.run(_awaited(values))
            except Exception as err:  # noqa: BLE001 - the user's function: stop the run naming it and the row
                at = err.index if isinstance(err, RewardRowError) and 0 <= err.index < N else 0
                raise RewardError(f"reward function {f.name!r} ({f.where}) raised on {_location(rows, where, at)}: "
                                  f"{_one_line(err)}") from err
            out[:, j] = torch.tensor(self._checked(values, f, N, rows, where), dtype=torch.float32)
        return out

    @staticmethod
    def _checked(values: Any, f: RewardFunction, N: int, rows: Sequence[Mapping],
                 where: Optional[Sequence[str]]) -> list[float]:
        said = f"reward function {f.name!r} ({f.where})"
        if not isinstance(values, list):
            raise RewardError(f"{said} returned a {type(values).__name__} on {_location(rows, where, 0)}; "
                              f"expected a list of {N} floats (None: no score)")
        if len(values) != N:
            raise RewardError(f"{said} returned {len(values)} scores for {N} completions on "
                              f"{_location(rows, where, 0)}; expected one per completion")
        for i, value in enumerate(values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise RewardError(f"{said} returned {value!r} ({type(value).__name__}) on {_location(rows, where, i)}; "
                                  "expected a float, an int or None")
        return [math.nan if v is None else float(v) for v in values]

    def combine(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, F) scores -> (N,) rewards as trl's GRPOTrainer: the weighted columns summed, a NaN counting as 0
        (nansum), and NaN where every function returned None (unscorable: trl keeps it out of the baseline)."""
        rewards = (scores * self.weights.to(scores.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(scores).all(dim=1)] = torch.nan
        return rewards


def build_rewards(spec: RewardSpec, tokenizer: Tokenizer, device: Optional[torch.device] = None) -> RewardSet:
    """The RewardSet of `spec.reward_funcs` (see the module docstring); reward models go to `device` (CPU).

    Raises:
        ConfigError: naming trainer.grpo.reward_funcs[i] (or reward_weights) and what was expected.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    entries = _plain(spec.reward_funcs or [])
    if not entries:
        raise ConfigError(f"{KEY} is empty; name at least one reward function ('package.module:function', "
                          "e.g. mistral_train.rollout.rewards:exact_answer) or {model: FOLDER}")
    built = [_entry(entry, f"{KEY}[{i}]", tokenizer, device) for i, entry in enumerate(entries)]
    own = [w for _, w in built]
    if spec.reward_weights is not None:
        given = [i for i, w in enumerate(own) if w is not None]
        if given:
            raise ConfigError(f"{KEY}[{given[0]}].weight and trainer.grpo.reward_weights both set the weights; "
                              "use one of them")
        if len(spec.reward_weights) != len(built):
            raise ConfigError(f"trainer.grpo.reward_weights has {len(spec.reward_weights)} weights for "
                              f"{len(built)} reward functions; expected one per entry of {KEY}")
        weights = [_weight(w, f"trainer.grpo.reward_weights[{i}]") for i, w in enumerate(spec.reward_weights)]
    else:
        weights = [1.0 if w is None else w for w in own]
    functions = [f for f, _ in built]
    for f, name in zip(functions, _unique([f.name for f in functions])):
        f.name = name
    return RewardSet(functions, torch.tensor(weights, dtype=torch.float32))
