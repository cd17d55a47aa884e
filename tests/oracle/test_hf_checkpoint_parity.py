"""HF checkpoint folders: transformers -> ours and ours -> transformers, single file and sharded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mistral_train import Mistral

SHARD = "20KB"  # the tiny model is ~90 KB in fp32: several shards and an index


def _auto_class(task: str):
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
        "token_classification": transformers.AutoModelForTokenClassification,
    }[task]


def _hf_load(folder, task="causal_lm", **kw):
    model, info = _auto_class(task).from_pretrained(folder, output_loading_info=True, **kw)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[what], f"transformers loading {folder}: {what} = {info[what]}"
    return model.eval()


def _stored_keys(folder) -> set[str]:
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def _assert_sharded(folder, sharded: bool) -> None:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if sharded:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(files) > 1, f"expected several shards, got {files}"
        assert set(index["weight_map"].values()) == set(files)
        assert set(index["weight_map"]) == _stored_keys(folder)
    else:
        assert files == ["model.safetensors"]
        assert not (folder / "model.safetensors.index.json").exists()


def _assert_same_weights(ours: Mistral, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    got = ours.state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, f"{key}: dtype {got[key].dtype} vs {tensor.dtype}"
        assert torch.equal(got[key], tensor), f"{key}: values differ"


@pytest.fixture
def batch(padded_batch):
    return padded_batch([10, 6, 8], 128, pad_id=0, side="left", seed=1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_folder_loads_with_identical_logits(sharded, tied, tiny, hf_and_ours, batch, tmp_path, max_abs_diff):
    kwargs = tiny(sliding_window=4, tie_word_embeddings=tied)
    reference, hf = hf_and_ours(kwargs)  # `reference`: ours with the weights copied in memory
    hf.save_pretrained(tmp_path, max_shard_size=SHARD if sharded else "5GB")
    _assert_sharded(tmp_path, sharded)
    loaded = Mistral.from_pretrained(tmp_path).eval()
    _assert_same_weights(loaded, reference)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight, "tied weights are not shared after loading"
    ids, mask = batch
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask)
        assert torch.equal(got, reference(ids, attention_mask=mask))
        expected = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert max_abs_diff(got, expected, mask) <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_our_folder_loads_in_transformers_with_identical_logits(sharded, tied, tiny, hf_model, our_model, batch, tmp_path, max_abs_diff):
    kwargs = tiny(sliding_window=4, tie_word_embeddings=tied, rope_theta=1e6)
    ours = our_model(kwargs, seed=2).eval()
    ours.save_pretrained(tmp_path, max_shard_size=SHARD if sharded else "5GB")
    _assert_sharded(tmp_path, sharded)
    if tied:
        assert "lm_head.weight" not in _stored_keys(tmp_path), "tied output head stored twice"
    loaded = _hf_load(tmp_path)
    assert loaded.config.tie_word_embeddings == tied
    assert loaded.config.sliding_window == 4
    assert loaded.config.rope_parameters["rope_theta"] == 1e6
    # The same weights in an HF model built in memory: loading must change nothing.
    twin = hf_model(kwargs)
    twin.load_state_dict(ours.state_dict())
    ids, mask = batch
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(got, twin(input_ids=ids, attention_mask=mask, use_cache=False).logits)
        mine = ours(ids, attention_mask=mask)
    assert max_abs_diff(got, mine, mask) <= 1e-5


def test_bf16_round_trip_is_bit_exact(tiny, hf_model, tmp_path):
    kwargs = tiny(sliding_window=4)
    hf_model(kwargs).save_pretrained(tmp_path / "hf")  # fp32 on disk
    first = Mistral.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    first.save_pretrained(tmp_path / "ours", max_shard_size=SHARD)
    again = Mistral.from_pretrained(tmp_path / "ours")
    saved = first.state_dict()
    for key, tensor in again.state_dict().items():
        assert tensor.dtype == torch.bfloat16, f"{key} reloaded as {tensor.dtype}"
        assert torch.equal(tensor, saved[key]), f"{key} changed in the bf16 round trip"
    assert saved.keys() == again.state_dict().keys()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = _hf_load(tmp_path / "ours", dtype=torch.bfloat16)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(tensor, saved[key]), f"transformers reads {key} differently"


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_classification_head_round_trip(task, tiny, hf_model, tmp_path, padded_batch, max_abs_diff):
    kwargs = tiny(pad_token_id=0, num_labels=3, sliding_window=4)
    hf = hf_model(kwargs, task=task)
    hf.save_pretrained(tmp_path / "hf")
    ours = Mistral.from_pretrained(tmp_path / "hf", task=task).eval()
    assert ours.config.num_labels == 3
    ours.save_pretrained(tmp_path / "ours", max_shard_size=SHARD)
    back = _hf_load(tmp_path / "ours", task=task)
    ids, mask = padded_batch([9, 4, 7], 128, pad_id=0, side="right", seed=3)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(back(input_ids=ids, attention_mask=mask, use_cache=False).logits, expected)
        got = ours(ids, attention_mask=mask)
    where = None if task == "sequence_classification" else mask
    assert max_abs_diff(got, expected, where) <= 1e-5


def test_classification_head_from_causal_lm_folder(tiny, hf_model, tmp_path):
    """Like transformers: the backbone loads, `lm_head` is dropped, `score` starts fresh."""
    kwargs = tiny(pad_token_id=0, num_labels=3)
    hf = hf_model(kwargs)
    hf.save_pretrained(tmp_path)
    ours = Mistral.from_pretrained(tmp_path, task="sequence_classification")
    expected = hf.state_dict()
    for key, tensor in ours.state_dict().items():
        if key.startswith("model."):
            assert torch.equal(tensor, expected[key]), key
    assert ours.score.weight.shape == (3, kwargs["hidden_size"])
    assert not hasattr(ours, "lm_head")
