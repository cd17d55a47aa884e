"""Which parallel strategy a run uses, decided once at start from the launcher's environment and
`trainer.strategy`, and every launch we cannot run correctly refused with what to change.

Strategies: single (one process), ddp, fsdp2 (torch's `fully_shard`, our own code on every device:
see fsdp.py), zero1/zero2/zero3 (DeepSpeed through Accelerate). `trainer.strategy=auto` takes
what the launcher says: an Accelerate DeepSpeed config gives zeroN (N from its ZeRO stage), an
Accelerate FSDP config fsdp2, anything else ddp when there are several processes. An explicit
strategy must agree with an engine the launcher set; under a plain launcher (torchrun, a DDP
Accelerate config) it selects the engine itself, a DeepSpeed strategy with `trainer.deepspeed_config`
(default configs/deepspeed/<strategy>.json).

We accumulate gradients ourselves (train/loop.py), so Accelerate's and DeepSpeed's accumulation
stay at 1, and the DeepSpeed values we own (micro-batch, clipping, bf16) are filled from trainer.*;
a config that sets them otherwise fails here rather than training something else.
Pure functions of (spec, environment, DeepSpeed dict): tests/distributed/test_launch_checks.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from mistral_train.config import TrainerSpec
from mistral_train.errors import ConfigError

STRATEGIES = ("auto", "single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
SHARDED = ("fsdp2", "zero3")  # parameters split over processes: full weights must be gathered to save them
ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16"}


@dataclass(frozen=True)
class Strategy:
    """The resolved strategy. `deepspeed`: the complete DeepSpeed config (zero* only)."""

    name: str
    world_size: int = 1
    deepspeed: Optional[dict[str, Any]] = field(default=None, hash=False, compare=False)
    reshard_after_forward: bool = True  # fsdp2: free gathered weights after each block's forward

    @property
    def sharded(self) -> bool:
        return self.name in SHARDED

    @property
    def is_deepspeed(self) -> bool:
        return self.name.startswith("zero")


def _flag(env: Mapping[str, str], key: str, default: str = "false") -> bool:
    return env.get(key, default).strip().lower() in ("true", "1", "yes")


def launcher_engine(env: Mapping[str, str]) -> Optional[str]:
    """The engine `accelerate launch --config_file` selected: "deepspeed", "fsdp" or None."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def _check_accelerate(spec: TrainerSpec, env: Mapping[str, str]) -> None:
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").strip()
    if steps not in ("1", "auto", "none", ""):
        raise ConfigError(
            f"the Accelerate config sets gradient_accumulation_steps: {steps}; mistral-train accumulates itself "
            f"(token-normalised over the whole window): set gradient_accumulation_steps: 1 in the Accelerate config "
            f"and pass trainer.grad_accum_steps={steps} instead")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision not in ("no", ACCELERATE_PRECISION.get(spec.precision, "?")):
        raise ConfigError(
            f"the Accelerate config sets mixed_precision: {precision} but trainer.precision={spec.precision}: set "
            f"mixed_precision: 'no' in the Accelerate config (trainer.precision decides) or pass trainer.precision=bf16"
            + ("" if precision == "bf16" else f" (mixed_precision {precision} is not supported)"))


def _check_fsdp(env: Mapping[str, str], on_cpu: bool) -> bool:
    """Accelerate's FSDP settings we honour or refuse; returns reshard_after_forward. The wrap policy and
    state-dict type are ours (one unit per decoder block; full HF folders plus DCP shards) and not read."""
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"the Accelerate config asks for FSDP version {version}; mistral-train shards with FSDP2 "
                          "(torch fully_shard) only: set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError("fsdp_activation_checkpointing: true in the Accelerate config: set it to false and pass "
                          "model.gradient_checkpointing=true (our own recomputation, per decoder block)")
    if _flag(env, "FSDP_OFFLOAD_PARAMS"):
        where = "a CPU run keeps every weight in CPU memory already" if on_cpu else "mistral-train's FSDP2 does not offload"
        raise ConfigError(f"fsdp_offload_params: true ({where}): set fsdp_offload_params: false, or offload with "
                          "DeepSpeed: configs/accelerate/zero3_offload.yaml")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard not in ("true", "false"):  # FSDP1's sharding strategies (FULL_SHARD, ...) have no FSDP2 meaning here
        raise ConfigError(f"fsdp_reshard_after_forward: {reshard} in the Accelerate config: FSDP2 takes true or false")
    return reshard == "true"


def deepspeed_stage(config: Mapping[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _agree(config: dict, key: str, ours: Any, hint: str) -> None:
    """Set `key` (dotted) to our value; a value the config gives must be `auto` or equal ours."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    theirs = node.get(leaf, "auto")
    if theirs != "auto" and theirs != ours and not (isinstance(ours, float) and float(theirs) == ours):
        raise ConfigError(f"the DeepSpeed config sets {key}: {theirs}, this run needs {ours}: set it to \"auto\" "
                          f"(mistral-train fills it from {hint}) or change {hint}")
    node[leaf] = ours


def deepspeed_config(raw: Mapping[str, Any], spec: TrainerSpec, world_size: int, on_cpu: bool) -> dict[str, Any]:
    """The DeepSpeed config to run with: `raw` checked, with the values we own filled in.

    Raises:
        ConfigError: an optimizer or scheduler section (ours are built from trainer.*), fp16, ZeRO stage 0,
            a value that disagrees with trainer.*, or offloading on a CPU run.
    """
    config = copy.deepcopy(dict(raw))
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"the DeepSpeed config has a `{section}` section: remove it; mistral-train builds the "
                              f"optimizer and LR schedule from trainer.* (trainer.optimizer, trainer.lr, trainer.warmup_steps)")
    if config.get("fp16", {}).get("enabled") in (True, "true"):
        raise ConfigError("the DeepSpeed config enables fp16: mistral-train trains in fp32 or bf16; remove the fp16 "
                          "section and pass trainer.precision=bf16")
    stage = deepspeed_stage(config)
    if stage not in (1, 2, 3):
        raise ConfigError(f"the DeepSpeed config has zero_optimization.stage {stage}: use 1, 2 or 3 (stage 0 is plain "
                          "data parallelism: launch with configs/accelerate/ddp.yaml instead)")
    _agree(config, "gradient_accumulation_steps", 1, "trainer.grad_accum_steps (we accumulate; DeepSpeed's stays 1)")
    _agree(config, "train_micro_batch_size_per_gpu", spec.batch_size, "trainer.batch_size")
    _agree(config, "train_batch_size", spec.batch_size * world_size, "trainer.batch_size x processes")
    _agree(config, "gradient_clipping", float(max(spec.grad_clip, 0.0)), "trainer.grad_clip")
    _agree(config, "bf16.enabled", spec.precision == "bf16", "trainer.precision")
    config.setdefault("fp16", {})["enabled"] = False
    zero = config["zero_optimization"]
    offloaded = [f"zero_optimization.{k}.device: {zero[k].get('device')}" for k in ("offload_optimizer", "offload_param")
                 if str(zero.get(k, {}).get("device", "none")).lower() not in ("none", "")]
    if offloaded and on_cpu:
        raise ConfigError(f"{', '.join(offloaded)} on a CPU run: offloading moves states from GPU to CPU memory and "
                          f"does nothing here; use configs/accelerate/zero{stage}.yaml (no offload) on CPU")
    if stage < 3 and "offload_param" in " ".join(offloaded):
        raise ConfigError("zero_optimization.offload_param needs ZeRO stage 3: set stage 3 or remove offload_param")
    return config


def resolve_strategy(spec: TrainerSpec, env: Mapping[str, str], cuda: bool,
                     launcher_deepspeed: Optional[Mapping[str, Any]] = None,
                     own_deepspeed: Optional[Mapping[str, Any]] = None) -> Strategy:
    """The strategy of this run.

    Args:
        env: the process environment (what `accelerate launch` / `torchrun` set).
        cuda: whether CUDA devices are usable.
        launcher_deepspeed: the DeepSpeed config an Accelerate DeepSpeed launch carries.
        own_deepspeed: `trainer.deepspeed_config` (or the bundled configs/deepspeed/<strategy>.json),
            read when trainer.strategy names a ZeRO stage the launcher did not set up.
    Raises:
        ConfigError: any launch that cannot run as asked, saying what to change.
    """
    if spec.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {spec.strategy!r}")
    world = int(env.get("WORLD_SIZE", "1"))
    on_cpu = spec.device == "cpu" or (spec.device == "auto" and not cuda)
    _check_accelerate(spec, env)
    engine = launcher_engine(env)
    reshard = _check_fsdp(env, on_cpu) if engine == "fsdp" else True
    launched = None
    if engine == "fsdp":
        launched = "fsdp2"
    elif engine == "deepspeed":
        if launcher_deepspeed is None:
            raise ConfigError("ACCELERATE_USE_DEEPSPEED is set but no DeepSpeed config was found")
        launched = f"zero{deepspeed_stage(launcher_deepspeed)}"
    name = spec.strategy
    if name == "auto":
        name = launched or ("ddp" if world > 1 else "single")
    elif launched is not None and launched != name:
        raise ConfigError(f"trainer.strategy={spec.strategy} but the Accelerate config launches {launched}: launch with "
                          f"configs/accelerate/{spec.strategy}.yaml, or pass trainer.strategy=auto to take the launcher's")
    if name in ("fsdp2", "zero1", "zero2", "zero3") and "WORLD_SIZE" not in env:
        raise ConfigError(f"trainer.strategy={name} needs a launcher: accelerate launch --config_file "
                          f"configs/accelerate/{name}.yaml -m mistral_train ... (or torchrun --nproc_per_node N -m "
                          f"mistral_train ...; --num_processes 1 / --nproc_per_node 1 for a single device)")
    if name == "single" and world > 1:
        raise ConfigError(f"trainer.strategy=single but {world} processes were launched: pass trainer.strategy=auto or ddp")
    ds = None
    if name.startswith("zero"):
        source = launcher_deepspeed if launched else own_deepspeed
        if source is None:
            raise ConfigError(f"trainer.strategy={name}: no DeepSpeed config (set trainer.deepspeed_config)")
        if deepspeed_stage(source) != int(name[-1]):
            raise ConfigError(f"trainer.strategy={name} but its DeepSpeed config has zero_optimization.stage "
                              f"{deepspeed_stage(source)}: point trainer.deepspeed_config at a stage-{name[-1]} file")
        ds = deepspeed_config(source, spec, world, on_cpu)
    return Strategy(name, world, ds, reshard)
