"""Training state on disk: `checkpoints/step_N/` folders for exact resume.

A checkpoint folder is an HF model folder (written by `model.save_pretrained`, loadable as
is) plus `training_state.pt`, which holds only tensors and plain Python data (optimizer,
scheduler, RNG states, data position, step) so it loads with `torch.load(weights_only=True)`.
Under DeepSpeed and FSDP2 the optimizer state is sharded and lives in the engine's own files in
a subfolder (train/resume.py); `training_state.pt` then holds None for it.
Folders are written with `atomic_directory` (train/resume.py), so any `step_N` folder present is complete;
its `manifest.json` (checkpoint/integrity.py) says whether its bytes are still the ones written.
A write that fails is reported with `write_failure_message`: the bytes needed come from `estimate_checkpoint_bytes`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError

from mistral_train.checkpoint.atomic import remove_stale_temps
from mistral_train.checkpoint.integrity import HashingWriter

STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer quotes the OS error


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain data (numpy's array becomes a tensor)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_state(step: int, optimizer: Optional[torch.optim.Optimizer], scheduler: torch.optim.lr_scheduler.LRScheduler,
              data_state: dict[str, Any], rng: Optional[dict[str, Any]] = None, **extra: Any) -> dict[str, Any]:
    """What `training_state.pt` holds: `step` optimizer steps taken, the optimizer's state (None when an
    engine saves it in its own files: DeepSpeed, FSDP2), the scheduler's, the data iterator's
    `state_dict()`, the RNG states (default `capture_rng_state()` now) and `extra` plain data."""
    return {
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "rng": capture_rng_state() if rng is None else rng,
        **extra,
    }


def write_state_file(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """`training_state.pt` in `folder`, hashed as it streams out (the manifest then need not read it back)."""
    path = Path(folder) / STATE_FILE
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        try:
            torch.save(state, writer)
        except RuntimeError as err:  # torch's C++ writer turns a failed write into "unexpected pos": the OS's error
            if writer.error is None:
                raise
            raise writer.error from err
    writer.note(path)
    return path


def read_state_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The training state of a checkpoint folder; tensors and plain data only (`weights_only=True`)."""
    state_file = Path(directory) / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{directory}: not a training checkpoint (no {STATE_FILE})")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (an optimizer's or model's state dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes the files under `folder` take (their sizes, not their blocks)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def estimate_checkpoint_bytes(run_dir: str | os.PathLike, model: torch.nn.Module,
                              optimizer: Optional[torch.optim.Optimizer]) -> tuple[int, str]:
    """About how many bytes the next checkpoint of a run takes, and how that was estimated: the newest
    checkpoint's files when there is one (same model, optimizer and tokenizer: the same sizes), else the tensors
    to write: the trained weights (only the trainable ones when some are frozen: an adapter run saves its
    adapter) plus the optimizer state."""
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return folder_bytes(newest), f"the size of {newest.name}"
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad] if any(not p.requires_grad for p in params) else params
    optimizer_bytes = tensor_bytes(optimizer.state_dict()) if optimizer is not None else 0
    return tensor_bytes(trained) + optimizer_bytes, "the trained weights plus the optimizer state"


def write_error(err: BaseException) -> Optional[OSError]:
    """The operating system's error behind a failed checkpoint write, or None when `err` is not one: an OSError
    (ours, DeepSpeed's) or one in its cause/context chain, or safetensors' SafetensorError "I/O error: ...
    (os error N)" (its Rust writer reports the OS error only in the message)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    match = _OS_ERROR.search(str(err)) if isinstance(err, SafetensorError) else None
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def write_failure_message(folder: Path, err: OSError, needed: int, how: str) -> str:
    """One line for a checkpoint that could not be written: the folder, the cause, the bytes needed and free."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    cause = os.strerror(err.errno) if err.errno else str(err)
    return (f"{folder}: checkpoint not written ({cause}): it needs about {needed:,} bytes ({how}) and "
            f"{free:,} are free there; the previous complete checkpoint is kept")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete `checkpoints/step_N` folders of a run, oldest first, as (N, path)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None when it has none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (and stale temp folders)."""
    if keep_last < 1:
        raise ValueError(f"trainer.keep_last must be >= 1, got {keep_last}")
    remove_stale_temps(Path(run_dir) / "checkpoints")
    doomed = [path for _, path in list_checkpoints(run_dir)[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
