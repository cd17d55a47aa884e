"""What can be wrong with a composed run configuration, said in one line.

Hydra and OmegaConf report a misspelt key or a bad value in several lines wrapped in two
exception types; `describe_error` turns them into one sentence naming the key, the file or
override it came from and, for a typo, the field that was probably meant. The checks here
catch what Hydra lets through (`+key=v` bypasses the schema, `${required:...}` values).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from mistral_train.errors import ConfigError

REQUIRED = re.compile(r"\$\{required:(.*)\}")  # how a YAML marks a value the user must give


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Full keys in `node` that the dataclass `schema` (recursively) has no field for."""
    hints = typing.get_type_hints(schema)
    unknown: list[str] = []
    for key in node.keys():
        if key not in hints:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]):
            unknown += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return unknown


def missing_keys(raw: Any, prefix: str = "") -> list[str]:
    """`${required:hint}` or `???` values in an unresolved config container, as "key (hint)"."""
    if isinstance(raw, dict):
        return [m for key, value in raw.items() for m in missing_keys(value, f"{prefix}{key}.")]
    match = REQUIRED.fullmatch(raw) if isinstance(raw, str) else None
    if match or raw == "???":
        return [f"{prefix[:-1]} ({match.group(1)})" if match and match.group(1) else prefix[:-1]]
    return []


def suggest_key(full_key: str, schema: Any) -> str:
    """"; did you mean 'trainer.max_steps'?" for `trainer.max_stepz`, from the fields of `schema`."""
    *parents, leaf = full_key.split(".")
    for part in parents:  # walk down to the dataclass that should hold `leaf`
        schema = typing.get_type_hints(schema).get(part) if dataclasses.is_dataclass(schema) else None
    if not dataclasses.is_dataclass(schema):
        return ""
    close = difflib.get_close_matches(leaf, [f.name for f in dataclasses.fields(schema)], n=1)
    return f"; did you mean {'.'.join([*parents, close[0]])!r}?" if close else f"; {schema.__name__} has no such field"


def _origin(text: str, root: Optional[Path]) -> str:
    if text.startswith("In '") and root is not None:  # "In 'model/tiny': ..." names the file being merged
        name = text[4 : text.index("'", 4)]
        file = next((p for p in (root / "configs" / f"{name}.yaml", root / "recipes" / f"{name}.yaml") if p.is_file()), None)
        return f" (in {file or name})"
    return " (in a command-line override)" if "override" in text.split("\n")[0] else ""


def describe_error(err: BaseException, schema: type, root: Optional[Path] = None, overrides: Sequence[str] = ()) -> str:
    """One line for a Hydra/OmegaConf error: what is wrong, with which key, and where it was set.

    Args:
        err: raised by Hydra's compose or by OmegaConf.
        schema: the root dataclass, for spelling suggestions.
        root: the folder holding configs/ and recipes/, to name the file at fault.
        overrides: the command-line overrides, to tell a bad `group=option` from a bad recipe.
    """
    chain, cause = [], err
    while cause is not None and cause not in chain:  # Hydra re-raises OmegaConf errors without `from`
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    where = _origin(text, root)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, option = err.missing_cfg_file.rsplit("/", 1)
        if any(o.lstrip("+~").startswith(f"{group}=") for o in overrides):
            where = " (in a command-line override)"
        return f"no option {option!r} in config group {group!r}; available: {', '.join(err.options or [])}{where}"
    if isinstance(err, OverrideParseException):
        reason = [line for line in err.message.splitlines() if line.strip(" ^") and not line.startswith(("See ", "Error parsing"))]
        return (f"cannot parse override {err.override!r}: {'; '.join(reason)} (write KEY=VALUE; a value holding "
                f"~ {{ }} , or spaces needs Hydra quotes inside shell quotes: \"model.path='~/my models/x'\")")
    omega = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if omega is None:
        hint = "; quote it (key='a,b') or write a list (key=[a,b])" if text.startswith("Ambiguous value") else ""
        return text.splitlines()[0] + hint + where
    key = omega.full_key
    if isinstance(omega, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(omega):
        return f"unknown key {key!r}{suggest_key(key, schema)}{where}"
    if isinstance(omega, MissingMandatoryValue):
        return f"{key} is required: pass {key}=... on the command line{where}"
    return f"bad value for {key!r}: {getattr(omega, 'msg', str(omega)).splitlines()[0]}{where}"
