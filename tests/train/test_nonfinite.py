"""Non-finite steps (issue 19 item 2; train/guards.py, docs/reliability.md "Non-finite steps").

A window whose loss or gradient norm is NaN takes no update: the run must end with the weights of a run that
never trained on that window (the optimizer and scheduler did not step: the lr is constant here, so only the
skipped batch differs), count and log the skip with its step and data position, stop after
trainer.max_nonfinite_steps in a row, and never write a non-finite weight to a checkpoint or final/.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from mistral_train.config import RunConfig
from mistral_train.errors import ConfigError
from mistral_train.train import fit, loop
from mistral_train.train.guards import NonFiniteError, NonFiniteGuard
from tests._tiny import small_run

SKIPPED = 3  # the step whose window is poisoned


def _cfg(tmp_path, name, **trainer) -> RunConfig:
    """A tiny model on the bundled corpus; a constant lr (no warmup, no decay), so a skipped scheduler step
    does not change the lr of the steps after it."""
    spec = dict(max_steps=5, max_seq_len=32, batch_size=2, warmup_steps=0, min_lr_ratio=1.0, log_every=1,
                sample_max_new_tokens=1, eval_max_new_tokens=0)
    return small_run(tmp_path, name, **{**spec, **trainer})


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _poison(monkeypatch, steps, how):
    """Patch the loop's backward_window: on the calls (steps) in `steps`, `how` is "loss" (the window's
    loss comes back NaN, its real gradients stay) or "grad" (a hook turns one parameter's gradient NaN)."""
    real, calls = loop.backward_window, [0]

    def backward_window(model, *args, **kwargs):
        calls[0] += 1
        if calls[0] not in steps:
            return real(model, *args, **kwargs)
        if how == "loss":
            loss, units, stats = real(model, *args, **kwargs)
            return float("nan"), units, stats
        param = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
        handle = param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        try:
            return real(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(loop, "backward_window", backward_window)


@pytest.fixture(scope="module")
def skipped_reference(tmp_path_factory):
    """4 clean steps over the windows of steps 1, 2, 4, 5 (window 3 drawn and thrown away)."""
    real, calls = loop.next_window, [0]

    def next_window(batches, *args, **kwargs):
        calls[0] += 1
        if calls[0] == SKIPPED:
            real(batches, *args, **kwargs)
        return real(batches, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "next_window", next_window)
        run_dir = fit(_cfg(tmp_path_factory.mktemp("reference"), "skipped", max_steps=4))
    return _weights(run_dir / "final")


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_logged_and_the_run_equals_one_without_that_batch(
        tmp_path, monkeypatch, capsys, skipped_reference, how):
    _poison(monkeypatch, {SKIPPED}, how)
    run_dir = fit(_cfg(tmp_path, how))

    weights = _weights(run_dir / "final")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert weights.keys() == skipped_reference.keys()
    for key in weights:  # bit-identical: the poisoned window left no trace in the weights or Adam's moments
        assert torch.equal(weights[key], skipped_reference[key]), key
    out = capsys.readouterr().out
    # step 3's window is batches 5-6 of epoch 0 (batch_size 2): drawn at item 4
    assert f"warning: step {SKIPPED}: non-finite {'loss' if how == 'loss' else 'gradient norm'} nan; update skipped" in out
    assert f"update skipped (drawn from epoch 0 at item 4 of its shuffled order)" in out
    rows = _rows(run_dir)
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 1, 1, 1]
    # neither the optimizer nor the scheduler stepped on the skipped window: 4 steps taken out of 5
    state = torch.load(run_dir / "checkpoints" / "step_5" / "training_state.pt", weights_only=True)
    assert state["step"] == 5
    assert state["scheduler"]["last_epoch"] == 4
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {4.0}


def test_consecutive_non_finite_steps_stop_the_run_naming_them_and_a_broken_streak_does_not(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 5, 6}, "loss")  # two streaks of 2 with a clean step between: runs to the end
    run_dir = fit(_cfg(tmp_path, "streaks", max_steps=7, max_nonfinite_steps=3))
    assert _rows(run_dir)[-1]["skipped_steps"] == 4

    _poison(monkeypatch, {2, 3, 4, 5}, "loss")  # 3 in a row
    with pytest.raises(NonFiniteError) as stopped:
        fit(_cfg(tmp_path, "stops", max_steps=7, max_nonfinite_steps=3, save_every=1))
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("3 consecutive steps had a non-finite loss or gradient (trainer.max_nonfinite_steps=3): "
                              "step 2 (drawn from epoch 0 at item 2")
    assert "step 3 (" in message and "step 4 (" in message and "step 5" not in message
    # it stopped inside step 4: no checkpoint of it; steps 2 and 3 were saved with step 1's weights
    saved = sorted(p.name for p in (tmp_path / "stops" / "checkpoints").iterdir())
    assert saved == ["step_2", "step_3"]  # keep_last=2
    assert not (tmp_path / "stops" / "final").exists()


def test_a_non_finite_weight_never_reaches_a_checkpoint_or_final(tmp_path, monkeypatch):
    real, calls = loop._step, [0]

    def step(run, *args, **kwargs):  # after step 3's update, one weight turns NaN (a corrupted update)
        result = real(run, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                dict(run.model.named_parameters())["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        return result

    monkeypatch.setattr(loop, "_step", step)
    with pytest.raises(NonFiniteError, match=r"^step 4: the trained weight model\.layers\.1\.mlp\.down_proj\.weight "
                                             r"holds NaN or infinity; checkpoint step_4 not written"):
        fit(_cfg(tmp_path, "corrupt", max_steps=4, save_every=2))
    assert sorted(p.name for p in (tmp_path / "corrupt" / "checkpoints").iterdir()) == ["step_2"]
    assert not (tmp_path / "corrupt" / "final").exists()
    # step 4's forward through the NaN weight gave a NaN loss: that step was skipped, not applied
    assert _rows(tmp_path / "corrupt")[-1]["skipped_steps"] == 1


def test_a_negative_max_nonfinite_steps_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer\.max_nonfinite_steps=-1"):
        NonFiniteGuard(-1)
