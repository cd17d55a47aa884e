"""Resume after SIGKILL ends bit-identical to the run that was never interrupted (CPU, fp32).

For each kind of data (pretraining text cut into packed rows; SFT chat data packed; SFT chat
data padded) a tiny model trains once uninterrupted (the reference) and once as a chain of
`python` processes killed with SIGKILL, each continued with `resume=true`:
  1. killed from outside at a seeded random moment after a seeded random step k,
  2. killed inside the safetensors write of a later checkpoint (its file half written),
  3. killed once every file of a later checkpoint is written, just before the rename that
     publishes it,
  4. run to the end.
After every kill the checkpoints folder holds only complete `step_N` folders plus hidden temp
folders, and `latest_checkpoint` (what resume picks) is the newest complete one. At the end
final/ equals the reference tensor for tensor (`torch.equal`), and metrics.jsonl reads as the
uninterrupted run (same loss, lr, grad norm, epoch position and padding share at every step).
The data files are small, so the runs cross epoch boundaries; the padded SFT run has NEFTune
on, so the torch RNG state must survive the resume too.

The kill points live in tests/train/_killable_run.py (the child process); change SEED to
explore other points.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mistral_train.checkpoint.atomic import TEMP_MARKER
from mistral_train.checkpoint.state import STATE_FILE, latest_checkpoint

SEED = 0
HELPER = Path(__file__).with_name("_killable_run.py")
MAX_STEPS, SAVE_EVERY = 15, 3
SAVES = list(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))  # checkpoints written: 3, 6, ..., 15
COMPARED_METRICS = ("loss", "lr", "grad_norm", "epoch", "padding_share")  # not timings (tokens_per_s)
CHILD_TIMEOUT_S = 300

TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2",
    "trainer.max_seq_len=64", "trainer.batch_size=4", f"trainer.max_steps={MAX_STEPS}",
    "trainer.warmup_steps=2", f"trainer.save_every={SAVE_EVERY}", "trainer.keep_last=2", "trainer.log_every=1",
    "trainer.device=cpu", "trainer.precision=fp32", "trainer.sample_max_new_tokens=1",
    "tracking.progress_bar=false", "tracking.plot=false",
]


def _bundled(name: str) -> Path:
    return Path(str(resources.files("mistral_train") / "resources" / "data" / name))


def _small_corpus(folder: Path) -> Path:
    """24 bundled documents: about 23 rows of 64 tokens, so an epoch is 5 steps of 4 rows (3 epochs in all)."""
    docs = re.split(r"\n\s*\n", _bundled("tiny_corpus.txt").read_text(encoding="utf-8"))[:24]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(doc.strip() for doc in docs) + "\n", encoding="utf-8")
    return path


def _small_chat(folder: Path) -> Path:
    """32 bundled conversations: an epoch is 8 padded batches of 4, or about 2 packed ones."""
    lines = _bundled("tiny_chat.jsonl").read_text(encoding="utf-8").splitlines()[:32]
    path = folder / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _overrides(mode: str, data_dir: Path) -> list[str]:
    if mode == "text":
        return ["recipe=tiny_pretrain", *TINY, f"data.path={_small_corpus(data_dir)}"]
    sft = ["recipe=tiny_sft", *TINY, f"data.path={_small_chat(data_dir)}", "data.eval_path=null", "data.eval_fraction=0.0"]
    if mode == "sft_packed":
        return [*sft, "data.packing=true"]
    # NEFTune draws its noise from torch's global RNG: a resume that lost the RNG state would diverge
    return [*sft, "data.packing=false", "data.neftune_alpha=5.0"]


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MT_TEST_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Child:
    """One `_killable_run.py` process; its stdout and stderr go to a log file."""

    def __init__(self, runs: Path, name: str, label: str, overrides: list[str], resume: bool = False,
                 **env: str) -> None:
        self.log = runs / f"{name}.{label}.log"
        args = [*overrides, f"run.dir={runs}", f"run.name={name}"] + (["resume=true"] if resume else [])
        self.began = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(HELPER), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=_child_env(**env), cwd=HELPER.parents[2])

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])

    def finish(self) -> str:
        """Wait for a clean exit; return the log."""
        code = self.proc.wait(timeout=CHILD_TIMEOUT_S)
        print(f"{self.log.name}: {time.monotonic() - self.began:.1f}s")
        assert code == 0, f"{self.log.name}: exit status {code}\n{self.tail()}"
        return self.log.read_text()

    def expect_killed(self, what: str) -> None:
        code = self.proc.wait(timeout=CHILD_TIMEOUT_S)
        print(f"{self.log.name}: {time.monotonic() - self.began:.1f}s")
        assert code == -signal.SIGKILL, (
            f"{self.log.name}: expected death by SIGKILL {what}, got exit status {code} (a kill point that is "
            f"never reached means the writer no longer goes through the patched code)\n{self.tail()}"
        )

    def kill_after_step(self, metrics: Path, step: int, delay: float) -> None:
        """SIGKILL `delay` seconds after `metrics` shows `step` logged."""
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while step not in _logged_steps(metrics):
            assert self.proc.poll() is None, f"{self.log.name}: exited ({self.proc.returncode}) before step {step}\n{self.tail()}"
            assert time.monotonic() < deadline, f"{self.log.name}: step {step} not logged in {CHILD_TIMEOUT_S}s"
            time.sleep(0.005)
        time.sleep(delay)
        self.proc.send_signal(signal.SIGKILL)
        self.expect_killed(f"{delay:.3f}s after step {step}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    lines = metrics.read_text().split("\n")[:-1]  # the last piece may be a line still being written
    return [json.loads(line).get("step") for line in lines if line]


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"step": row["step"], **{k: row.get(k) for k in COMPARED_METRICS}} for row in rows]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder}: no safetensors files"
    return {key: tensor for file in files for key, tensor in load_file(file).items()}


def _assert_complete(folder: Path) -> None:
    """A published checkpoint: HF config, readable weights and a readable training state."""
    assert (folder / "config.json").is_file(), f"{folder}: no config.json"
    _weights(folder)  # raises on a truncated file
    torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def _check_after_kill(run_dir: Path, killed_write: Optional[int]) -> Optional[int]:
    """Assert the checkpoints folder holds only complete `step_N` folders plus hidden temp
    folders, and that `latest_checkpoint` is the newest complete one; return its step (None: none).

    killed_write: the step whose checkpoint write was killed, if any: it must exist only as
    a hidden temp folder."""
    folder = run_dir / "checkpoints"
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    published = []
    for entry in entries:
        if entry.name.startswith("."):
            assert TEMP_MARKER in entry.name and entry.is_dir(), f"unexpected hidden entry {entry}"
            continue
        match = re.fullmatch(r"step_(\d+)", entry.name)
        assert match and entry.is_dir(), f"unexpected entry {entry} in {folder}"
        _assert_complete(entry)
        published.append(int(match.group(1)))
    if killed_write is not None:
        assert killed_write not in published, f"step_{killed_write} was published although its write was killed"
        temps = [e for e in entries if re.match(rf"^\.+step_{killed_write}\.tmp-", e.name)]
        assert temps, f"no temp folder of step_{killed_write} in {[e.name for e in entries]}: the kill missed the write"
    latest = latest_checkpoint(run_dir)
    expected = folder / f"step_{max(published)}" if published else None
    assert latest == expected, f"latest_checkpoint picked {latest}, newest complete is {expected}"
    return max(published) if published else None


def _expect_resume_from(log: str, run_dir: Path, step: int) -> None:
    where = run_dir / "checkpoints" / f"step_{step}"
    assert str(where) in log, f"the resumed run should say it continued from {where}:\n{log[-2000:]}"


@pytest.mark.parametrize("mode", ["text", "sft_packed", "sft_padded"])
def test_runs_killed_anywhere_resume_to_bit_identical_weights(tmp_path, mode):
    rng = random.Random(f"{SEED}-{mode}")
    overrides = _overrides(mode, tmp_path)
    children: list[Child] = []

    def start(label: str, resume: bool = False, **env: str) -> Child:
        children.append(Child(tmp_path, "cut", label, overrides, resume=resume, **env))
        return children[-1]

    reference = Child(tmp_path, "reference", "full", overrides)  # runs beside the first killed run
    children.append(reference)
    run_dir = tmp_path / "cut"
    # The plan depends on the seed only: the outside kill lands between the log lines of steps
    # k and k + 2 (the child stalls there), so no checkpoint after step k + 1 exists yet. k >= 2 * SAVE_EVERY:
    # the kill may land inside step k's own save (slower than `delay` on a loaded machine), and step
    # k - SAVE_EVERY must then exist for the run to resume from.
    k, delay = rng.randint(2 * SAVE_EVERY, MAX_STEPS - 7), rng.uniform(0.0, 0.3)
    weights_write = rng.choice([s for s in SAVES if k + 1 < s <= MAX_STEPS - SAVE_EVERY])
    rename_write = rng.choice([s for s in SAVES if s > weights_write])
    print(f"{mode}: kill {delay:.3f}s after step {k}, then in the weights write of step_{weights_write}, "
          f"then before the rename of step_{rename_write}")
    try:
        # 1. SIGKILL from outside at a random moment
        start("kill-at-step", MT_TEST_STALL_AFTER_STEP=str(k + 2)).kill_after_step(run_dir / "metrics.jsonl", k, delay)
        assert not (run_dir / "final").exists(), "the run finished before the kill"
        resumed_at = _check_after_kill(run_dir, killed_write=None)
        assert resumed_at is not None and k - SAVE_EVERY <= resumed_at <= k + 1, resumed_at

        # 2. killed inside the safetensors write of a checkpoint the resumed run writes
        child = start("kill-in-weights", resume=True, MT_TEST_KILL_IN_WRITE=f"weights:{weights_write}")
        child.expect_killed(f"inside the weights write of step_{weights_write}")
        _expect_resume_from(child.log.read_text(), run_dir, resumed_at)
        resumed_at = _check_after_kill(run_dir, killed_write=weights_write)
        assert resumed_at == weights_write - SAVE_EVERY
        torn = list((run_dir / "checkpoints").glob(f".*step_{weights_write}.tmp-*/*.safetensors"))
        assert torn, "the killed write left no weights file behind"
        with pytest.raises(SafetensorError):
            load_file(torn[0])  # half a file: what resume must never read

        # 3. killed with every file written, just before the rename that publishes the folder
        child = start("kill-before-rename", resume=True, MT_TEST_KILL_IN_WRITE=f"rename:{rename_write}")
        child.expect_killed(f"before the rename of step_{rename_write}")
        _expect_resume_from(child.log.read_text(), run_dir, resumed_at)
        resumed_at = _check_after_kill(run_dir, killed_write=rename_write)
        assert resumed_at == rename_write - SAVE_EVERY
        unpublished = [t for t in (run_dir / "checkpoints").glob(f".step_{rename_write}.tmp-*") if (t / STATE_FILE).is_file()]
        assert unpublished, "the folder killed before its rename should hold every file, state included"

        # 4. to the end
        child = start("resume-to-end", resume=True)
        _expect_resume_from(child.finish(), run_dir, resumed_at)
        reference.finish()
    finally:
        for child in children:
            child.stop()

    ref_dir = tmp_path / "reference"
    expected, got = _weights(ref_dir / "final"), _weights(run_dir / "final")
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"final weights differ from the uninterrupted run in {different}"
    assert _metrics(run_dir) == _metrics(ref_dir)  # every step once, with the same loss, lr and grad norm
    leftovers = [e.name for e in (run_dir / "checkpoints").iterdir() if e.name.startswith(".")]
    assert not leftovers, f"temp folders of killed writes were not cleared: {leftovers}"
