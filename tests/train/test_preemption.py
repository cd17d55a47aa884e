"""Preemption signals (issue 19 item 4; train/guards.py, docs/reliability.md "Preemption").

SIGTERM or SIGUSR1 makes the run write a checkpoint at the next step boundary and exit 0 with one line saying
how to continue; resume=latest from it ends with the weights and losses of a run never interrupted. The
signals come from outside (this test process) into a child `mistral-train` process that is slowed by
MT_TEST_STEP_DELAY_S so that it is still running when they arrive (tests/train/_fault_switches.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mistral_train.cli import split_recipe
from mistral_train.config import load_run_config
from mistral_train.errors import ConfigError
from mistral_train.train import fit, loop
from mistral_train.train.guards import Preempted, Preemption

HELPER = Path(__file__).with_name("_killable_run.py")
MAX_STEPS = 10
TINY = [
    "recipe=tiny_pretrain", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "trainer.max_seq_len=32", "trainer.batch_size=2",
    f"trainer.max_steps={MAX_STEPS}", "trainer.warmup_steps=2", "trainer.log_every=1", "trainer.device=cpu",
    "trainer.precision=fp32", "trainer.sample_max_new_tokens=1", "tracking.progress_bar=false", "tracking.plot=false",
]
TIMEOUT_S = 240


def _corpus(folder: Path) -> Path:
    docs = (resources.files("mistral_train") / "resources" / "data" / "tiny_corpus.txt").read_text().split("\n\n")[:40]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(d.strip() for d in docs) + "\n")
    return path


def _args(runs: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"data.path={_corpus(runs)}", f"run.dir={runs}", f"run.name={name}", *extra]


def _logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # the last piece may be half written
    return [json.loads(line) for line in lines if line]


def _signal_after(runs: Path, name: str, sig: signal.Signals, after: int, *extra: str) -> tuple[int, str]:
    """Run a child, send it `sig` once step `after` is logged; return (its exit status, its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MT_TEST_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1", MT_TEST_STEP_DELAY_S="0.3")
    child = subprocess.Popen([sys.executable, str(HELPER), *_args(runs, name, *extra)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env, cwd=HELPER.parents[2], text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while after not in [row["step"] for row in _logged(runs / name)]:
            assert child.poll() is None, f"exited ({child.returncode}) before step {after}\n{child.stdout.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(sig)
        out, _ = child.communicate(timeout=TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, out


def _stopped_at(out: str, sig: signal.Signals, run_dir: Path) -> int:
    """The step of the one 'preempted' line, checked against the checkpoint written for it."""
    lines = [line for line in out.splitlines() if line.startswith("preempted by")]
    assert len(lines) == 1, out
    step = int(re.match(rf"preempted by {sig.name}: stopped after step (\d+), ", lines[0]).group(1))
    assert f"checkpoint {run_dir / 'checkpoints' / f'step_{step}'} written" in lines[0]
    assert lines[0].endswith("continue by running the same command with resume=latest"), lines[0]
    return step


def test_sigterm_then_sigusr1_checkpoint_exit_0_and_resume_equals_an_uninterrupted_run(tmp_path):
    reference = fit(load_run_config(*split_recipe(_args(tmp_path, "reference"))))

    code, out = _signal_after(tmp_path, "run", signal.SIGTERM, 3)
    assert code == 0, out
    first = _stopped_at(out, signal.SIGTERM, tmp_path / "run")
    assert 3 <= first < MAX_STEPS
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"step_{first}"]
    assert not (tmp_path / "run" / "final").exists()

    code, out = _signal_after(tmp_path, "run", signal.SIGUSR1, first + 1, "resume=latest")
    assert code == 0, out
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{first}'} at step {first}" in out
    second = _stopped_at(out, signal.SIGUSR1, tmp_path / "run")
    assert first < second < MAX_STEPS

    fit(load_run_config(*split_recipe(_args(tmp_path, "run", "resume=latest"))))  # to the end, undisturbed
    got, expected = (load_file(run / "final" / "model.safetensors") for run in (tmp_path / "run", reference))
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key
    assert [(r["step"], r["loss"]) for r in _logged(tmp_path / "run")] == \
           [(r["step"], r["loss"]) for r in _logged(reference)]


@pytest.mark.parametrize("when, stops", [("step", 2), ("setup", 1)])
def test_a_signal_in_process_stops_at_the_boundary_and_the_handlers_are_restored(tmp_path, monkeypatch, capsys,
                                                                                 when, stops):
    """The signal lands while step 2 runs (twice: a repeat changes nothing), or while the model is being set up
    (the handlers are installed before): the run stops after that step, or after step 1."""
    target = "_step" if when == "step" else "_setup"
    real, calls = getattr(loop, target), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stops:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, target, patched)
    before = signal.getsignal(signal.SIGUSR1)
    cfg = load_run_config(*split_recipe(_args(tmp_path, "inproc", "trainer.preemption_grace_s=1e-9")))
    with pytest.raises(Preempted, match=rf"^preempted by SIGUSR1: stopped after step {stops}, "):
        fit(cfg)
    assert signal.getsignal(signal.SIGUSR1) is before
    assert [p.name for p in (tmp_path / "inproc" / "checkpoints").iterdir()] == [f"step_{stops}"]
    out = capsys.readouterr().out
    assert out.count("preempted by") == 1
    assert "this took longer than trainer.preemption_grace_s=1e-09s" in out


@pytest.mark.parametrize("names, grace, key", [
    (["SIGKILL"], 30.0, "trainer.preemption_signals: 'SIGKILL'"),
    (["SIGTERM", "NOPE"], 30.0, "trainer.preemption_signals: 'NOPE'"),
    (["usr1"], 0.0, "trainer.preemption_grace_s=0.0"),
])
def test_bad_preemption_settings_are_config_errors(names, grace, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        Preemption(names, grace)
