"""The planner's per-GPU model states against DeepSpeed's own ZeRO estimators (pure arithmetic, no GPU).

DeepSpeed counts, per parameter Ψ, under bf16/fp16 mixed precision: 16-bit weights (2), 16-bit gradients (2),
an fp32 gradient partition (4), fp32 master weights (4) and fp32 Adam m, v (8):
  ZeRO-2 `estimate_zero2_model_states_mem_needs`: GPU 2Ψ + 18Ψ/N; offload_optimizer: 2Ψ.
  ZeRO-3 `estimate_zero3_model_states_mem_needs`: GPU 18Ψ/N + 4L (L: the largest module's parameters, gathered
  with its gradient); offload_optimizer: 2Ψ/N + 4L; offload_optimizer + offload_param: 4L.
Host (CPU) memory is compared where DeepSpeed's figure is the offloaded states times its 1.5 buffer factor:
ZeRO-3 with zero_init, and ZeRO-2 up to 4 GPUs a node (beyond, it counts every process's fp32 load-time copy).
"""

from __future__ import annotations

import dataclasses

import pytest

from mistral_train.config import RunConfig
from mistral_train.plan import PlanOptions, module_sizes, plan_run

# deepspeed is a dev dependency (pyproject's dev extra): missing, this file fails to import, never skips
from deepspeed.runtime.zero import stage3, stage_1_and_2  # noqa: E402

SHAPES = {  # vocab comes from the tokenizer: bundled v1 (32000) and v3 (32768)
    "mistral-7b": dict(tokenizer="bundled:v1", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(tokenizer="bundled:v3", hidden_size=2048, intermediate_size=7168, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True),
}
LAYOUTS = [(1, 1), (1, 8), (2, 8)]  # (nodes, GPUs per node); the planner sees nodes * GPUs processes
TOLERANCE = 0.10


def _plan(shape: str, strategy: str, processes: int):
    cfg = RunConfig()
    cfg.model = dataclasses.replace(cfg.model, dtype="bfloat16", **SHAPES[shape])
    cfg.trainer = dataclasses.replace(cfg.trainer, precision="bf16")
    plan = plan_run(cfg, PlanOptions(num_processes=processes, strategy=strategy))
    sizes = module_sizes(plan.model)
    row = plan.rows[0]
    return row, sum(sizes.values()), max(sizes.values())


def _close(ours: float, theirs: float) -> None:
    assert abs(ours - theirs) <= TOLERANCE * theirs, f"planner {ours / 2**30:.3f} GiB, DeepSpeed {theirs / 2**30:.3f} GiB"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nodes, per_node", LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed(shape, nodes, per_node, offload):
    row, total, _ = _plan(shape, "zero2_offload" if offload else "zero2", nodes * per_node)
    cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        total, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload)
    _close(row.weights + row.grads + row.optimizer_states, gpu)
    if offload and nodes == 1 and per_node <= 4:
        _close(1.5 * row.host, cpu)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nodes, per_node", LAYOUTS)
@pytest.mark.parametrize("strategy, offload, offload_params", [("zero3", False, False), ("zero3_offload", True, False),
                                                               ("zero3_offload_params", True, True)])
def test_zero3_model_states_match_deepspeed(shape, nodes, per_node, strategy, offload, offload_params):
    row, total, largest = _plan(shape, strategy, nodes * per_node)
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload,
        cpu_offload_params=offload_params, zero_init=True)
    _close(row.weights + row.grads + row.optimizer_states, gpu)
    if offload and nodes == 1:
        _close(1.5 * row.host, cpu)


@pytest.mark.parametrize("tie", [False, True])
def test_total_and_largest_module_as_deepspeed_counts_them(tie):
    """DeepSpeed's `model_to_params` on a real model: shared weights once, the largest module's own parameters."""
    from mistral_train import Mistral, MistralConfig

    cfg = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    sizes = module_sizes(cfg)
    assert stage3.model_to_params(Mistral(cfg)) == (sum(sizes.values()), max(sizes.values()))
