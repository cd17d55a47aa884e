"""FSDP2 over expert weights: a tiny Mixtral (4 experts, 2 per token, the load-balancing loss on) trained by
2 CPU processes under `accelerate launch --config_file configs/accelerate/fsdp2.yaml` (each decoder block one
FSDP unit, so each process holds half of every layer's expert tensors) equals one process with the same global
batch: per-step losses, learning rates and the final weights (experts and routers included) within 1e-5, and the
tokens per expert the two processes log summed equal the single process's counts."""

from __future__ import annotations

import pytest

MOE = ["model.model_type=mixtral", "model.num_local_experts=4", "model.num_experts_per_tok=2",
       "model.router_aux_loss_coef=0.02", "model.intermediate_size=32"]


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, launch, data_dir):
    runs = tmp_path_factory.mktemp("fsdp2_moe")
    args = [*launch.overrides("sft", data_dir), *MOE, "trainer.save_every=null"]  # padded chat rows: masks and padding
    one = launch.fit_here(runs, "one", [*args, "trainer.grad_accum_steps=4"])
    two = launch.run(runs, "fsdp2", [*args, "trainer.grad_accum_steps=2"], config="fsdp2")
    return one, two


def test_fsdp2_over_expert_weights_equals_one_process(moe_runs, launch):
    one, two = moe_runs
    launch.assert_same_run(two, one, atol=1e-5)
    final = launch.weights(two / "final")
    assert final["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape == (32, 32)  # whole experts gathered
    assert "model.layers.1.block_sparse_moe.gate.weight" in final


def test_fsdp2_logs_the_same_expert_load_and_aux_loss_as_one_process(moe_runs, launch):
    one, two = moe_runs
    rows = {run: [r for r in launch.metrics(run) if "loss" in r] for run in (one, two)}
    assert [r["step"] for r in rows[one]] == [r["step"] for r in rows[two]] == list(range(1, launch.MAX_STEPS + 1))
    for single, sharded in zip(rows[one], rows[two]):
        load = {k: v for k, v in single.items() if k.startswith("expert_tokens/")}
        assert len(load) == 2 * 4 and sum(load.values()) > 0
        assert {k: sharded[k] for k in load} == load  # each process's counts, summed over the two
        assert sharded["router_aux_loss"] == pytest.approx(single["router_aux_loss"], abs=1e-5)
