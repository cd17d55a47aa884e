"""Command-line overrides of a staged recipe, each sent to the stages it is meant for.

A stage's section in a recipe lists what that stage changes over the recipe's own settings, so a plain
Hydra override of those settings (`trainer.max_steps=10`) would lose to every section that sets the same
key, silently. Here what the user types wins over recipe files, at every level:
- `stages.NAME.KEY=VALUE` (with or without `+`; `~stages.NAME.KEY` removes it) sets KEY in stage NAME's
  section, last, so it wins over everything else. NAME must be a stage of the recipe.
- any other `KEY=VALUE` or `GROUP=OPTION` is written into every stage's section as well, except
  `model.path` and `adapter.path`: they are where the first stage starts, and each later stage starts
  from the stage before it (train/stages.py). `run.*` and `resume` belong to the recipe as a whole.
- `data.*` and `data=OPTION` go only to the stages whose objective reads the kind of data they name
  (train/objectives.py: chat rows -> sft, preference pairs -> dpo and reward, plain text -> pretrain),
  the kind read from the file's first row (data.format=auto) or from data.format; the other stages keep
  the recipe's data. A kind that no stage that runs reads is an error naming each stage and its kind.
  Without a path or a format to tell the kind (`data.eval_fraction=0.1` alone) the keys reach every stage.
  A `data.path` without a `data.eval_path` also takes the recipe's top-level eval_path (usually none) to
  those stages: a stage's own held-out set belongs to the stage's own data.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, Callable, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from mistral_train.config import RunConfig, load_run_config
from mistral_train.errors import ConfigError
from mistral_train.config_checks import describe_error
from mistral_train.data.formats import KIND_NAMES, format_kind
from mistral_train.train.stages import IF_NO_MODEL, stage_configs

Compose = Callable[[str, Sequence[str]], RunConfig]  # (recipe, overrides) -> the composed RunConfig
_WHOLE_RUN = ("run", "resume", "stages", "hydra")  # keys of the recipe as a whole: never copied into stages
_STARTING_POINTS = ("model.path", "adapter.path")  # the first stage's start; later stages chain (stages.py)
_MISSING = object()  # a key a section does not set (None is a value: `data.path: null`)


def load_routed(recipe: str, overrides: Sequence[str] = (), compose: Compose = load_run_config) -> RunConfig:
    """Compose `recipe` with `overrides` (config.load_run_config); for a staged recipe, route the overrides
    into the stages' sections as the module docstring says. The command line loads its runs here.

    Raises:
        ConfigError: a bad override, a stage the recipe does not have, data no stage reads (or that
            cannot be read to tell its kind), or what `compose` raises.
    """
    parsed = _parse(overrides)
    for_stages = [o for o in parsed if o.key_or_group.startswith("stages.")]
    top = [o for o in parsed if not o.key_or_group.startswith("stages.")]
    run = compose(recipe, [o.input_line for o in top])
    if not run.stages:
        if for_stages:
            raise ConfigError(f"{for_stages[0].key_or_group}: recipe {recipe!r} has no stages; "
                              f"set the key without the stages.NAME. prefix")
        return run  # one run: fit() refuses data of the wrong kind before it writes anything (data/batches.py)
    sections = copy.deepcopy(run.stages)
    _check_stage_names(recipe, sections, for_stages)
    staged = copy.deepcopy(sections)  # the sections as the stage keys leave them: which stages run
    _apply_stage_overrides(staged, for_stages)
    running = [n for n, s in staged.items() if isinstance(s, dict) and not (s.get(IF_NO_MODEL) and run.model.path)]
    typed = [o.key_or_group for o in top if not o.is_delete() and o.key_or_group.split(".")[0] not in _WHOLE_RUN]
    names = [n for n, s in sections.items() if isinstance(s, dict)]  # else stage_configs names the bad section
    routes = {key: _receivers(key, run, staged, running) for key in typed
              if key not in _STARTING_POINTS and key.split(".")[0] != "data"}
    data_keys = [k for k in typed if k.split(".")[0] == "data"]
    if "data.path" in data_keys and "data.eval_path" not in data_keys:
        data_keys.append("data.eval_path")  # a held-out set belongs to its data: a stage's own would score the wrong task
    if data_keys:
        preview = copy.deepcopy(sections)  # with every key but data's in place: each stage's objective
        for key, to in routes.items():
            for name in to:
                _overlay(preview[name], key, _value(run, key))
        _apply_stage_overrides(preview, for_stages)
        readers = _data_readers(recipe, run, preview, running)
        routes.update({key: readers for key in data_keys})
    partial = {key for key, to in routes.items() if set(to) != set(names)}
    recipe_run: Optional[RunConfig] = None  # the recipe without the partly routed keys: what the other stages keep
    for key, to in routes.items():
        for name in names:
            if name in to:
                _overlay(sections[name], key, _value(run, key))
                continue
            if recipe_run is None:
                recipe_run = compose(recipe, [o.input_line for o in top if o.key_or_group not in partial])
            _underlay(sections[name], key, _value(recipe_run, key))
    _apply_stage_overrides(sections, for_stages)
    run.stages = sections
    # each stage's keys checked now, so `mistral-train config` fails as the run would (resume is run_stages' to check)
    stage_configs(dataclasses.replace(run, resume=None))
    return run  # the data of every stage: run_stages checks it before it writes anything


def _receivers(key: str, run: RunConfig, preview: dict, running: list[str]) -> list[str]:
    """The stages a typed non-data key goes to: all of them (those left out by if_no_model too, which
    cost nothing), except that adapter keys skip a stage training a fresh model while another stage
    follows it: adapters over a frozen random base learn nothing, and the stage after would continue them."""
    names = [n for n, s in preview.items() if isinstance(s, dict)]
    if key.split(".")[0] != "adapter" or run.model.path or len(running) < 2:
        return names
    first = preview[running[0]]
    fresh = "path" not in first.get("model", {})
    return [n for n in names if not (fresh and n == running[0])]


def _parse(overrides: Sequence[str]) -> list[Override]:
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(describe_error(err, RunConfig)) from err
    for o in parsed:
        if o.key_or_group.startswith("stages.") and o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: one value per key (a,b is a sweep); quote it (key='a,b') "
                              "or write a list (key=[a,b])")
    return parsed


def _check_stage_names(recipe: str, sections: dict, for_stages: list[Override]) -> None:
    for o in for_stages:
        name = o.key_or_group.split(".")[1]
        if name not in sections:
            close = difflib.get_close_matches(name, list(sections), n=1)
            hint = f"; did you mean 'stages.{close[0]}'?" if close else ""
            raise ConfigError(f"{o.key_or_group}: recipe {recipe!r} has no stage {name!r}{hint} "
                              f"(its stages: {', '.join(sections)})")


def _data_readers(recipe: str, run: RunConfig, preview: dict, running: list[str]) -> list[str]:
    """The stages that read the kind of data the command line names (every one when it names no kind)."""
    objectives = {name: _stage_objective(run, s) for name, s in preview.items() if isinstance(s, dict)}
    kind, where = _typed_kind(run)
    if kind is None:
        return list(objectives)
    readers = [n for n in objectives if _kind_read_by(objectives[n]) == kind]  # a stage left out costs nothing
    if not any(n in running for n in readers):
        skipped = [name for name in objectives if name not in running]
        raise ConfigError(_nobody_reads(recipe, where, kind, objectives, running, skipped))
    return readers


def _typed_kind(run: RunConfig) -> tuple[Optional[str], str]:
    """(kind, where) of the data the command line names: from data.format when it names one, from the
    .txt suffix (always plain text), else from each file's first row; (None, ...) when nothing tells."""
    from mistral_train.data.sources import source_formats  # here: reading data imports more than config needs

    data = run.data
    paths = [] if data.path is None else data.path if isinstance(data.path, list) else [data.path]
    where = f"data.path {', '.join(map(str, paths))}" if paths else f"data.format={data.format}"
    if data.format != "auto":
        return format_kind(data.format), where
    if not paths:
        return None, "data"
    if all(str(p).lower().endswith(".txt") for p in paths):
        return "text", where
    try:
        name, formats = source_formats(data)
    except FileNotFoundError as err:
        raise ConfigError(f"data.path: {err}") from err
    except (ValueError, OSError) as err:  # an unreadable first row: the message names the file and line
        raise ConfigError(str(err)) from err
    kinds = {format_kind(f): s for s, f in formats.items()}
    if len(kinds) > 1:
        raise ConfigError(f"{name} mixes " + " and ".join(f"{KIND_NAMES[k]} ({s})" for k, s in kinds.items())
                          + "; each kind trains a different stage: give one kind of data")
    return next(iter(kinds)), name


def _nobody_reads(recipe: str, where: str, kind: Optional[str], objectives: dict[str, str], running: list[str],
                  skipped: list[str]) -> str:
    stages = "; ".join(f"stage {n} reads {KIND_NAMES.get(_kind_read_by(objectives[n]) or '', '?')} "
                       f"(trainer.objective={objectives[n]})" for n in running)
    text = f"{where} holds {KIND_NAMES.get(kind or '', kind)}, which no stage of recipe {recipe!r} reads: {stages}"
    if skipped:
        text += (f"; {'stages' if len(skipped) > 1 else 'stage'} {' and '.join(skipped)} "
                 f"{'are' if len(skipped) > 1 else 'is'} left out (if_no_model: they run only without model.path)")
    if kind == "preference" and any(_kind_read_by(objectives[n]) == "chat" for n in running):
        text += "; to fine-tune on the prompts and chosen answers only, set data.format=chosen_only"
    return text


def _kind_read_by(objective: str) -> Optional[str]:
    """The kind of data `objective` trains on; None for a name the table does not know (preflight names it)."""
    from mistral_train.train.objectives import OBJECTIVES  # here: it imports the steps and their stack

    return OBJECTIVES[objective].data_kind if objective in OBJECTIVES else None


def _stage_objective(run: RunConfig, section: dict) -> str:
    return section.get("trainer", {}).get("objective", run.trainer.objective)


def _apply_stage_overrides(sections: dict, for_stages: list[Override]) -> None:
    for o in for_stages:
        _, name, *rest = o.key_or_group.split(".")
        if not rest:
            if o.is_delete():
                sections.pop(name)
            else:
                sections[name] = o.value()
        elif isinstance(sections[name], dict):  # else stage_configs names the bad section
            if o.is_delete():
                _pop(sections[name], rest)
            else:
                _set(sections[name], rest, o.value())


def _value(run: RunConfig, key: str) -> Any:
    """The composed value at `key` as plain data; a whole model/adapter group without its starting point."""
    node: Any = run
    for part in key.split("."):
        node = getattr(node, part) if dataclasses.is_dataclass(node) else node[part]
    if dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
        for start in _STARTING_POINTS:
            group, leaf = start.split(".")
            if key == group:
                node.pop(leaf)
    return copy.deepcopy(node)


def _overlay(section: dict, key: str, value: Any) -> None:
    """`value` at `key` in `section`, winning: a mapping is merged key by key over the section's own."""
    parts = key.split(".")
    _set(section, parts, _merge(_get(section, parts), value))


def _underlay(section: dict, key: str, value: Any) -> None:
    """`value` at `key` in `section` where the section does not set it: the section's own wins."""
    parts = key.split(".")
    _set(section, parts, _merge(value, _get(section, parts)))


def _merge(under: Any, over: Any) -> Any:
    """`over` wins over `under`; two mappings merge key by key. _MISSING stands for an absent key."""
    if over is _MISSING:
        return under
    if isinstance(under, dict) and isinstance(over, dict):
        return {**under, **{k: _merge(under.get(k, _MISSING), v) for k, v in over.items()}}
    return over


def _get(section: dict, parts: list[str]) -> Any:
    node: Any = section
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(section: dict, parts: list[str], value: Any) -> None:
    node = section
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _pop(section: dict, parts: list[str]) -> None:
    node = _get(section, parts[:-1])
    if isinstance(node, dict):
        node.pop(parts[-1], None)
