"""Atomic folder writes: a folder appears complete or not at all."""

import os

import pytest

from mistral_train.checkpoint.atomic import atomic_directory, remove_stale_temps
from mistral_train.checkpoint.state import latest_checkpoint, list_checkpoints


def test_success_moves_the_folder_into_place(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        (tmp / "a.txt").write_text("hello")
        assert not target.exists()  # nothing under the final name while writing
    assert (target / "a.txt").read_text() == "hello"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("boom")
    assert (target / "v").read_text() == "1"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_failure_on_a_new_target_leaves_no_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "sub" / "ckpt") as tmp:
            (tmp / "x").write_bytes(b"0" * 10)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "sub") == []


def test_overwrite_replaces_contents(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "old").write_text("x")
    with atomic_directory(target) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(os.listdir(target)) == ["new"]
    assert os.listdir(tmp_path) == ["final"]


def test_killed_writer_temp_is_not_a_checkpoint(tmp_path):
    """Simulate a process killed mid-write: its temp folder must never be listed, and
    remove_stale_temps clears it."""
    checkpoints = tmp_path / "checkpoints"
    done = checkpoints / "step_5"
    done.mkdir(parents=True)
    (done / "training_state.pt").write_bytes(b"")
    stale = checkpoints / ".step_10.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "training_state.pt").write_bytes(b"")
    (checkpoints / "step_7").mkdir()  # a folder without training state is not a checkpoint either
    assert [n for n, _ in list_checkpoints(tmp_path)] == [5]
    assert latest_checkpoint(tmp_path) == done
    assert remove_stale_temps(checkpoints) == [stale]
    assert sorted(os.listdir(checkpoints)) == ["step_5", "step_7"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_published_files_follow_the_umask_whatever_mode_the_writer_chose(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_directory(tmp_path / "ckpt") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            for path in (tmp / "private.bin", tmp / "sub" / "open.txt"):
                path.write_bytes(b"x")
            os.chmod(tmp / "private.bin", 0o600)  # as safetensors' save_file leaves its files
            os.chmod(tmp / "sub" / "open.txt", 0o666)
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    target = tmp_path / "ckpt"
    assert [mode(target / "private.bin"), mode(target / "sub" / "open.txt")] == [0o666 & ~mask] * 2
    assert [mode(target), mode(target / "sub")] == [0o777 & ~mask] * 2
