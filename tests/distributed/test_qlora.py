"""QLoRA with 2 CPU processes under DDP, FSDP2 and ZeRO-3. Our NF4 base weights are uint8 buffers
(quant/linear.py), which no engine shards or broadcasts: every process keeps the whole 4-bit base, as under
DDP, while FSDP2 and ZeRO-3 shard the adapters and the float weights (embeddings, norms, head). Each run's
PEFT adapter and per-step losses equal the one-process run's with the same global batch."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, launch, data_dir, tiny_base_folder):
    """(runs folder, overrides, the one-process run)."""
    runs = tmp_path_factory.mktemp("qlora")
    # A modest LR: Adam turns the rounding noise of near-zero adapter gradients (lora_A while B is still
    # ~0) into steps of up to lr, so the agreement of two summation orders scales with it (~1.5e-5 at 2e-2).
    args = [*launch.overrides("sft", data_dir), "adapter=qlora", f"model.path={tiny_base_folder}", "adapter.r=8",
            "adapter.alpha=16", "trainer.lr=2e-3", "trainer.max_steps=4", "trainer.save_every=2"]
    return runs, args, launch.fit_here(runs, "one", [*args, "trainer.grad_accum_steps=4"])


@pytest.mark.parametrize("config", ["cpu_ddp", "fsdp2", "zero3"])
def test_qlora_on_two_processes_equals_one(config, qlora, launch):
    runs, args, one = qlora
    two = launch.run(runs, config, [*args, "trainer.grad_accum_steps=2"], config=config)
    launch.assert_same_run(two, one, atol=1e-5)
    saved = launch.weights(two / "final")
    assert saved and all(".lora_" in key for key in saved)  # a PEFT adapter: the frozen base is never copied
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_2", "step_4"]
