"""Issue 19's non-finite steps and preemption under DDP (2 CPU processes through `accelerate launch`): every
process takes the same decision, summed over the processes at the step boundary (train/guards.py).

The faults are injected on ONE process only (tests/train/_fault_switches.py): a gradient made NaN after DDP's
sync on rank 1 (rank 0's own norm stays finite), a SIGTERM to rank 1 alone (rank 0, which writes the
checkpoint, never receives it).
"""

from __future__ import annotations

import re
import signal
import time

import psutil
import pytest
import torch

from mistral_train.train import loop


def _rank_process(launch_, rank: int) -> psutil.Process:
    """The worker process of `rank` under the launcher (its RANK environment variable)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for child in psutil.Process(launch_.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "_dist_child.py" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process under the launcher")


def test_a_nan_gradient_on_one_rank_is_skipped_by_both(tmp_path, launch, data_dir, monkeypatch):
    args = [*launch.overrides("sft", data_dir)]
    two = launch.start(tmp_path, "nan2", [*args, "trainer.grad_accum_steps=2"], MT_TEST_NAN_GRAD="3:1")
    try:
        log = two.wait()
    finally:
        two.stop()
    # rank 0 prints; its own norm was finite, the flag came from rank 1
    assert "warning: step 3: non-finite gradient norm on another process; update skipped (drawn from epoch 0 at item 16" in log

    # one process, the same window's gradient NaN (the same skip): the two-process run must equal it
    real, calls = loop.backward_window, [0]

    def backward_window(model, *a, **k):
        calls[0] += 1
        result = real(model, *a, **k)
        if calls[0] == 3:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return result

    monkeypatch.setattr(loop, "backward_window", backward_window)
    one = launch.fit_here(tmp_path, "nan1", [*args, "trainer.grad_accum_steps=4"])
    monkeypatch.undo()
    got, expected = ([r for r in launch.metrics(run) if "loss" in r] for run in (two.run_dir, one))
    assert [r.get("skipped_steps", 0) for r in got] == [r.get("skipped_steps", 0) for r in expected] == [0, 0, 1, 1, 1, 1]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-5)
    # had rank 0 applied the update it alone saw as finite, its weights (final/) would be a step apart
    assert launch.max_difference(launch.weights(two.run_dir / "final"), launch.weights(one / "final")) <= 1e-5


def test_sigterm_to_one_rank_stops_both_after_one_checkpoint_and_resume_is_exact(tmp_path, launch, data_dir, references):
    args = [*launch.overrides("sft", data_dir), "trainer.grad_accum_steps=2"]
    first = launch.start(tmp_path, "cut", args, label="preempted", MT_TEST_STEP_DELAY_S="0.3")
    try:
        while 1 not in [r["step"] for r in launch.metrics(first.run_dir)]:
            assert first.proc.poll() is None, first.log.read_text()[-3000:]
            time.sleep(0.02)
        _rank_process(first, 1).send_signal(signal.SIGTERM)
        log = first.wait()  # the launcher's exit status: 0 (both ranks exited 0)
    finally:
        first.stop()
    lines = [line for line in log.splitlines() if line.startswith("preempted by")]
    assert len(lines) == 1, log[-3000:]  # one line, from the main process
    stopped = int(re.match(r"preempted by a preemption signal on another process: stopped after step (\d+), ", lines[0])[1])
    assert 1 <= stopped < launch.MAX_STEPS
    saved = sorted(int(p.name.split("_")[1]) for p in (first.run_dir / "checkpoints").iterdir())
    assert saved == sorted({stopped, *(s for s in (3,) if s < stopped)})  # save_every=3, and the stop's
    state = torch.load(first.run_dir / "checkpoints" / f"step_{stopped}" / "training_state.pt", weights_only=True)
    assert (state["step"], state["world_size"], len(state["rng_ranks"])) == (stopped, 2, 2)
    assert not (first.run_dir / "final").exists()

    launch.run(tmp_path, "cut", [*args, "resume=latest"], label="resumed")
    launch.assert_same_run(first.run_dir, references("sft"), atol=1e-5)
