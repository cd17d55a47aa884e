"""Misconfigured launches fail at start with a message saying what to change (one test per case, on the pure
functions of mistral_train/dist/strategy.py, plus two real `accelerate launch`es), resume refuses what an engine
cannot restore, and the data sharding of next_window survives a resume."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mistral_train.config import TrainerSpec
from mistral_train.errors import ConfigError
from mistral_train.data.epochs import EpochBatches
from mistral_train.dist.strategy import deepspeed_config, resolve_strategy
from mistral_train.train.resume import _check_resumable
from mistral_train.train.loop import next_window

LAUNCHED = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
ZERO3 = {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}


def _resolve(env=None, cuda=False, launcher_ds=None, own_ds=None, **spec):
    return resolve_strategy(TrainerSpec(**spec), {**LAUNCHED, **(env or {})}, cuda, launcher_ds, own_ds)


def test_the_launcher_decides_under_auto():
    assert _resolve().name == "ddp"
    assert resolve_strategy(TrainerSpec(), {}, False).name == "single"
    assert _resolve({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}).name == "fsdp2"
    strategy = _resolve({"ACCELERATE_USE_DEEPSPEED": "true"}, launcher_ds=ZERO3, batch_size=4, grad_clip=0.5)
    assert strategy.name == "zero3" and strategy.sharded
    assert strategy.deepspeed["train_micro_batch_size_per_gpu"] == 4 and strategy.deepspeed["train_batch_size"] == 8
    assert strategy.deepspeed["gradient_clipping"] == 0.5  # never DeepSpeed's silent default of 1.0
    assert strategy.deepspeed["gradient_accumulation_steps"] == 1 and strategy.deepspeed["bf16"]["enabled"] is False


@pytest.mark.parametrize("env, spec, says", [
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, {}, r"gradient_accumulation_steps: 1 .*trainer\.grad_accum_steps=4"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {}, r"mixed_precision: 'no'.*trainer\.precision=bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {"precision": "fp32"}, r"trainer\.precision=fp32"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, r"set fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, {},
     r"model\.gradient_checkpointing=true"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, {},
     r"fsdp_offload_params: false, or offload with DeepSpeed: configs/accelerate/zero3_offload\.yaml"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {"strategy": "zero3"}, r"configs/accelerate/zero3\.yaml"),
    ({}, {"strategy": "single"}, r"2 processes were launched"),
    ({}, {"strategy": "tp"}, r"trainer\.strategy must be one of"),
])
def test_a_launch_we_cannot_run_is_refused_with_what_to_change(env, spec, says):
    with pytest.raises(ConfigError, match=says):
        _resolve(env, **spec)


def test_an_engine_strategy_without_a_launcher_is_refused():
    with pytest.raises(ConfigError, match=r"needs a launcher: accelerate launch --config_file configs/accelerate/zero2"):
        resolve_strategy(TrainerSpec(strategy="zero2"), {}, False, None, {"zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("change, says", [
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps: 4.*\"auto\""),
    ({"train_micro_batch_size_per_gpu": 16}, r"trainer\.batch_size"),
    ({"gradient_clipping": 1.0}, r"trainer\.grad_clip"),  # TrainerSpec(grad_clip=0.5) below
    ({"bf16": {"enabled": True}}, r"trainer\.precision"),
    ({"fp16": {"enabled": True}}, r"trainer\.precision=bf16"),
    ({"optimizer": {"type": "AdamW"}}, r"remove it.*trainer\.optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, r"`scheduler` section"),
    ({"zero_optimization": {"stage": 0}}, r"stage 0 is plain data parallelism"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, r"on a CPU run.*zero3\.yaml"),
])
def test_a_deepspeed_config_that_disagrees_with_the_run_is_refused(change, says):
    with pytest.raises(ConfigError, match=says):
        deepspeed_config({**ZERO3, **change}, TrainerSpec(grad_clip=0.5), world_size=2, on_cpu=True)


def test_a_zero_strategy_must_match_its_deepspeed_config():
    with pytest.raises(ConfigError, match=r"stage 3: point trainer\.deepspeed_config at a stage-2 file"):
        _resolve(own_ds=ZERO3, strategy="zero2")
    with pytest.raises(ConfigError, match=r"configs/accelerate/zero2\.yaml.*trainer\.strategy=auto"):
        _resolve({"ACCELERATE_USE_DEEPSPEED": "true"}, launcher_ds=ZERO3, strategy="zero2")


def _accelerator(strategy: str, processes: int):
    from mistral_train.dist.strategy import Strategy

    return SimpleNamespace(strategy=Strategy(strategy, processes), num_processes=processes, is_main_process=True)


def test_resume_refuses_what_the_engine_cannot_restore(tmp_path):
    zero2 = {"strategy": "zero2", "world_size": 2, "engine": "deepspeed"}
    with pytest.raises(ConfigError, match=r"written by 2 DeepSpeed processes and this launch has 4: .*launch 2 processes"):
        _check_resumable(zero2, _accelerator("zero2", 4), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer\.strategy=zero2; its optimizer state cannot resume under fsdp2"):
        _check_resumable(zero2, _accelerator("fsdp2", 2), tmp_path)
    _check_resumable({"strategy": "ddp", "world_size": 2}, _accelerator("single", 1), tmp_path)  # DDP: any count
    _check_resumable({"strategy": "fsdp2", "world_size": 2, "engine": "fsdp2"}, _accelerator("fsdp2", 4), tmp_path)
    _check_resumable({}, _accelerator("ddp", 2), tmp_path)  # a one-process checkpoint of before


def test_processes_take_distinct_batches_and_the_sharding_survives_a_resume():
    items = [torch.full((4,), i) for i in range(40)]

    def batches() -> EpochBatches:
        return EpochBatches(items, lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)},
                            batch_size=2, seed=3, tokens=160)

    objective = SimpleNamespace(count=lambda b: int((b["labels"][:, 1:] != -100).sum()))
    streams = [batches() for _ in range(2)]  # one per process: each draws the same global sequence
    first = [next_window(s, objective, 2, 2, rank) for rank, s in enumerate(streams)]
    mine = [torch.cat([b["input_ids"] for b in window]) for window, _, _ in first]
    assert not set(mine[0][:, 0].tolist()) & set(mine[1][:, 0].tolist())  # distinct examples
    assert first[0][1] == first[1][1] == 4 * 2 * 3  # both know the whole window's label tokens
    saved = streams[0].state_dict()
    uninterrupted = [next_window(s, objective, 2, 2, rank)[0] for rank, s in enumerate(streams)]
    for rank in range(2):  # a resumed process continues with the batches the uninterrupted one would take
        resumed = batches()
        resumed.load_state_dict(saved)
        again = next_window(resumed, objective, 2, 2, rank)[0]
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, uninterrupted[rank]))


def _launch_fails(launch, tmp_path, config: str, *extra: str) -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
               "--main_process_port", "0", "-m", "mistral_train", "recipe=tiny_pretrain", "trainer.max_steps=1",
               f"run.dir={tmp_path}", *extra]
    done = subprocess.run(command, cwd=launch.REPO, env=launch.child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    assert not (tmp_path / "tiny_pretrain" / "metrics.jsonl").exists()  # refused before any training step
    return done.stdout + done.stderr


def test_zero3_offload_launch_on_cpu_fails_at_start(tmp_path, launch):
    output = _launch_fails(launch, tmp_path, str(launch.REPO / "configs" / "accelerate" / "zero3_offload.yaml"))
    assert "mistral-train: error: zero_optimization.offload_optimizer.device: cpu" in output
    assert "use configs/accelerate/zero3.yaml (no offload) on CPU" in output


def test_accelerate_gradient_accumulation_launch_fails_at_start(tmp_path, launch):
    config = tmp_path / "zero2_accumulating.yaml"
    config.write_text(json.dumps({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                                  "deepspeed_config": {"zero_stage": 2, "gradient_accumulation_steps": 4},
                                  "num_machines": 1, "num_processes": 2, "machine_rank": 0, "use_cpu": False}))
    output = _launch_fails(launch, tmp_path, str(config))
    assert "set gradient_accumulation_steps: 1 in the Accelerate config and pass trainer.grad_accum_steps=4" in output
