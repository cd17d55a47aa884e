"""Read the JSON files of model, adapter and run folders, with errors that name the file.

A config.json, adapter_config.json or launcher config is user input: a file that is not JSON, or
not a JSON object, stops with the path and what was expected instead of a bare decoder error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union


def read_json_object(path: Union[str, Path]) -> dict[str, Any]:
    """The JSON object in `path` (UTF-8). ValueError naming the file when it is not valid JSON or
    not an object; FileNotFoundError from the read when it does not exist."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
