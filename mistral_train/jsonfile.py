"""Read the JSON files of model, adapter and run folders, with errors that name the file.

A config.json, adapter_config.json or launcher config is user input: a file that is not JSON, or
not a JSON object, stops with the path and what was expected instead of a bare decoder error.
A folder may come from anyone: a file too large to be a config or tokenizer is refused by its size before
a byte is read (MAX_JSON_BYTES), and one nested too deeply for the parser is one clean error line, not a
RecursionError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from mistral_train.errors import FolderError

# The largest tokenizer files Mistral ships (tekken.json) are ~20 MB; a JSON file parses into objects
# several times its size, so a file far above this is a mistake or an attack, never a config.
MAX_JSON_BYTES = 256 * 2**20


def check_file_size(path: Path, limit: int = MAX_JSON_BYTES, what: str = "a JSON file") -> None:
    """FolderError when `path` is larger than `limit` bytes (from its size on disk: nothing is read)."""
    size = path.stat().st_size
    if size > limit:
        raise FolderError(f"{path}: {size / 2**20:.0f} MiB is too large for {what} (the limit is "
                          f"{limit / 2**20:.0f} MiB); refusing to read it")


def read_json_object(path: Union[str, Path]) -> dict[str, Any]:
    """The JSON object in `path` (UTF-8). ValueError naming the file when it is not valid JSON or
    not an object (FolderError when larger than MAX_JSON_BYTES or nested too deeply); FileNotFoundError
    from the read when it does not exist."""
    path = Path(path)
    check_file_size(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise FolderError(f"{path}: JSON nested too deeply to read; expected a config or tokenizer file") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
