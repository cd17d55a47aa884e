"""Regional compilation: `torch.compile` one decoder block, reuse the compiled code for every layer.

Compiling the whole model costs one trace of every layer; compiling a single function that
*takes the block as an argument* costs one trace in total, because dynamo lifts a module's
parameters to graph inputs and guards on the block's type, attributes and shapes, not its
identity: all layers of one shape share one graph (checked in tests/model/test_compile.py).

What a guard sees, it recompiles on rather than baking in: `block.training`, grad mode, the
per-block checkpoint policy, `LoRALinear.disabled` (so `disable_adapters` works through a
compiled block), whether the block's input requires grad (not in the first block of a LoRA
model), and the mask being None, (1, 1, T, T) or (B, 1, T, T). Each such variant is one graph.

Shapes are dynamic by default: one graph serves every sequence length. With `dynamic=None`
dynamo compiles static shapes first and once more, dynamic, at the first new length; every
variant above then costs two compiles, and a LoRA run with training, evaluation and a DPO
reference pass reaches dynamo's limit of 8 graphs per function (`torch._dynamo.config.
recompile_limit`), beyond which new variants run eager (with one logged warning). `dynamic=True`
halves that. Known exception: a double-quantized NF4 base turns its float `offset` into a
constant tensor (quant/nf4_format.py, `block_absmax`), so each layer specializes on its own value
and compiles its own graph; adding the float (`decoded + self.offset`) instead lifts that.

Calls that pass a KV cache (generation) stay eager: the cache's Python-int bookkeeping changes
every step and would recompile each time; `generate(..., compile=True)` compiles its own
fixed-shape decode step instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import nn

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileOptions:
    """How blocks are compiled; frozen so it can key the cache of compiled functions.

    mode: a `torch.compile` mode (None is inductor's default).
    dynamic: True (default) compiles for any sequence length at once; None compiles static
        shapes first and goes dynamic on the first change; False recompiles for every new shape.
    """

    mode: Optional[str] = None
    dynamic: Optional[bool] = True

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {self.mode!r}")
        if self.dynamic not in (None, True, False):
            raise ValueError(f"compile `dynamic` must be None, True or False, got {self.dynamic!r}")


def call_block(block: nn.Module, x: torch.Tensor, inputs) -> torch.Tensor:
    """block(x, inputs): the function that gets compiled (the block is an argument, not a constant)."""
    return block(x, inputs)


@lru_cache(maxsize=None)
def compiled_block_call(options: CompileOptions) -> Callable[..., torch.Tensor]:
    """`call_block` compiled with `options`; one compiled function per distinct options, shared
    by every block of every model (dynamo keys its cache entries on guards, not on the block)."""
    return torch.compile(call_block, mode=options.mode, dynamic=options.dynamic)


def compile_blocks(model: nn.Module, mode: Optional[str] = None, dynamic: Optional[bool] = True) -> nn.Module:
    """Run every decoder block of `model` through `torch.compile` from the next forward on.

    Call it after adapters (LoRA) and quantization (NF4) are in place and after moving the model
    to its device; a later module swap needs no new call (the next forward re-traces on the
    guard failure), but it costs a compile. The model's modules, parameter names and state dict
    are unchanged: nothing is wrapped, so checkpoints and adapters save as before.

    Returns:
        `model`, for chaining.
    """
    model.compile_options = CompileOptions(mode, dynamic)
    return model


def uncompile_blocks(model: nn.Module) -> nn.Module:
    """Back to eager blocks (compiled code stays cached for the next `compile_blocks`)."""
    model.compile_options = None
    return model
