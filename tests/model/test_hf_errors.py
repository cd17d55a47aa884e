"""HF checkpoint I/O fails loudly, naming the file and key, and never leaves half a folder."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mistral_train
from mistral_train import Mistral, MistralConfig
from mistral_train.model import hf as hf_io

KWARGS = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, sliding_window=None)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A valid single-file checkpoint folder written by us."""
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    Mistral(MistralConfig(**KWARGS)).save_pretrained(folder)
    return folder


_DELETE = object()  # marks a key to remove in _edit_config


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del d[key]
        else:
            d[key] = value
    path.write_text(json.dumps(d))
    return path


def _edit_weights(folder: Path, edit) -> Path:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_config_missing_required_key(saved):
    path = _edit_config(saved, hidden_size=_DELETE)
    with pytest.raises((ValueError, KeyError)) as err:
        Mistral.from_pretrained(saved)
    assert str(path) in str(err.value) and "hidden_size" in str(err.value)


@pytest.mark.parametrize("key,value", [("hidden_size", "abc"), ("num_hidden_layers", 2.5), ("rms_norm_eps", "small"),
                                       ("tie_word_embeddings", "yes"), ("num_key_value_heads", True)])
def test_config_wrong_type(saved, key, value):
    path = _edit_config(saved, **{key: value})
    with pytest.raises(ValueError) as err:
        Mistral.from_pretrained(saved)
    assert str(path) in str(err.value) and key in str(err.value), str(err.value)


def test_config_not_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(saved / "config.json"))):
        Mistral.from_pretrained(saved)


def test_missing_tensor_is_named(saved):
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_weights(saved, lambda t: t.pop(key))
    with pytest.raises(KeyError, match=re.escape(key)):
        Mistral.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    key = "model.layers.7.self_attn.q_proj.weight"
    _edit_weights(saved, lambda t: t.__setitem__(key, torch.zeros(32, 32)))
    with pytest.raises(KeyError, match=re.escape(key)):
        Mistral.from_pretrained(saved)


def _shape_pattern(shape) -> str:
    """A shape written as a tuple, list or torch.Size."""
    dims = r",\s*".join(str(d) for d in shape)
    return rf"[\(\[]{dims}[\)\]]"


def test_wrong_shape_names_key_and_both_shapes(saved):
    key = "model.layers.0.self_attn.k_proj.weight"  # (2 kv heads * 8, 32) = (16, 32)
    path = _edit_weights(saved, lambda t: t.__setitem__(key, torch.zeros(24, 32)))
    with pytest.raises(ValueError) as err:
        Mistral.from_pretrained(saved)
    message = str(err.value)
    assert key in message and str(path) in message
    assert re.search(_shape_pattern((24, 32)), message), message
    assert re.search(_shape_pattern((16, 32)), message), message


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the tensors, and inside the header
def test_truncated_safetensors_names_the_file(saved, keep):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises((ValueError, OSError)) as err:
        Mistral.from_pretrained(saved)
    assert str(path) in str(err.value), str(err.value)


def test_index_naming_absent_shard(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    Mistral(MistralConfig(**KWARGS)).save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shards[-1].name)):
        Mistral.from_pretrained(folder)


def test_pickled_weights_only_are_refused(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Mistral.from_pretrained(saved)


def _failing_writer(real, fail_on_call: int):
    calls = []

    def writer(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on_call:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    return writer


@pytest.mark.parametrize("shard_size", ["5GB", "20KB"])
def test_failed_save_leaves_no_folder(tmp_path, monkeypatch, shard_size):
    torch.manual_seed(0)
    model = Mistral(MistralConfig(**KWARGS))
    # Sharded: fail on the third shard, after two were written into the temp folder.
    fail_on = 1 if shard_size == "5GB" else 3
    monkeypatch.setattr(hf_io, "save_file", _failing_writer(hf_io.save_file, fail_on))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out", max_shard_size=shard_size)
    assert os.listdir(tmp_path) == [], f"left behind: {os.listdir(tmp_path)}"


def test_failed_save_keeps_previous_folder(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    torch.manual_seed(1)
    model = Mistral(MistralConfig(**KWARGS))
    monkeypatch.setattr(hf_io, "save_file", _failing_writer(hf_io.save_file, 1))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert os.listdir(saved.parent) == [saved.name]
    Mistral.from_pretrained(saved)  # still loads


def _unsafe_loads(source: str) -> list[int]:
    """Lines calling torch.load without weights_only=True, or pickle.load(s)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if owner == "torch" and node.func.attr == "load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                bad.append(node.lineno)
        if owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads"):
            bad.append(node.lineno)
    return bad


def test_scanner_finds_unsafe_load():
    assert _unsafe_loads("import torch\nx = torch.load(f)\ny = torch.load(f, weights_only=True)\n") == [2]
    assert _unsafe_loads("torch.load(f, weights_only=False)\npickle.loads(b)\n") == [1, 2]


def test_package_never_unpickles():
    root = Path(mistral_train.__file__).parent
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        lines = _unsafe_loads(path.read_text())
        if lines:
            offenders[str(path.relative_to(root))] = lines
    assert not offenders, f"unsafe loads (use safetensors or torch.load(weights_only=True)): {offenders}"
