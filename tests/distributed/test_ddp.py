"""DDP with 2 CPU processes through `accelerate launch`: the same run as one process with the same global
batch (per-step losses and final weights within 1e-5, gradient accumulation on), and an exact resume after
the whole launch is SIGKILLed."""

from __future__ import annotations

import pytest
import torch

from mistral_train.checkpoint.state import latest_checkpoint


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, launch, data_dir):
    """The uninterrupted 2-process SFT run (grad_accum_steps=2 per process): (runs folder, run folder)."""
    runs = tmp_path_factory.mktemp("ddp")
    return runs, launch.run(runs, "ddp", [*launch.overrides("sft", data_dir), "trainer.grad_accum_steps=2"])


def test_two_processes_equal_one_with_the_same_global_batch(ddp_run, references, launch):
    runs, run_dir = ddp_run
    launch.assert_same_run(run_dir, references("sft"), atol=1e-5)
    # every checkpoint is a usable HF folder plus state; only the main process wrote metrics
    for step in (3, 6):
        folder = run_dir / "checkpoints" / f"step_{step}"
        assert {"config.json", "model.safetensors", "training_state.pt", "tokenizer.model"} <= {p.name for p in folder.iterdir()}
    state = torch.load(run_dir / "checkpoints" / "step_3" / "training_state.pt", weights_only=True)
    assert (state["strategy"], state["world_size"], state["engine"]) == ("ddp", 2, None)
    assert len(state["rng_ranks"]) == 2


def test_resume_after_sigkill_of_the_launch_is_bit_identical(ddp_run, launch, data_dir):
    """The launch is killed (SIGKILL to the launcher and every rank) while stalled after step 4: the
    newest checkpoint is step_3; `resume=latest` on 2 processes continues with the same data shards
    (every process re-draws the global sequence from the saved position) and RNG states."""
    runs, reference = ddp_run
    args = [*launch.overrides("sft", data_dir), "trainer.grad_accum_steps=2"]
    first = launch.start(runs, "cut", args, label="killed", MT_TEST_STALL_AFTER_STEP="4")
    try:
        first.kill_after_step(4)
    finally:
        first.stop()
    cut = runs / "cut"
    assert not (cut / "final").exists()
    assert latest_checkpoint(cut) == cut / "checkpoints" / "step_3"
    launch.run(runs, "cut", [*args, "resume=latest"], label="resumed")
    expected, got = launch.weights(reference / "final"), launch.weights(cut / "final")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the uninterrupted run"
    rows = {r["step"]: r["loss"] for r in launch.metrics(cut) if "loss" in r}  # steps 1-4 from the killed launch, 4-6 resumed
    assert all(rows[r["step"]] == r["loss"] for r in launch.metrics(reference) if "loss" in r)



def test_a_staged_recipe_runs_its_stages_in_one_process_group(tmp_path, launch):
    """tiny_pretrain_sft under the launcher: each stage is a fit() with its own Accelerator, and the second
    joins the process group the first started (a second init_process_group under torchrun deadlocks)."""
    args = ["recipe=tiny_pretrain_sft", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
            "trainer.max_seq_len=32", "trainer.batch_size=2", "trainer.max_steps=2", "trainer.device=cpu",
            "stages.sft.trainer.max_steps=2", "stages.sft.trainer.eval_max_new_tokens=2", "stages.sft.trainer.sample_max_new_tokens=2",
            "trainer.sample_max_new_tokens=2", "tracking.progress_bar=false", "tracking.plot=false"]
    run_dir = launch.run(tmp_path, "staged", args)
    for stage in ("pretrain", "sft"):
        assert (run_dir / stage / "final" / "model.safetensors").is_file(), stage
    assert [r["step"] for r in launch.metrics(run_dir / "sft") if "loss" in r] == [1, 2]
