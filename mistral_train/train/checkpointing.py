"""Checkpoints of a run: where a resume starts, and writing `checkpoints/step_N/` as a usable HF folder.

Formats and atomic writes live in checkpoint/state.py and checkpoint/atomic.py; this module
adds what the loop decides: which checkpoint `resume=` names, that only the main process
writes (the others wait), and pruning to `trainer.keep_last`. The loop says what goes into the
folder: the weights (full HF folder or PEFT adapter) and the tokenizer, so a checkpoint loads as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from accelerate import Accelerator

from mistral_train.checkpoint.state import (
    STATE_FILE, checkpoint_path, latest_checkpoint, load_training_state, prune_checkpoints, save_training_state,
)


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from: `resume` is None, "true"/"latest" or a folder.

    Raises:
        FileExistsError: no resume asked for, but the run folder already holds checkpoints.
        FileNotFoundError: `resume` names a folder that is not a checkpoint.
    """
    flag = str(resume).strip().lower() if resume is not None else "none"
    if flag in ("none", "", "false", "null"):
        existing = latest_checkpoint(run_dir)
        if existing is not None:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints (newest: {existing.name}); pass resume=latest to "
                f"continue that run, or set run.name / run.dir to start a new one"
            )
        return None
    if flag in ("true", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None:
            print(f"resume={resume}: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume!r}: not a checkpoint folder (no {STATE_FILE} in it)")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, optimizer, scheduler,
                    data_state: dict[str, Any], write_folder: Callable[[Path], None], keep_last: int) -> Optional[Path]:
    """Write `checkpoints/step_{step}` on the main process: `write_folder(tmp)` puts the weights
    (HF folder or adapter) and the tokenizer into the temp folder, then the training state joins
    them and the folder is published whole; then keep the newest `keep_last`. Every process waits
    until it is on disk. Returns its path on the main process, None elsewhere."""
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = save_training_state(checkpoint_path(run_dir, step), write_folder, optimizer, scheduler, step, data_state)
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: Path, load_weights: Callable[[Path], None], optimizer, scheduler, batches) -> dict[str, Any]:
    """Load weights (`load_weights(folder)`, in place), optimizer and scheduler and move `batches` to the
    saved data position; return {"step", "rng"}. The caller restores the RNG states last, once nothing
    else will draw random numbers before step `step + 1`."""
    state = load_training_state(path, load_weights, optimizer, scheduler)
    batches.load_state_dict(state["data"])
    return {"step": int(state["step"]), "rng": state["rng"]}
