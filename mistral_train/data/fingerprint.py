"""What the training data files were when a run started, so a resume on changed data is caught.

A checkpoint's data position (an epoch and an index, or rows read into a stream) means something only
for the files it was counted in. `fingerprint` records, for every file the run reads (a data file, or
each file inside a saved dataset folder): its size, its mtime and a hash of its content (the whole
file up to FULL_HASH_BYTES; above that its first and last MiB, so a start stays quick on a file of
many GiB). `changes` compares a saved fingerprint with today's and says in words what changed.

A change of size or content, or a file added or gone, is refused by resume unless
`data.changed_data=allow` (then a warning line). An mtime that moved while size and hash did not (the
data copied to another machine) is not a change: it is noted, never refused. An edit inside a large
file that keeps its size and leaves the first and last MiB alone goes unseen: the price of not reading
the whole file at every start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

from mistral_train.errors import ConfigError, DataError

CHANGED_DATA = ("refuse", "allow")  # data.changed_data
FULL_HASH_BYTES = 4 * 2**20  # files up to this size are hashed whole
EDGE_BYTES = 2**20  # larger files: the hash covers their first and last MiB


def data_files(sources: Iterable[str]) -> list[Path]:
    """The files behind `sources` (RowSource.sources: data files and saved dataset folders), sorted;
    a folder stands for every file under it."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
    return sorted(set(files))


def file_identity(path: Path) -> dict[str, Any]:
    """{"size", "mtime_ns", "hash", "hashed"} of one file; "hashed" says what the hash covers."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        if stat.st_size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
            hashed = "whole file"
        else:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(stat.st_size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
            hashed = "first and last MiB"
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": digest.hexdigest(), "hashed": hashed}


def fingerprint(sources: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{file path: file_identity} for every file behind `sources`."""
    return {str(path): file_identity(path) for path in data_files(sources)}


def changes(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(changes, notes) from a saved fingerprint to today's: changes are files gone, added, or of another
    size or content; notes are files whose mtime alone moved, or files found under new paths (the run
    resumed from another directory, the data moved) with the same sizes and contents in the same order."""
    found, notes = [], []
    content = lambda files: [(files[n]["size"], files[n]["hash"]) for n in sorted(files)]  # noqa: E731
    if set(saved) != set(now) and content(saved) == content(now):  # same files under another path (cwd, a move)
        return [], [f"the training files are now {', '.join(sorted(now))} (were {', '.join(sorted(saved))}): same "
                    "sizes and contents; taken as unchanged"]
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            found.append(f"{name} is gone")
        elif name not in saved:
            found.append(f"{name} was added")
        elif saved[name]["size"] != now[name]["size"]:
            found.append(f"{name} changed size: {saved[name]['size']} bytes at the checkpoint, {now[name]['size']} now")
        elif saved[name]["hash"] != now[name]["hash"]:
            found.append(f"{name} changed content ({saved[name].get('hashed', 'hash')} differs; same size)")
        elif saved[name]["mtime_ns"] != now[name]["mtime_ns"]:
            notes.append(f"{name}: modified time moved but size and hash are the same; taken as unchanged")
    return found, notes


def check_unchanged(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]], policy: str,
                    checkpoint: str) -> list[str]:
    """Refuse (DataError, one line) a resume whose data files changed since `checkpoint` was written, unless
    `policy` is "allow"; return the warning and note lines to print."""
    if policy not in CHANGED_DATA:
        raise ConfigError(f"data.changed_data={policy!r}: expected one of {', '.join(CHANGED_DATA)}")
    found, notes = changes(saved, now)
    if found and policy == "refuse":
        raise DataError(f"{checkpoint}: the training data changed since this checkpoint: {'; '.join(found)}; "
                         "its data position would point into other rows. Restore the files, or pass "
                         "data.changed_data=allow to resume anyway")
    if not found:
        return notes
    return [f"warning: {checkpoint}: the training data changed since this checkpoint ({'; '.join(found)}); "
            "resuming anyway (data.changed_data=allow): the data position now points into other rows", *notes]
