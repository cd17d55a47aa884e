"""Endless data (issue 19 item 5): streaming a file of 10^6 rows keeps resident memory flat and resumes
mid-stream exactly; a training file that changes between a run and its resume is refused unless
data.changed_data=allow (data/fingerprint.py, checked by train/resume.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_train.config import DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.data import fingerprint as fp
from mistral_train.data.sources import bundled_chat_path
from mistral_train.errors import ConfigError, DataError
from mistral_train.train import fit

# Run in a fresh interpreter so that the measurement holds only what reading the data costs. VmHWM (the
# peak) rather than VmRSS: a reader that loads the whole file and frees it again still shows.
_MEASURE = r"""
import json, sys
from itertools import islice
from pathlib import Path

import torch

from mistral_train.config import DataSpec, RunConfig, TrainerSpec
from mistral_train.data.sources import load_rows
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from mistral_train.train.run_data import read_data

def vm(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

path, mode = sys.argv[1], sys.argv[2]
tokenizer = load_tokenizer(bundled_tokenizer_path("v1"))
spec = DataSpec(path=path, format="text", streaming=mode == "stream", stream_buffer=64)
cfg = RunConfig(data=spec, trainer=TrainerSpec(max_seq_len=32, batch_size=4, seed=1))
base = vm("VmRSS")
if mode == "whole":  # the control: what holding the rows in memory costs
    rows = list(load_rows(spec))
    print(json.dumps({"growth": vm("VmHWM") - base}))
    sys.exit()
data = read_data(cfg, tokenizer)
for _ in islice(data.train, 200):  # about 40 buffers of 64 rows
    pass
growth = vm("VmHWM") - base
state = data.train.state_dict()
expected = list(islice(data.train, 3))
again = read_data(cfg, tokenizer).train
again.load_state_dict(state)  # skips the rows already read, rebuilds the buffer, serves the next batch
same = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
           for a, b in zip(expected, islice(again, 3)))
print(json.dumps({"growth": growth, "rows_read": state["rows_read"], "served": state["served"], "same": same}))
"""
MIB = 2**20


def _text_rows(path: Path, n: int) -> Path:
    path.write_text("".join('{"text": "row %d says hello %d"}\n' % (i, 7 * i) for i in range(n)))
    return path


def _measure(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streaming_a_million_rows_keeps_memory_flat_and_resumes_mid_stream(tmp_path):
    small, large = _text_rows(tmp_path / "small.jsonl", 10**5), _text_rows(tmp_path / "large.jsonl", 10**6)
    margin = 12 * MIB
    held = _measure(small, "whole")["growth"]
    # the control: holding even the small file's rows costs more than the margin (the large file 10x that),
    # so a streaming path that held the file would fail below
    assert held > 2 * margin, held
    at_small, at_large = _measure(small, "stream"), _measure(large, "stream")
    assert at_large["growth"] < at_small["growth"] + margin, (at_small, at_large)
    assert at_large["growth"] < held  # a million streamed rows cost less than 10^5 held ones
    # resumed mid-buffer, 200 batches into the file: the same next batches as continuing
    assert at_large["rows_read"] > 1000 and at_large["served"] > 0 and at_large["same"], at_large


def _chat(path: Path, n: int = 8) -> Path:
    path.write_text("\n".join(bundled_chat_path().read_text().splitlines()[:n]) + "\n")
    return path


def _run(tmp_path: Path, data: Path, max_steps: int, **changes) -> RunConfig:
    model = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    trainer = TrainerSpec(objective="sft", max_steps=max_steps, max_seq_len=32, batch_size=2, warmup_steps=1,
                          save_every=2, sample_max_new_tokens=2)
    cfg = RunConfig(model=model, trainer=trainer, run=RunSpec(name="run", dir=str(tmp_path)),
                    data=DataSpec(path=str(data), format="messages", streaming=True, stream_buffer=5),
                    tracking=TrackingSpec(progress_bar=False, plot=False))
    return dataclasses.replace(cfg, **changes)


def test_a_data_file_changed_before_resume_is_refused_naming_it_unless_allowed(tmp_path, capsys):
    data = _chat(tmp_path / "chat.jsonl")
    fit(_run(tmp_path, data, 2))
    original = data.read_bytes()

    data.write_bytes(original + original.splitlines(keepends=True)[0])  # a row appended
    with pytest.raises(DataError, match=rf"step_2: the training data changed since this checkpoint: {data} "
                                        rf"changed size: {len(original)} bytes at the checkpoint, \d+ now;"
                                        r".*changed_data=allow"):
        fit(_run(tmp_path, data, 4, resume="latest"))

    edited = original.replace(b"fifteen", b"sixteen", 1)  # same size, other content
    assert len(edited) == len(original) and edited != original
    data.write_bytes(edited)
    with pytest.raises(DataError, match=rf"{data} changed content \(whole file differs; same size\)"):
        fit(_run(tmp_path, data, 4, resume="latest"))

    capsys.readouterr()
    cfg = _run(tmp_path, data, 4, resume="latest")
    cfg.data.changed_data = "allow"
    fit(cfg)  # resumes with one warning line and trains on
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'run' / 'checkpoints' / 'step_2'}: the training data changed since this " \
           f"checkpoint ({data} changed content" in out
    assert "resumed from" in out and (tmp_path / "run" / "checkpoints" / "step_4").is_dir()


def test_a_copy_with_a_new_mtime_resumes_and_an_unknown_policy_is_a_config_error(tmp_path, capsys):
    data = _chat(tmp_path / "chat.jsonl")
    fit(_run(tmp_path, data, 2))
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a copy to another machine leaves it
    fit(_run(tmp_path, data, 3, resume="latest"))
    assert f"{data}: modified time moved but size and hash are the same; taken as unchanged" in capsys.readouterr().out
    cfg = _run(tmp_path, data, 4, resume="latest")
    cfg.data.changed_data = "ignore"
    with pytest.raises(ConfigError, match="data.changed_data='ignore': expected one of refuse, allow"):
        fit(cfg)


def test_identity_of_a_large_file_hashes_its_ends_and_a_folder_lists_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 3 * MIB)  # files above it: first and last MiB only
    big = tmp_path / "data" / "big.jsonl"
    big.parent.mkdir()
    body = bytearray(b"x" * (4 * MIB))
    big.write_bytes(body)
    (tmp_path / "data" / "small.jsonl").write_text("{}\n")
    before = fp.fingerprint([str(big.parent)])
    assert sorted(before) == [str(big), str(tmp_path / "data" / "small.jsonl")]
    assert before[str(big)]["hashed"] == "first and last MiB"

    body[-10] = ord("y")  # inside the last MiB: seen
    big.write_bytes(body)
    found, _ = fp.changes(before, fp.fingerprint([str(big.parent)]))
    assert found == [f"{big} changed content (first and last MiB differs; same size)"]

    body[-10], body[2 * MIB] = ord("x"), ord("y")  # in the middle of a large file: the documented blind spot
    big.write_bytes(body)
    assert fp.changes(before, fp.fingerprint([str(big.parent)]))[0] == []

    (tmp_path / "data" / "small.jsonl").unlink()
    (tmp_path / "data" / "new.jsonl").write_text('{"a": 1}\n')
    found, _ = fp.changes(before, fp.fingerprint([str(big.parent)]))
    assert found == [f"{tmp_path / 'data' / 'new.jsonl'} was added", f"{tmp_path / 'data' / 'small.jsonl'} is gone"]


def test_the_same_files_under_another_path_are_a_note_not_a_change(tmp_path):
    first = tmp_path / "a" / "chat.jsonl"
    first.parent.mkdir()
    _chat(first)
    before = fp.fingerprint([str(first.parent)])
    moved = tmp_path / "b"
    first.parent.rename(moved)  # resumed from another directory, or the data moved
    found, notes = fp.changes(before, fp.fingerprint([str(moved)]))
    assert found == [] and notes == [f"the training files are now {moved / 'chat.jsonl'} (were {first}): same sizes "
                                     "and contents; taken as unchanged"]
    (moved / "chat.jsonl").write_text("{}\n")  # moved and changed: both paths named
    found, _ = fp.changes(before, fp.fingerprint([str(moved)]))
    assert found == [f"{first} is gone", f"{moved / 'chat.jsonl'} was added"]
