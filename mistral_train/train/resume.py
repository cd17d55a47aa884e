"""Checkpoints of a run: where a resume starts, and writing `checkpoints/step_N/` as a usable HF folder.

Formats and atomic writes live in checkpoint/state.py and checkpoint/atomic.py; this module
adds what the loop decides: which checkpoint `resume=` names, who writes what, and pruning to
`trainer.keep_last`. The loop says what goes into the folder: the weights (full HF folder or PEFT
adapter, gathered on the main process under sharding) and the tokenizer, so a checkpoint loads as is.

Several processes: the main process opens the hidden temp folder, writes the weights into it and
tells the others its path; under DeepSpeed every process writes its ZeRO partitions into `deepspeed/`
(engine.save_checkpoint), under FSDP2 its DCP shards into `fsdp2/`; then the main process writes
`training_state.pt` (with each process's RNG state), everyone waits, and the main process publishes
the folder with one rename.
Resume: same strategy; the same number of processes under DeepSpeed (its ZeRO partitions are per
process), any number under DDP (the optimizer state is whole) and FSDP2 (DCP reshards).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Optional

from accelerate.utils import broadcast_object_list, gather_object

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.checkpoint.integrity import newest_intact_checkpoint, verify_checkpoint, write_manifest
from mistral_train.checkpoint.state import (
    STATE_FILE, capture_rng_state, checkpoint_path, estimate_checkpoint_bytes, latest_checkpoint, list_checkpoints,
    prune_checkpoints, read_state_file, run_state, write_error, write_failure_message, write_state_file,
)
from mistral_train.data.fingerprint import check_unchanged
from mistral_train.errors import CheckpointWriteError, ConfigError
from mistral_train.dist.accelerator import deepspeed_engine, strategy_of

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"  # engine.save_checkpoint(folder/deepspeed, tag=state)
OPTIMIZER_FORMAT = {"single": "torch", "ddp": "torch", "fsdp2": "fsdp2"}  # else DeepSpeed's, per ZeRO stage
SAVE_FAILURES = ("stop", "retry")  # trainer.save_failure: what a failed checkpoint write does (save_checkpoint)


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from: `resume` is None, "true"/"latest" or a folder.

    Checkpoints are verified against their manifests (checkpoint/integrity.py): "latest" falls back past
    damaged ones to the newest intact one, saying so; a named folder that is damaged is an error.

    Raises:
        FileExistsError: no resume asked for, but the run folder already holds checkpoints.
        FileNotFoundError: `resume` names a folder that is not a checkpoint.
        DamagedCheckpoint: `resume` names a damaged checkpoint, or every checkpoint of the run is damaged.
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
        found = newest_intact_checkpoint(path for _, path in list_checkpoints(run_dir))
        if found is None:
            print(f"resume={resume}: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume!r}: not a checkpoint folder (no {STATE_FILE} in it)")
    verify_checkpoint(path)  # named explicitly: a damaged file is an error, never a silent fallback
    return path


def _has_frozen(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _save_engine_state(accelerator, model, optimizer, folder: Optional[Path]) -> Optional[str]:
    """The engine's own sharded files (collective); returns their kind, or None when the optimizer
    state is a plain torch state dict that goes into training_state.pt."""
    engine = deepspeed_engine(accelerator)
    if engine is not None:
        # frozen weights (an adapter run's base) are in the HF/adapter folder's base already
        engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                               exclude_frozen_parameters=_has_frozen(engine.module))
        return "deepspeed"
    if strategy_of(accelerator).name == "fsdp2":
        from mistral_train.dist.fsdp import save_fsdp_state

        save_fsdp_state(model, optimizer, folder)
        return "fsdp2"
    return None


def save_checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, scheduler, data_state: dict[str, Any],
                    write_folder: Callable[[Path], None], keep_last: int,
                    data_files: Optional[dict[str, dict]] = None, save_failure: str = "stop",
                    objective_state: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """Write `checkpoints/step_{step}` (every process calls this): on the main process `write_folder(tmp)`
    (weights and tokenizer), then engine files from every process, then the training state (with `data_files`,
    the training files' identity: data/fingerprint.py); the folder is published whole, then the newest
    `keep_last` are kept. Returns its path on the main process, None elsewhere.

    A write that fails (OSError: disk full, EIO) leaves no folder and prunes nothing; with `save_failure`
    "stop" it raises CheckpointWriteError naming the folder and the bytes needed, with "retry" it warns and
    returns None (the run goes on; the next save tries again)."""
    accelerator.wait_for_everyone()
    main, world = accelerator.is_main_process, accelerator.num_processes
    rngs = gather_object([capture_rng_state()]) if world > 1 else [capture_rng_state()]
    # an objective's own state (GRPO's rollout window and generation RNG: train/online.py), one per process
    objectives = gather_object([objective_state]) if world > 1 and objective_state is not None else [objective_state]
    final = checkpoint_path(run_dir, step)
    try:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_directory(final)) if main else None
            if main:  # first: save_pretrained publishes into `tmp` by replacing it whole (its own atomic write)
                write_folder(tmp)
            if world > 1:
                tmp = Path(broadcast_object_list([str(tmp) if main else None])[0])
            engine = _save_engine_state(accelerator, model, optimizer, tmp)
            if main:
                extra = {"strategy": strategy_of(accelerator).name, "world_size": world, "engine": engine,
                         "data_files": data_files or {}}
                if world > 1:
                    extra["rng_ranks"] = rngs
                if objective_state is not None:
                    extra["objective_ranks"] = objectives
                write_state_file(tmp, run_state(step, None if engine else optimizer, scheduler, data_state, rngs[0],
                                                **extra))
            accelerator.wait_for_everyone()  # every process's files are closed before the folder is fsynced and renamed
            if main:  # the last file: sizes and checksums of every file above (checkpoint/integrity.py)
                write_manifest(tmp)
    except Exception as err:  # disk full, an I/O error: atomic_directory removed the partial folder
        cause = write_error(err)  # safetensors and torch.save report a failed write in their own types
        if cause is None:
            raise  # not a write failure: a bug, with its traceback
        needed, how = estimate_checkpoint_bytes(run_dir, model, optimizer)
        failure = CheckpointWriteError(write_failure_message(final, cause, needed, how))
        if save_failure != "retry":
            raise failure from err
        if main:
            print(f"warning: {failure}; training goes on and the next save tries again (trainer.save_failure=retry)")
        return None
    if main:
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final if main else None


def _check_resumable(state: dict[str, Any], accelerator, path: Path) -> None:
    """A checkpoint's optimizer state is in one engine's format; DeepSpeed's only fits the same process count."""
    saved, now = state.get("strategy", "single"), strategy_of(accelerator).name
    formats = OPTIMIZER_FORMAT.get(saved, saved), OPTIMIZER_FORMAT.get(now, now)
    if formats[0] != formats[1]:
        raise ConfigError(f"{path} was written under trainer.strategy={saved}; its optimizer state cannot resume under "
                          f"{now}: resume with the {saved} launcher, or start a new run from its weights (model.path={path})")
    written, world = int(state.get("world_size", 1)), accelerator.num_processes
    if state.get("engine") == "deepspeed" and written != world:
        raise ConfigError(f"{path} was written by {written} DeepSpeed processes and this launch has {world}: ZeRO optimizer "
                          f"partitions restore only on the same count; launch {written} processes (or start a new run "
                          f"from its weights: model.path={path})")
    if written != world and accelerator.is_main_process:
        print(f"resuming a {written}-process checkpoint on {world} processes: each step now draws "
              f"grad_accum_steps x {world} batches (keep grad_accum_steps x processes to keep the global batch)")


def load_checkpoint(path: Path, accelerator, model, load_weights: Callable[[Path], None], optimizer, scheduler,
                    batches, data_files: Optional[dict[str, dict]] = None, changed_data: str = "refuse") -> dict[str, Any]:
    """Load weights and optimizer (from the engine's files, or `load_weights(folder)` in place plus the state
    file's optimizer state), the scheduler, and move `batches` to the saved data position; return {"step", "rng"}
    (this process's RNG state, or the main process's when the process count changed). The caller restores the
    RNG states last, once nothing else will draw random numbers before step `step + 1`.

    Raises:
        ConfigError: a checkpoint of another strategy, or of another process count under DeepSpeed.
        DataError: a training file changed since the checkpoint (`data_files` against the saved identity),
            unless `changed_data` is "allow" (then a warning line).
    """
    state = read_state_file(path)
    _check_resumable(state, accelerator, path)
    if data_files is not None and state.get("data_files"):  # checkpoints written before identities were kept: none
        for line in check_unchanged(state["data_files"], data_files, changed_data, str(path)):
            if accelerator.is_main_process:
                print(line)
    engine = state.get("engine")
    if engine == "deepspeed":
        ds = deepspeed_engine(accelerator)
        loaded, _ = ds.load_checkpoint(str(Path(path) / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                       load_module_strict=not _has_frozen(ds.module), load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed could not load {DEEPSPEED_DIR}/{DEEPSPEED_TAG}")
    elif engine == "fsdp2":
        from mistral_train.dist.fsdp import load_fsdp_state

        load_fsdp_state(model, optimizer, Path(path))
    else:
        load_weights(Path(path))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["data"])
    ranks = state.get("rng_ranks")
    same = ranks is not None and len(ranks) == accelerator.num_processes
    objectives = state.get("objective_ranks")  # None: the objective keeps no state (or the process count changed)
    objective = objectives[accelerator.process_index] if objectives and len(objectives) == accelerator.num_processes else None
    return {"step": int(state["step"]), "rng": ranks[accelerator.process_index] if same else state["rng"],
            "objective": objective}
