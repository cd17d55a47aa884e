"""Accelerate glue: the Accelerator every fit() runs through, also for a single process.

One process (`mistral-train ...`) and several (`accelerate launch ... -m mistral_train ...`,
`torchrun ... -m mistral_train ...`) take the same code path. dist/strategy.py decides the strategy
(single, ddp, fsdp2, zero1-3) from the launcher's environment and `trainer.strategy`; this module
builds the Accelerator for it and gives the loop the few operations that differ per engine:
`shard_model` (before the optimizer is built), `prepare`, `no_sync`, `backward`, `clip_gradients`.

We keep our own token-normalised gradient accumulation (train/loop.py), so Accelerate's
`gradient_accumulation_steps` stays 1, and the LR schedule is defined per optimizer step, so the
scheduler is stepped exactly once per step whatever the number of processes. Under DeepSpeed the
engine steps its optimizer inside `backward` of a window's last micro-batch (Accelerate's wrappers
make the loop's optimizer.step/zero_grad no-ops); our LambdaLR stays ours and the loop steps it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import accelerate
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType

from mistral_train.config import TrainerSpec, config_root
from mistral_train.errors import ConfigError
from mistral_train.dist.strategy import ACCELERATE_PRECISION, Strategy, launcher_engine, resolve_strategy
from mistral_train.jsonfile import read_json_object

DEVICES = ("auto", "cpu", "cuda")


class Accelerator(accelerate.Accelerator):
    """Accelerate's Accelerator, plus the `strategy` it was built for (strategy.Strategy)."""

    strategy: Strategy = Strategy("single")


def _launcher_deepspeed() -> Optional[dict[str, Any]]:
    """The DeepSpeed config an Accelerate DeepSpeed launch carries, as Accelerate itself would build it."""
    if launcher_engine(os.environ) != "deepspeed":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and not Path(path).is_file():
        # configs/accelerate/*.yaml name configs/deepspeed/*.json relative to the checkout: find it
        # there when the launch ran from another folder.
        shipped = config_root() / path
        if not shipped.is_file():
            raise ConfigError(f"the Accelerate config names deepspeed_config_file {path}, which is neither relative to "
                              f"{Path.cwd()} nor to {config_root()}")
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(shipped)
    return dict(DeepSpeedPlugin(zero3_init_flag=False).deepspeed_config)


def _own_deepspeed(spec: TrainerSpec) -> Optional[dict[str, Any]]:
    """trainer.deepspeed_config (default configs/deepspeed/<strategy>.json) when trainer.strategy is zeroN."""
    if not spec.strategy.startswith("zero"):
        return None
    path = Path(spec.deepspeed_config) if spec.deepspeed_config else config_root() / "configs" / "deepspeed" / f"{spec.strategy}.json"
    if not path.is_file():
        raise ConfigError(f"trainer.deepspeed_config {path}: no such file")
    return read_json_object(path)


def _start_processes(strategy: Strategy, on_cpu: bool) -> None:
    """Set up the process group before Accelerate reads the environment. Without a GPU Accelerate would
    otherwise start every launched process as an independent single process (DDP) or a one-process
    DeepSpeed (STACK-NOTES, "Distributed on CPU"); gloo is the CPU backend."""
    if strategy.is_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # torchrun + trainer.strategy=zeroN: what accelerate launch sets
        if on_cpu:
            PartialState(backend="gloo")
    elif on_cpu and strategy.world_size > 1:
        PartialState(cpu=True)


@contextlib.contextmanager
def _without_accelerate_fsdp() -> Iterator[None]:
    """FSDP2 is our own fully_shard (fsdp.py): while the Accelerator is built, hide the launcher's
    ACCELERATE_USE_FSDP so Accelerate builds no FSDP plugin; restored after (a later stage reads it again)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def build_accelerator(spec: TrainerSpec) -> Accelerator:
    """The Accelerator of one run: the strategy of strategy.resolve_strategy, mixed precision from
    `spec.precision` (bf16 autocast around the model's forward; weights stay in model.dtype; DeepSpeed
    bf16 casts the weights and keeps fp32 masters), CPU when `spec.device` is cpu or there is no CUDA.

    Raises:
        ConfigError: an unknown precision or device, device=cuda without CUDA, or a launch that cannot
            run as asked (strategy.py).
    """
    if spec.precision not in ACCELERATE_PRECISION:
        raise ConfigError(f"trainer.precision must be one of {sorted(ACCELERATE_PRECISION)}, got {spec.precision!r}")
    if spec.device not in DEVICES:
        raise ConfigError(f"trainer.device must be one of {DEVICES}, got {spec.device!r}")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but this machine has no CUDA device; use trainer.device=auto or cpu")
    strategy = resolve_strategy(spec, os.environ, torch.cuda.is_available(), _launcher_deepspeed(), _own_deepspeed(spec))
    on_cpu = spec.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and not strategy.is_deepspeed:
        # Accelerate imports DeepSpeed whenever it is installed (unwrap_model), and DeepSpeed, finding no GPU,
        # warns "Setting accelerator to CPU": noise in a run that does not use it. Naming the CPU silences it;
        # a value the user set wins.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with other
    # settings. Anything that ran before in this process (another library's Trainer, a notebook cell)
    # may have set it; forget it, keeping PartialState (which describes the launched processes).
    AcceleratorState._reset_state(reset_partial_state=False)
    options: dict[str, Any] = {}
    if strategy.is_deepspeed:
        options["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=strategy.deepspeed, zero3_init_flag=False)
    elif strategy.name == "ddp":
        # our only buffers (NF4 codes and scales) never change: broadcasting them every forward is waste
        options["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    # cpu=True would make Accelerate skip its DeepSpeed setup; DeepSpeed finds the CPU itself (gloo, above)
    cpu = not strategy.is_deepspeed and (spec.device == "cpu" or (on_cpu and strategy.world_size > 1))
    with _without_accelerate_fsdp():
        _start_processes(strategy, on_cpu)
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=ACCELERATE_PRECISION[spec.precision],
            # Accelerate would step the scheduler once per process (it assumes per-process schedules);
            # ours counts optimizer steps.
            step_scheduler_with_optimizer=False,
            **options,
        )
    accelerator.strategy = strategy
    if accelerator.num_processes != strategy.world_size:  # a launch Accelerate did not understand: never train apart
        raise ConfigError(f"{strategy.world_size} processes were launched but Accelerate sees {accelerator.num_processes}; "
                          "launch with accelerate launch --config_file configs/accelerate/NAME.yaml or torchrun")
    return accelerator


def release(accelerator: accelerate.Accelerator) -> None:
    """End the run: stop Accelerate's trackers and process group (without this, about one run in
    six aborts at interpreter exit), then forget Accelerate's process-wide state, which would
    otherwise pin the first run's precision and device for every later fit() in this process
    (a staged recipe, a test session). The next Accelerator re-reads the launcher's environment.

    A launched process group outlives the run until the process exits: the next stage of a staged
    recipe joins it again, where a second init_process_group under the same launcher deadlocks (the
    launcher's store still holds the first group's keys)."""
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for tracker in accelerator.trackers:
            tracker.finish()
        _destroy_at_exit()
    else:
        accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)


@functools.lru_cache(maxsize=None)
def _destroy_at_exit() -> None:
    """Destroy the process group once, when the interpreter exits (registered on the first call)."""
    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def strategy_of(accelerator: Optional[accelerate.Accelerator]) -> Strategy:
    return getattr(accelerator, "strategy", Strategy("single"))


def shard_model(accelerator: accelerate.Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """What the engine needs done to the model before the optimizer sees its parameters: FSDP2 shards
    it in place (fsdp.py); ZeRO-3 learns which weights the model reads outside their own module's
    forward (the output head, used inside Mistral.forward for the chunked loss)."""
    strategy = strategy_of(accelerator)
    if strategy.name == "fsdp2":
        from mistral_train.dist.fsdp import fully_shard_model

        return fully_shard_model(model, accelerator.device, strategy.reshard_after_forward)
    if strategy.name == "zero3":
        import deepspeed

        head = getattr(model, "lm_head", None) or getattr(model, "score", None)
        if head is not None:
            deepspeed.zero.register_external_parameter(model, head.weight)
    return model


def prepare(accelerator: accelerate.Accelerator, model, optimizer, scheduler) -> tuple:
    """accelerator.prepare for the strategy: an FSDP2 model is already sharded and must not be wrapped
    again (Accelerate would put DDP around it)."""
    if strategy_of(accelerator).name == "fsdp2":
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return model, optimizer, scheduler
    with warnings.catch_warnings():
        # torch renamed DDP's broadcast_buffers; Accelerate's kwargs handler only knows the old name
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
        return accelerator.prepare(model, optimizer, scheduler)


def deepspeed_engine(accelerator: Optional[accelerate.Accelerator]):
    """The DeepSpeed engine of a DeepSpeed run, else None."""
    if accelerator is None or accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.deepspeed_engine_wrapped.engine


@contextlib.contextmanager
def no_sync(accelerator: accelerate.Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """No gradient communication in this backward (a non-final micro-batch). FSDP2 still reduce-scatters
    nothing until the last; ZeRO decides itself from the accumulation boundary (`backward`)."""
    if strategy_of(accelerator).name == "fsdp2":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif deepspeed_engine(accelerator) is not None:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def backward(accelerator: accelerate.Accelerator, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's already-normalised loss. Under DeepSpeed: no scaling by its
    accumulation steps (our loss is normalised over the window), the boundary marked on the last
    micro-batch, where the engine then reduces, clips (gradient_clipping = trainer.grad_clip) and steps."""
    engine = deepspeed_engine(accelerator)
    if engine is None:
        accelerator.backward(loss)
        return
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)
    if last:
        engine.step()


def clip_gradients(accelerator: accelerate.Accelerator, model: torch.nn.Module, max_norm: float):
    """Clip to `max_norm` and return the global gradient norm before clipping (already clipped by the
    engine under DeepSpeed; gathered from the shards under FSDP2)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return full_tensor() if full_tensor is not None else norm
