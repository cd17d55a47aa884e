"""Accelerate glue: the Accelerator every fit() runs through, also for a single process.

One process (`mistral-train ...`) and several (`accelerate launch ... -m mistral_train ...`)
take the same code path; Accelerate decides from the launcher's environment how many processes
there are. We keep our own token-normalised gradient accumulation (train/loop.py), so Accelerate's
`gradient_accumulation_steps` stays 1, and the LR schedule is defined per optimizer step, so the
scheduler is stepped exactly once per step whatever the number of processes.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from mistral_train.config import TrainerSpec

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}  # trainer.precision -> Accelerate's name
DEVICES = ("auto", "cpu", "cuda")


def build_accelerator(spec: TrainerSpec) -> Accelerator:
    """The Accelerator of one run: mixed precision from `spec.precision` (bf16 autocast around the
    model's forward; weights stay in model.dtype), CPU when `spec.device` is cpu.

    Raises:
        ValueError: an unknown precision or device; RuntimeError: device=cuda without CUDA.
    """
    if spec.precision not in MIXED_PRECISION:
        raise ValueError(f"trainer.precision must be one of {sorted(MIXED_PRECISION)}, got {spec.precision!r}")
    if spec.device not in DEVICES:
        raise ValueError(f"trainer.device must be one of {DEVICES}, got {spec.device!r}")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available (use auto or cpu)")
    # Accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with other
    # settings. Anything that ran before in this process (another library's Trainer, a notebook cell)
    # may have set it; forget it, keeping PartialState (which describes the launched processes).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=spec.device == "cpu",
        mixed_precision=MIXED_PRECISION[spec.precision],
        # Accelerate would step the scheduler once per process (it assumes per-process schedules);
        # ours counts optimizer steps.
        step_scheduler_with_optimizer=False,
    )


def release(accelerator: Accelerator) -> None:
    """End the run: stop Accelerate's trackers and process group (without this, about one run in
    six aborts at interpreter exit), then forget Accelerate's process-wide state, which would
    otherwise pin the first run's precision and device for every later fit() in this process
    (a staged recipe, a test session). The next Accelerator re-reads the launcher's environment."""
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
