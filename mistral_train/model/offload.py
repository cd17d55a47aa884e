"""Activation offloading: tensors saved for backward live in CPU memory between the passes.

Inside `OffloadActivations`, every tensor autograd saves is copied to CPU memory (pinned, on
CUDA, so the copies run asynchronously) and copied back when the backward needs it. The model
applies one context per decoder block (`Mistral.set_activation_offloading`), so accelerator
memory holds a block's activations only while that block runs.

Left where they are: tensors below `min_bytes` (a copy has a fixed launch cost of ~10 us, which
at PCIe rates is ~200 KB of transfer: small tensors would cost more than they free), parameters
and views of them (they stay resident anyway), and tensors already in CPU memory (on a CPU-only
machine the context changes nothing, unless `copy_on_cpu` asks for the round trip, for tests).

A tensor saved by several ops (the normed input of q/k/v, of gate/up) is copied once: within
one context, saves of the same storage region at the same version share one CPU copy.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

DEFAULT_MIN_BYTES = 256 * 1024


@dataclass
class OffloadStats:
    """Bytes that went through the hooks, summed over every context that shares this object."""

    offloaded_bytes: int = 0  # copied to CPU memory (each distinct tensor once)
    shared_bytes: int = 0  # saves answered by an earlier copy of the same tensor
    kept_bytes: int = 0  # left in place: small, parameters, already in CPU memory

    def reset(self) -> None:
        self.offloaded_bytes = self.shared_bytes = self.kept_bytes = 0


@dataclass
class OffloadOptions:
    """What `Mistral.set_activation_offloading` keeps: the size threshold and the running totals."""

    min_bytes: int = DEFAULT_MIN_BYTES
    stats: OffloadStats = field(default_factory=OffloadStats)
    copy_on_cpu: bool = False  # see OffloadActivations; for tests on a CPU-only machine


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (linear layers save `weight.t()`)."""
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter)


class _Offloaded:
    """A CPU copy of a saved tensor and how to bring it back."""

    def __init__(self, cpu: torch.Tensor, device: torch.device, event: Optional[Any]) -> None:
        self.cpu, self.device, self.event = cpu, device, event
        self._restored: Optional[weakref.ref] = None  # reused while alive; never kept alive by us

    def restore(self) -> torch.Tensor:
        restored = self._restored() if self._restored is not None else None
        if restored is not None:
            return restored
        if self.device.type == "cpu":
            restored = self.cpu  # copy_on_cpu: the copy already holds the values
        else:
            if self.event is not None:  # the device->host copy ran on the forward's stream
                torch.cuda.current_stream(self.device).wait_event(self.event)
            restored = self.cpu.to(self.device, non_blocking=True)
        self._restored = weakref.ref(restored)
        return restored


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: what autograd saves inside it moves to CPU memory until backward.

    Args:
        min_bytes: tensors smaller than this are not moved.
        stats: an OffloadStats to add byte counts to (optional).
        copy_on_cpu: also copy tensors that are already in CPU memory. It frees nothing; it
            exists so that a CPU-only machine can test the full round trip.
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES, stats: Optional[OffloadStats] = None,
                 copy_on_cpu: bool = False) -> None:
        self.min_bytes, self.copy_on_cpu = min_bytes, copy_on_cpu
        self.stats = stats if stats is not None else OffloadStats()
        # Storage region -> (original, its copy). Holding the original until __exit__ stops the
        # allocator from reusing its address for a new tensor that would then match the key.
        self._copies: dict[tuple, tuple[torch.Tensor, _Offloaded]] = {}
        super().__init__(self._pack, self._unpack)

    def __exit__(self, *exc: Any) -> None:
        self._copies.clear()
        return super().__exit__(*exc)

    def _moves(self, t: torch.Tensor) -> bool:
        if t.numel() * t.element_size() < self.min_bytes or _is_parameter(t):
            return False
        return t.device.type != "cpu" or self.copy_on_cpu

    def _pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if not self._moves(t):
            self.stats.kept_bytes += nbytes
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        if key in self._copies:
            self.stats.shared_bytes += nbytes
            return self._copies[key][1]
        pin = t.is_cuda and torch.cuda.is_available()
        cpu = torch.empty_like(t, device="cpu", pin_memory=pin)  # keeps t's strides when it is dense
        cpu.copy_(t, non_blocking=pin)
        event = None
        if t.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(t.device))
        packed = _Offloaded(cpu, t.device, event)
        self._copies[key] = (t, packed)
        self.stats.offloaded_bytes += nbytes
        return packed

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.restore() if isinstance(packed, _Offloaded) else packed
