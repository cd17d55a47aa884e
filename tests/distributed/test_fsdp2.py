"""FSDP2 with 2 CPU processes: `accelerate launch --config_file configs/accelerate/fsdp2.yaml` runs our own
torch `fully_shard` (mistral_train/dist/fsdp.py; Accelerate's FSDP would silently become DDP on CPU). The run
equals one process with the same global batch (1e-5), its weights really were sharded (one DCP file per
process), exact match generates on the gathered model, and the checkpoint resumes on ONE process under
torchrun (DCP reshards the weights and optimizer states)."""

from __future__ import annotations

import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, launch, data_dir):
    runs = tmp_path_factory.mktemp("fsdp2")
    args = [*launch.overrides("sft", data_dir, evaluate=True), "trainer.grad_accum_steps=2"]
    return runs, launch.run(runs, "fsdp2", args, config="fsdp2")


def test_fsdp2_equals_one_process_with_the_same_global_batch(fsdp2_run, references, launch):
    _, run_dir = fsdp2_run
    launch.assert_same_run(run_dir, references("sft"), atol=1e-5)
    checkpoint = run_dir / "checkpoints" / "step_3"
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert (state["strategy"], state["engine"], state["optimizer"]) == ("fsdp2", "fsdp2", None)
    shards = sorted(p.name for p in (checkpoint / "fsdp2").glob("*.distcp"))
    assert len(shards) == 2, shards  # each process wrote its own shard of weights and optimizer states
    assert any("exact_match" in row for row in launch.metrics(run_dir))
    from mistral_train import Mistral

    Mistral.from_pretrained(checkpoint)  # the gathered HF folder is complete (tied head included)


def test_fsdp2_checkpoint_resumes_on_one_process(fsdp2_run, launch, data_dir):
    """2 processes x grad_accum_steps 2 -> 1 process x 4 (the same global batch): the continuation equals
    the uninterrupted 2-process run within 1e-6 (another summation order, so not bit for bit)."""
    runs, reference = fsdp2_run
    cut = runs / "one"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_3", cut / "checkpoints" / "step_3")
    args = [*launch.overrides("sft", data_dir, evaluate=True), "trainer.grad_accum_steps=4", "trainer.strategy=fsdp2",
            "resume=latest"]
    launch.run(runs, "one", args, launcher="torchrun", processes=1)
    assert "resuming a 2-process checkpoint on 1 processes" in (runs / "one.run.log").read_text()
    assert launch.max_difference(launch.weights(cut / "final"), launch.weights(reference / "final")) <= 1e-6
    expected = {r["step"]: r["loss"] for r in launch.metrics(reference) if "loss" in r}
    for row in (r for r in launch.metrics(cut) if "loss" in r):
        assert abs(row["loss"] - expected[row["step"]]) <= 1e-6, row
