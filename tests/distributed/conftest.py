"""Shared pieces of the multi-process tests: tiny runs started with `accelerate launch` / `torchrun`
(2 CPU processes, gloo), and the one-process runs they must equal.

Every run is the same tiny model (hidden 32, 2 layers, sequences of 32 tokens) on a small file, so a
launch costs about 10 s, most of it importing torch in each process. A window is 4 micro-batches of
2 rows: one process with grad_accum_steps=4, or two with grad_accum_steps=2 each (same global batch).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_dist_child.py")
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
LAUNCH_TIMEOUT_S = 300
MAX_STEPS, SAVE_EVERY = 6, 3
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
    "model.num_key_value_heads=2", "trainer.max_seq_len=32", "trainer.batch_size=2", f"trainer.max_steps={MAX_STEPS}",
    "trainer.warmup_steps=2", f"trainer.save_every={SAVE_EVERY}", "trainer.keep_last=3", "trainer.log_every=1",
    "trainer.device=cpu", "trainer.precision=fp32", "trainer.sample_max_new_tokens=2", "trainer.eval_max_new_tokens=2",
    "tracking.progress_bar=false", "tracking.plot=false",
]


def _bundled(name: str) -> Path:
    return Path(str(resources.files("mistral_train") / "resources" / "data" / name))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """48 chat rows (padded one per row, so micro-batches differ in label tokens), 8 held-out chat rows with
    answers (exact match generates from the gathered model), 48 text documents."""
    folder = tmp_path_factory.mktemp("dist_data")
    (folder / "chat.jsonl").write_text("\n".join(_bundled("tiny_chat.jsonl").read_text().splitlines()[:48]) + "\n")
    (folder / "chat_eval.jsonl").write_text("\n".join(_bundled("tiny_chat_eval.jsonl").read_text().splitlines()[:8]) + "\n")
    docs = _bundled("tiny_corpus.txt").read_text().split("\n\n")[:48]
    (folder / "corpus.txt").write_text("\n\n".join(d.strip() for d in docs) + "\n")
    return folder


def overrides(kind: str, data_dir: Path, evaluate: bool = False) -> list[str]:
    """A run's overrides: "sft" (padded chat, label masks) or "text" (packed pretraining rows); `evaluate`:
    held-out loss and exact match at the end (training is the same either way)."""
    if kind == "sft":
        held_out = f"data.eval_path={data_dir / 'chat_eval.jsonl'}" if evaluate else "data.eval_path=null"
        return ["recipe=tiny_sft", *TINY, f"data.path={data_dir / 'chat.jsonl'}", "data.packing=false", held_out,
                "data.eval_fraction=0.0", "trainer.eval_before_training=false"]
    return ["recipe=tiny_pretrain", *TINY, f"data.path={data_dir / 'corpus.txt'}"]


def free_port() -> int:
    with socket.socket() as sock:  # concurrent sessions on one machine must not share 29500
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT_TEST_", "ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Launch:
    """One launcher process and the ranks it starts."""

    proc: subprocess.Popen
    log: Path
    run_dir: Path
    began: float

    def wait(self, expect_ok: bool = True) -> str:
        code = self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        text = self.log.read_text(errors="replace")
        print(f"{self.log.name}: exit {code} after {time.monotonic() - self.began:.1f}s")
        if expect_ok:
            assert code == 0, f"{self.log.name}: exit status {code}\n{text[-4000:]}"
        return text

    def kill_after_step(self, step: int) -> None:
        """SIGKILL the whole launch (launcher and every rank) once metrics.jsonl shows `step`."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while step not in [row["step"] for row in metrics(self.run_dir)]:
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before step {step}\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"step {step} not logged in {LAUNCH_TIMEOUT_S}s"
            time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        """SIGKILL the launcher and every process under it. torchrun starts each rank in a session of its
        own, so killing the launcher's process group alone would leave the ranks running."""
        import psutil

        try:
            ranks = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ranks = []
        targets = ranks if self.proc.poll() is not None else [psutil.Process(self.proc.pid), *ranks]
        for process in targets:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        psutil.wait_procs(ranks, timeout=60)


def start(runs: Path, name: str, args: list[str], launcher: str = "accelerate", config: Optional[str] = "cpu_ddp",
          processes: int = 2, label: str = "run", **env: str) -> Launch:
    """Start `_dist_child.py` with `args` under `accelerate launch --config_file configs/accelerate/{config}.yaml`
    or `torchrun`, run folder runs/name."""
    port = str(free_port())
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml")
                   if not str(config).endswith(".yaml") else str(config),
                   "--num_processes", str(processes), "--main_process_port", port]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", port]
    log = runs / f"{name}.{label}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, str(CHILD), *args, f"run.dir={runs}", f"run.name={name}"], stdout=out,
                                stderr=subprocess.STDOUT, env=child_env(**env), cwd=REPO, start_new_session=True)
    return Launch(proc, log, runs / name, time.monotonic())


def run(runs: Path, name: str, args: list[str], **kwargs) -> Path:
    """`start` and wait for a clean exit; returns the run folder."""
    launch = start(runs, name, args, **kwargs)
    try:
        launch.wait()
    finally:
        launch.stop()
    return launch.run_dir


def fit_here(runs: Path, name: str, args: list[str]) -> Path:
    """The same overrides as one process, in this test process (no launcher, no process group)."""
    from mistral_train.cli import split_recipe
    from mistral_train.config import load_run_config
    from mistral_train.train import fit

    recipe, rest = split_recipe(args)
    return fit(load_run_config(recipe, [*rest, f"run.dir={runs}", f"run.name={name}"]))


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder}: no safetensors files"
    return {key: tensor for file in files for key, tensor in load_file(file).items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_same_run(got: Path, expected: Path, atol: float = 1e-5, folder: str = "final") -> None:
    """Per-step losses and the final weights of two runs agree within `atol`."""
    got_rows, expected_rows = ([r for r in metrics(run) if "loss" in r] for run in (got, expected))  # not sample rows
    assert [r["step"] for r in got_rows] == [r["step"] for r in expected_rows]
    for g, e in zip(got_rows, expected_rows):
        assert abs(g["loss"] - e["loss"]) <= atol, (g["step"], g["loss"], e["loss"])
        assert g["lr"] == pytest.approx(e["lr"], rel=1e-12)
        # the engines compute the global norm from their shards, in another order: ~1e-5 relative
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3)
    difference = max_difference(weights(got / folder), weights(expected / folder))
    assert difference <= atol, f"{folder}/ weights differ by {difference:.2e}"


@pytest.fixture(scope="session")
def references(tmp_path_factory, data_dir):
    """One-process runs (grad_accum_steps=4), computed once per data kind: {kind: run folder}."""
    runs, done = tmp_path_factory.mktemp("dist_reference"), {}

    def get(kind: str) -> Path:
        if kind not in done:
            done[kind] = fit_here(runs, kind, [*overrides(kind, data_dir), "trainer.grad_accum_steps=4"])
        return done[kind]

    return get


@pytest.fixture(scope="session")
def launch():
    """The helpers above for the test modules (under --import-mode=importlib a conftest is not importable)."""
    from types import SimpleNamespace

    return SimpleNamespace(start=start, run=run, fit_here=fit_here, overrides=overrides, metrics=metrics,
                           weights=weights, max_difference=max_difference, assert_same_run=assert_same_run,
                           child_env=child_env, MAX_STEPS=MAX_STEPS, SAVE_EVERY=SAVE_EVERY, REPO=REPO, CHILD=CHILD)
