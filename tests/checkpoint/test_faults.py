"""Faults a checkpoint meets (issue 19 items 1 and 3), each injected, each checked for what must not be lost.

Write faults, in a real tiny fit(): the safetensors writer is replaced by one that writes half of its bytes
and raises OSError(ENOSPC); or the real safetensors or torch.save writer runs under a file size limit
(RLIMIT_FSIZE) smaller than its file, so the kernel refuses a write part-way (EFBIG) and the writer reports
it as it really does (SafetensorError, RuntimeError). Damage: bytes of a published
checkpoint are cut, flipped or removed before a resume. Every resumed run is compared tensor for tensor with
an uninterrupted run of the same config (`reference`, steps 1-4, checkpoints at 2 and 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mistral_train import Mistral, MistralConfig
from mistral_train.adapters import LoraConfig, apply_lora, load_adapter, save_adapter
from mistral_train.adapters.peft_format import load_adapter_weights
from mistral_train.checkpoint import atomic
from mistral_train.cli import main
from mistral_train.checkpoint.integrity import (
    MANIFEST, DamagedCheckpoint, HashingWriter, read_manifest, safetensors_damage, verify_checkpoint,
)
from mistral_train.checkpoint.state import (
    STATE_FILE, estimate_checkpoint_bytes, folder_bytes, latest_checkpoint, write_error,
)
from mistral_train.config import RunConfig
from mistral_train.errors import CheckpointWriteError, ConfigError, FolderError
from mistral_train.model import hf
from mistral_train.train import fit
from mistral_train.train.resume import resolve_resume
from tests._tiny import small_run


def _cfg(root: Path, name: str, **trainer) -> RunConfig:
    """4 steps of a very small model on the bundled corpus, a checkpoint every 2 steps."""
    spec = dict(max_steps=4, max_seq_len=32, batch_size=2, warmup_steps=2, log_every=1, sample_max_new_tokens=1,
                save_every=2, keep_last=5)
    return small_run(root, name, **{**spec, **trainer})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints/step_2, checkpoints/step_4 and final/."""
    return fit(_cfg(tmp_path_factory.mktemp("reference"), "ref"))


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


# --- injected write faults -------------------------------------------------------------------------------

def _fail_weights_write(monkeypatch, calls: set[int], code: int) -> None:
    """The `calls`-th safetensors writes of model/hf.py write half their bytes, then raise OSError(code)."""
    real, count = hf.save_file, itertools.count(1)

    def save_file(tensors, filename, metadata=None):
        if next(count) in calls:
            data = safetensors.torch.save(tensors, metadata=metadata)
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(code, os.strerror(code), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", save_file)


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Files written inside may not grow past `limit` bytes: the kernel refuses the write part-way (EFBIG), as a
    full disk does (ENOSPC), and the real writer reports it in its own way."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _limit_weights_write(monkeypatch, calls: set[int], code: int) -> None:
    """The `calls`-th safetensors writes (4 MB) run under a 1 MB file size limit: safetensors' Rust writer
    fails with SafetensorError "I/O error: File too large (os error 27)"."""
    real, count = hf.save_file, itertools.count(1)

    def save_file(tensors, filename, metadata=None):
        with _file_size_limit(1 << 20) if next(count) in calls else contextlib.nullcontext():
            return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", save_file)


def _limit_state_write(monkeypatch, calls: set[int], code: int) -> None:
    """The `calls`-th training_state.pt writes (8 MB) run under a 1 MB file size limit: torch.save's C++ writer
    turns the failed write into a RuntimeError ("unexpected pos")."""
    real, count = torch.save, itertools.count(1)

    def save(obj, f, *args, **kwargs):
        failing = isinstance(f, HashingWriter) and next(count) in calls
        with _file_size_limit(1 << 20) if failing else contextlib.nullcontext():
            return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("inject, code", [(_fail_weights_write, errno.ENOSPC), (_limit_weights_write, errno.EFBIG),
                                          (_limit_state_write, errno.EFBIG)],
                         ids=["weights-ENOSPC", "weights-kernel-EFBIG", "state-kernel-EFBIG"])
def test_a_failed_write_stops_keeps_the_last_good_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, reference,
                                                                                 inject, code):
    cfg = _cfg(tmp_path, "run", keep_last=1)
    inject(monkeypatch, {2}, code)  # the step-4 checkpoint fails half-way; step_2 was written
    with pytest.raises(CheckpointWriteError) as caught:
        fit(cfg)
    run_dir = tmp_path / "run"
    message, step_2 = str(caught.value), run_dir / "checkpoints" / "step_2"
    assert "\n" not in message
    assert str(run_dir / "checkpoints" / "step_4") in message and os.strerror(code) in message
    # the bytes it needed: the previous checkpoint's files (same model, optimizer and tokenizer)
    assert f"needs about {folder_bytes(step_2):,} bytes (the size of step_2)" in message
    # keep_last=1 did not delete step_2 for a step_4 that never completed; nothing partial is left to pick up
    assert _checkpoints(run_dir) == ["step_2"]
    assert latest_checkpoint(run_dir) == step_2 and verify_checkpoint(step_2)
    _assert_same_weights(step_2, reference / "checkpoints" / "step_2")

    monkeypatch.undo()  # the disk has room again
    fit(dataclasses.replace(cfg, resume="latest"))
    _assert_same_weights(run_dir / "final", reference / "final")
    _assert_same_weights(run_dir / "checkpoints" / "step_4", reference / "checkpoints" / "step_4")
    assert _checkpoints(run_dir) == ["step_4"]
    assert _losses(run_dir) == _losses(reference)  # steps 1-2 from the first process, 3-4 from the resumed one


def test_the_command_line_reports_a_full_disk_as_one_line(tmp_path, monkeypatch, capsys):
    _fail_weights_write(monkeypatch, {1}, errno.ENOSPC)  # the first checkpoint: estimated from the tensors
    status = main(["train", "recipe=tiny_pretrain", f"run.dir={tmp_path}", "run.name=cli", "trainer.max_steps=1",
                   "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
                   "trainer.max_seq_len=32", "trainer.batch_size=2", "tracking.progress_bar=false",
                   "tracking.plot=false"])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"mistral-train: error: {tmp_path / 'cli' / 'checkpoints' / 'step_1'}: checkpoint not "
                               "written (No space left on device): it needs about ")
    assert "bytes (the trained weights plus the optimizer state)" in lines[0]
    assert os.listdir(tmp_path / "cli" / "checkpoints") == []


def test_only_write_failures_become_checkpoint_write_errors():
    """write_error finds the OS error a writer reports in its own type; anything else stays a bug (None)."""
    assert write_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                       ).errno == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from err
    except RuntimeError as wrapped:
        assert write_error(wrapped).errno == errno.EIO
    assert write_error(SafetensorError("invalid shape, data type, or offset for tensor")) is None
    assert write_error(RuntimeError("some bug")) is None and write_error(ValueError("(os error 28)")) is None


def test_save_failure_retry_warns_trains_on_and_saves_at_the_next_save(tmp_path, monkeypatch, reference, capsys):
    _fail_weights_write(monkeypatch, {1}, errno.ENOSPC)  # the step-2 checkpoint fails
    run_dir = fit(_cfg(tmp_path, "run", save_failure="retry"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert str(run_dir / "checkpoints" / "step_2") in warnings[0] and "next save tries again" in warnings[0]
    assert _checkpoints(run_dir) == ["step_4"]  # retried at the next save
    _assert_same_weights(run_dir / "checkpoints" / "step_4", reference / "checkpoints" / "step_4")
    _assert_same_weights(run_dir / "final", reference / "final")


def test_with_retry_a_failed_last_save_still_stops(tmp_path, monkeypatch):
    """The last step's checkpoint has no later save to retry at: losing it silently would lose the run's end."""
    _fail_weights_write(monkeypatch, {2}, errno.ENOSPC)
    with pytest.raises(CheckpointWriteError, match="step_4: checkpoint not written"):
        fit(_cfg(tmp_path, "run", save_failure="retry"))
    assert _checkpoints(tmp_path / "run") == ["step_2"]


def test_an_unknown_save_failure_mode_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.save_failure=ignore is unknown; expected one of stop, retry"):
        fit(_cfg(tmp_path, "run", save_failure="ignore"))
    assert not (tmp_path / "run").exists()


def test_the_first_checkpoint_estimate_is_weights_plus_optimizer_state_by_hand(tmp_path):
    """With no earlier checkpoint the estimate is the tensors to write: Adam keeps exp_avg and exp_avg_sq (the
    parameter's bytes each) and a 4-byte step per parameter; an adapter-like run with a frozen part writes
    only the trained tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    trained = [model[0].bias, model[1].weight, model[1].bias]
    param_bytes = sum(p.numel() * 4 for p in trained)
    needed, how = estimate_checkpoint_bytes(tmp_path, model, optimizer)
    assert needed == param_bytes + 2 * param_bytes + 4 * len(trained)
    assert how == "the trained weights plus the optimizer state"


def test_a_failed_publish_puts_the_old_folder_back(tmp_path, monkeypatch):
    """atomic_directory moves an existing folder aside before the rename; if that rename fails (EIO), the old
    folder must come back under its name rather than stay hidden where a prune would delete it."""
    target = tmp_path / "final"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "v").write_text("old")
    real, count = os.replace, itertools.count(1)

    def replace(src, dst):
        if next(count) == 2:  # 1: old aside; 2: the new folder into place
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "v").write_text("new")
    assert (target / "v").read_text() == "old"
    assert os.listdir(tmp_path) == ["final"]


# --- integrity: manifests, damaged checkpoints ----------------------------------------------------------

def test_the_manifest_records_every_file_with_its_size_and_checksum(reference):
    folder = reference / "checkpoints" / "step_2"
    files = read_manifest(folder)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(files) == on_disk and {STATE_FILE, "model.safetensors", "config.json"} <= on_disk
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "digest": hashlib.sha256(data).hexdigest()}, name


def _truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:-100])
    return "truncated"


def _flip_a_bit(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return "altered since it was written"


def _delete(path: Path) -> str:
    path.unlink()
    return "missing"


def _copy_checkpoints(reference: Path, run_dir: Path, steps=(2, 4)) -> Path:
    for step in steps:
        shutil.copytree(reference / "checkpoints" / f"step_{step}", run_dir / "checkpoints" / f"step_{step}")
    return run_dir


@pytest.mark.parametrize("damage, name", [(_truncate, "model.safetensors"), (_flip_a_bit, STATE_FILE),
                                          (_delete, "tokenizer.json"), (_flip_a_bit, "model.safetensors")])
def test_a_damaged_file_is_named_latest_falls_back_and_an_explicit_path_is_an_error(tmp_path, reference, capsys,
                                                                                   damage, name):
    run_dir = _copy_checkpoints(reference, tmp_path / "run")
    damaged = run_dir / "checkpoints" / "step_4"
    kind = damage(damaged / name)
    with pytest.raises(DamagedCheckpoint, match=f"step_4/{name}: {kind}"):
        verify_checkpoint(damaged)
    with pytest.raises(FolderError, match=f"step_4/{name}: {kind}"):  # named explicitly: no silent fallback
        resolve_resume(str(damaged), run_dir)
    capsys.readouterr()
    assert resolve_resume("latest", run_dir) == run_dir / "checkpoints" / "step_2"
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and f"step_4/{name}: {kind}" in said[0]
    assert said[0].endswith(f"falling back to {run_dir / 'checkpoints' / 'step_2'}")


def test_a_damaged_manifest_is_named(tmp_path, reference):
    run_dir = _copy_checkpoints(reference, tmp_path / "run", steps=(4,))
    manifest = run_dir / "checkpoints" / "step_4" / MANIFEST
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(DamagedCheckpoint, match=f"{manifest}: damaged manifest"):
        resolve_resume("latest", run_dir)


def test_resume_latest_past_a_truncated_checkpoint_continues_exactly(tmp_path, reference, capsys):
    run_dir = _copy_checkpoints(reference, tmp_path / "run")
    _truncate(run_dir / "checkpoints" / "step_4" / "model.safetensors")
    fit(dataclasses.replace(_cfg(tmp_path, "run"), resume="latest"))
    out = capsys.readouterr().out
    assert "step_4/model.safetensors: truncated" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'} at step 2" in out
    _assert_same_weights(run_dir / "final", reference / "final")
    assert verify_checkpoint(run_dir / "checkpoints" / "step_4")  # rewritten whole over the damaged one


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, reference):
    run_dir = _copy_checkpoints(reference, tmp_path / "run")
    _truncate(run_dir / "checkpoints" / "step_2" / STATE_FILE)
    _delete(run_dir / "checkpoints" / "step_4" / "config.json")
    with pytest.raises(DamagedCheckpoint, match="every checkpoint .* damaged: .*step_2/training_state.pt: truncated"):
        resolve_resume("latest", run_dir)


def test_a_checkpoint_written_before_manifests_still_resumes(tmp_path, reference):
    run_dir = _copy_checkpoints(reference, tmp_path / "run", steps=(2,))
    (run_dir / "checkpoints" / "step_2" / MANIFEST).unlink()
    assert verify_checkpoint(run_dir / "checkpoints" / "step_2") is False  # nothing to check against
    fit(dataclasses.replace(_cfg(tmp_path, "run"), resume="latest"))
    _assert_same_weights(run_dir / "final", reference / "final")


# --- damaged HF model folders ------------------------------------------------------------------------------

def _hf_folder(tmp_path: Path) -> tuple[Path, dict]:
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path / "hf"
    Mistral(config).save_pretrained(folder)
    data = (folder / hf.SINGLE_FILE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return folder, json.loads(data[8 : 8 + n])


def test_loading_a_truncated_hf_folder_names_the_file_and_the_tensor_cut(tmp_path):
    folder, header = _hf_folder(tmp_path)
    weights = folder / hf.SINGLE_FILE
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    _truncate(weights)
    with pytest.raises(FolderError) as caught:
        Mistral.from_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{weights}: not a readable safetensors file: tensor `{last}`: its bytes")
    assert message.endswith("the file is truncated")


def test_loading_an_hf_file_whose_header_lies_about_a_shape_names_the_tensor(tmp_path):
    folder, header = _hf_folder(tmp_path)
    weights = folder / hf.SINGLE_FILE
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    victim = "model.layers.0.mlp.down_proj.weight"
    shape = header[victim]["shape"]
    header[victim]["shape"] = [shape[0] + 1, shape[1]]  # claims a row its offsets do not hold
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    with pytest.raises(FolderError) as caught:
        Mistral.from_pretrained(folder)
    message = str(caught.value)
    start, end = header[victim]["data_offsets"]
    assert "\n" not in message
    assert message.startswith(f"{weights}: not a readable safetensors file: tensor `{victim}`: the header says "
                              f"F32 [{shape[0] + 1}, {shape[1]}] ({(shape[0] + 1) * shape[1] * 4} bytes) but gives it "
                              f"{end - start} bytes")


def test_loading_a_truncated_adapter_names_the_file_and_the_tensor(tmp_path):
    """A checkpoint of an adapter run loads its PEFT file with load_adapter_weights; a fresh run with load_adapter."""
    model, _ = _hf_folder(tmp_path)
    model = apply_lora(Mistral.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = save_adapter(model, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    _truncate(weights)
    for load in (load_adapter, load_adapter_weights):
        tensor = r"tensor `base_model\.model\.model\.layers\.0\.self_attn\.\w_proj\.lora_\w\.weight`"
        cut = r"its bytes \d+-\d+ run past the end of the data \(\d+ bytes\): the file is truncated$"
        expected = rf"^{weights}: not a readable (adapter|safetensors) file: {tensor}: {cut}"
        with pytest.raises(ValueError, match=expected):
            load(model, folder)


def test_safetensors_damage_on_a_file_too_short_for_its_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00")
    assert safetensors_damage(path) == "2 bytes, too short for a safetensors header (truncated?)"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    assert safetensors_damage(path).startswith("its header claims 1000 bytes but the file has 10")
