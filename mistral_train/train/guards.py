"""Two faults a long run meets at its step boundary (docs/reliability.md): a non-finite step, and a
preemption signal.

Non-finite steps. A window whose loss or global gradient norm is NaN or infinite takes no update: the
gradients are zeroed, the optimizer and the scheduler do not step (as Megatron-LM does for an overflowed
step: its scheduler steps only on a successful update), the step number and the data position move on
(the batch is consumed, not retried). After `trainer.max_nonfinite_steps` such steps in a row the run
stops. Every process takes the same decision: the flag is summed over the processes.

Preemption. SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before they stop a job) only set a flag
here; the loop checks it at the next step boundary, writes a checkpoint and raises `Preempted`, which the
command line turns into exit status 0. Under several processes the flags are summed, so a signal to any
one process stops every process after the same step.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any, Iterable, Optional

import torch

from mistral_train.errors import ConfigError, UserError

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


class NonFiniteError(UserError):
    """Training stopped on non-finite values (too many skipped steps, or a non-finite weight about to be
    saved); the message names the steps or the tensor."""


class Preempted(Exception):
    """A preemption signal was received; the checkpoint of the step named in the message is written and the
    run stopped cleanly (the command line exits 0)."""


def agreed(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is true on any of them (one scalar all-reduce; none alone)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    summed = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return float(summed[0]) > 0


def is_finite(value: Any) -> bool:
    return math.isfinite(float(value))


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; raises after `max_consecutive` in a row.

    Args:
        max_consecutive: trainer.max_nonfinite_steps; 0 never stops (every such step is still skipped).
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 0:
            raise ConfigError(f"trainer.max_nonfinite_steps={max_consecutive}: expected 0 (never stop) or more")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over this process's run, for the metrics
        self.streak: list[str] = []  # the consecutive skipped steps' descriptions

    def skip(self, step: int, loss: float, grad_norm: float, batch: str, action: str = "update skipped") -> str:
        """Record a skipped step; return its one-line description, or raise NonFiniteError when it ends a
        streak of `max_consecutive`. `action`: what became of the update (an engine may have applied it)."""
        self.skipped += 1
        found = [f"{what} {value}" for what, value in (("loss", loss), ("gradient norm", grad_norm)) if not is_finite(value)]
        found = found or ["gradient norm on another process"]  # this process's own values are finite
        line = f"step {step}: non-finite {' and '.join(found)}; {action} ({batch})"
        self.streak.append(f"step {step} ({batch})")
        if self.max_consecutive and len(self.streak) >= self.max_consecutive:
            raise NonFiniteError(f"{len(self.streak)} consecutive steps had a non-finite loss or gradient "
                                 f"(trainer.max_nonfinite_steps={self.max_consecutive}): {'; '.join(self.streak)}. "
                                 "Lower trainer.lr, raise trainer.warmup_steps, or check those rows")
        return line

    def ok(self) -> None:
        self.streak = []


def batch_position(data_state: dict[str, Any]) -> str:
    """What names a window's batches: batches carry no source row ids (rows are packed, padded, shuffled),
    so the data position the window was drawn from (`state_dict()` of the training batches)."""
    if "epoch" in data_state and "index" in data_state:
        return f"drawn from epoch {data_state['epoch']} at item {data_state['index']} of its shuffled order"
    return "drawn from data position " + ", ".join(f"{k}={v}" for k, v in data_state.items() if not isinstance(v, (dict, list)))


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor holding a NaN or infinity, else None. Sharded parameters (FSDP2's
    DTensors) are checked on this process's shard."""
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            return name
    return None


def check_weights_finite(accelerator: Any, model: torch.nn.Module, step: int, what: str) -> None:
    """Raise NonFiniteError on every process when any process holds a non-finite trained weight, before
    `what` (a checkpoint, final/) is written: a NaN weight must never be saved as a resumable state."""
    bad = first_non_finite((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if agreed(accelerator, bad is not None):
        where = f"{bad}" if bad is not None else "a parameter on another process"
        raise NonFiniteError(f"step {step}: the trained weight {where} holds NaN or infinity; {what} not written "
                             "(the previous complete checkpoint is kept; resume from it with a lower trainer.lr)")


def signal_numbers(names: Iterable[str]) -> list[signal.Signals]:
    """trainer.preemption_signals as signals; a ConfigError names an unknown or uncatchable one."""
    found = []
    for name in names:
        upper = str(name).upper()
        upper = upper if upper.startswith("SIG") else f"SIG{upper}"
        if upper in UNCATCHABLE or not hasattr(signal.Signals, upper):
            raise ConfigError(f"trainer.preemption_signals: {name!r} is not a signal a process can catch; "
                              "expected names such as SIGTERM, SIGUSR1, SIGUSR2, SIGINT")
        found.append(signal.Signals[upper])
    return found


class Preemption:
    """Installs handlers for `signals` that only record the first one received (`with Preemption(...)`);
    the previous handlers come back on exit. Outside the main thread no handler can be installed: nothing is."""

    def __init__(self, names: Iterable[str], grace_s: float) -> None:
        self.signals, self.grace_s = signal_numbers(names), float(grace_s)
        if self.grace_s <= 0:
            raise ConfigError(f"trainer.preemption_grace_s={grace_s}: expected seconds > 0")
        self.received: Optional[signal.Signals] = None
        self.at: Optional[float] = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, number: int, _frame) -> None:
        if self.received is None:  # a repeated signal changes nothing: the checkpoint is already due
            self.received, self.at = signal.Signals(number), time.monotonic()

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def due(self, accelerator: Any) -> bool:
        """At a step boundary: whether any process received a signal (every process gets the same answer)."""
        return agreed(accelerator, self.received is not None)

    def message(self, step: int, checkpoint: Any) -> str:
        """The one line printed when the run stops."""
        name = self.received.name if self.received is not None else "a preemption signal on another process"
        waited = time.monotonic() - self.at if self.at is not None else None
        took = f" {waited:.1f}s after the signal" if waited is not None else ""
        line = (f"preempted by {name}: stopped after step {step}, checkpoint {checkpoint} written{took}; "
                "continue by running the same command with resume=latest")
        if waited is not None and waited > self.grace_s:
            line += (f" (warning: this took longer than trainer.preemption_grace_s={self.grace_s:g}s: the job may be "
                     "killed before it exits; save more often or shorten steps)")
        return line
