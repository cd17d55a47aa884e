"""Atomic folder writes: a checkpoint folder exists under its final name only when complete.

The folder is written under a hidden temporary name in the same parent (so the final
`os.replace` is a rename on one filesystem, never a copy), every file is fsynced, and only
then is it renamed into place. A process killed half-way leaves a hidden `.NAME.tmp-*`
folder that no reader matches as a checkpoint; `remove_stale_temps` clears them.

Before the rename every file and folder gets the mode the process's umask gives new files
(0644 / 0755 under umask 022): some writers (safetensors' `save_file`, 0600) create their files
private, and a folder we publish is read by other users and servers (vLLM) like any other.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_MARKER = ".tmp-"  # hidden temp folders are named f".{final_name}{TEMP_MARKER}{pid}-{hex}"


def _fsync_path(path: Path) -> None:
    """fsync one file or folder (folders need it so the entries they hold are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _umask() -> int:
    """The process's umask. Linux shows it in /proc (no change needed); elsewhere set and restore it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """chmod every file under `root` to 0o666 and every folder (root too) to 0o777, less the umask."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~mask)


def temp_path_for(final_path: Path) -> Path:
    """A fresh hidden sibling of `final_path`, unique per process and call."""
    final_path = Path(final_path)
    name = f".{final_path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return final_path.parent / name


@contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `final_path` in one rename.

    If the body raises, the temp folder is removed and `final_path` is left untouched
    (an older complete folder under that name survives). An existing `final_path` is
    moved aside under a hidden name first, because `os.replace` cannot overwrite a
    non-empty folder; the old copy is deleted only after the new one is in place.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final_path)
    tmp.mkdir()
    try:
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if final_path.exists():
            old = temp_path_for(final_path)
            os.replace(final_path, old)
        os.replace(tmp, final_path)
    except BaseException:
        # the old folder goes back under its name: a failed publish must not leave it hidden (and later pruned)
        if old is not None and not final_path.exists():
            os.replace(old, final_path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(final_path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(parent: str | os.PathLike) -> list[Path]:
    """Delete hidden temp folders left in `parent` by killed writers; return what was removed.

    Only call this when no other process is writing into `parent`.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        if entry.name.startswith(".") and TEMP_MARKER in entry.name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
