"""The one kind of error that is the user's to fix: bad data, a bad config value, a wrong path.

`mistral-train` prints a UserError as one line, `mistral-train: error: ...`, and exits with status 2
(cli.py); any other exception is a bug and keeps its traceback. ConfigError and
AuditError (data/audit.py) are UserErrors. They stay ValueErrors, so callers that caught ValueError
before still do.

Most of data/ raises plain ValueError for a bad row or file (the message names the file and row);
`reading_data` turns those into DataError around the code that reads the user's data, and only there:
a ValueError anywhere else is not assumed to be the user's fault.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class UserError(ValueError):
    """Something the user gave (data, a config value, a path, the machine asked for) cannot be used;
    the message says which and what was expected."""


class ConfigError(UserError):
    """A run configuration that cannot be built; the message names the key, file or option at fault."""


class FolderError(UserError):
    """A model, tokenizer, adapter or checkpoint file the user gave cannot be read or does not fit the
    model; the message names the file (and tensor or key). Raised by the readers themselves."""


class TensorNameError(FolderError, KeyError):
    """A tensor a folder lacks, or holds but the model has no place for (a KeyError, as a state-dict
    lookup would raise)."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, an I/O error); the message names the folder, the bytes it
    needed and what is free. The previous complete checkpoint is kept."""


class DataError(UserError):
    """The training or evaluation data cannot be read or used; the message names the file and row."""


@contextlib.contextmanager
def reading_data(prefix: str = "") -> Iterator[None]:
    """Re-raise a ValueError from the block (reading, tokenizing, auditing the user's data) as a
    DataError, its message after `prefix` (e.g. "stage sft: ")."""
    try:
        yield
    except UserError as err:
        if not prefix:
            raise  # already the user's, with its own type
        raise DataError(f"{prefix}{err}") from err
    except ValueError as err:
        raise DataError(f"{prefix}{err}") from err
