"""The dense Mistral family against its transformers classes: logits, every gradient, cached greedy decoding and
HF folders both ways. Classes: Mistral with Nemo's head_dim != hidden / heads, Ministral (interleaved and all-sliding
layers), Ministral 3 (YaRN with the llama-4 query scale; tied embeddings with a window on every layer).

Each class (FAMILY) is a transformers config of its own class, read by us from the dict transformers writes
(`to_json_string`), so the `model_type` entry of model/config.py decides our variant. Weights are order-one
random (tests/conftest.py::randomize_) and copied with a strict `load_state_dict`, so any difference is maths.
Every input is longer than the sliding window and than Ministral 3's original_max_position_embeddings (ORIGINAL),
so YaRN's interpolated frequencies and the query scale past it are both exercised; padded query rows are undefined
in both, so compared on real tokens only. fp32 throughout.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

import pytest
import torch
import transformers

from mistral_train import Mistral, MistralConfig
from mistral_train.generate import generate
from mistral_train.model.kv_cache import KVCache
from safetensors import safe_open
from tests.conftest import randomize_, tiny_kwargs

TOL = 1e-5
WINDOW = 4
ORIGINAL = 8  # Ministral 3's original_max_position_embeddings here: inputs reach 11, decoding 18
S, F = "sliding_attention", "full_attention"


def _all_full(config: MistralConfig) -> MistralConfig:
    return dataclasses.replace(config, layer_types=[F] * config.num_hidden_layers)


def _plain_rope(config: MistralConfig) -> MistralConfig:
    """What loading Ministral 3 as plain Mistral computed: default rotary, no query scale."""
    return dataclasses.replace(config, rope_type="default", rope_options={}, query_scaling=None, model_type="mistral")


def _ministral3(rope: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    config = tiny_kwargs(head_dim=16, rope_parameters={"rope_theta": 1e6, **rope}, **kwargs)
    del config["rope_theta"]
    return config


@dataclasses.dataclass(frozen=True)
class Case:
    hf_config: type  # transformers' config class
    hf_model: type  # transformers' causal-LM class
    kwargs: dict[str, Any]  # transformers' config keywords
    rolling: bool  # whether decoding may use a window-sized rolling cache (every layer slides)
    plain: Optional[Callable[[MistralConfig], MistralConfig]] = None  # the same weights without the variant's maths


FAMILY = {
    # Mistral-Nemo / Small / Codestral shapes: head_dim 16 != hidden 48 / 4 heads, no window, theta 1e6.
    "mistral_nemo_head_dim": Case(transformers.MistralConfig, transformers.MistralForCausalLM, tiny_kwargs(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
        rope_theta=1e6), rolling=False),
    # Ministral-8B-2410: full and sliding layers interleaved.
    "ministral_interleaved": Case(transformers.MinistralConfig, transformers.MinistralForCausalLM, tiny_kwargs(
        num_hidden_layers=4, head_dim=8, sliding_window=WINDOW, layer_types=[S, F, S, F]), rolling=False,
        plain=_all_full),
    # A ministral file without `layer_types`: transformers makes every layer slide.
    "ministral_all_sliding": Case(transformers.MinistralConfig, transformers.MinistralForCausalLM, tiny_kwargs(
        num_hidden_layers=3, head_dim=8, sliding_window=WINDOW), rolling=True, plain=_all_full),
    # Ministral 3 8B/14B-like: YaRN (attention factor from mscale / mscale_all_dim) and the llama-4 query scale.
    "ministral3_yarn_llama4": Case(transformers.Ministral3Config, transformers.Ministral3ForCausalLM, _ministral3(dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, beta_fast=8.0, beta_slow=0.5,
        mscale=1.3, mscale_all_dim=0.7, llama_4_scaling_beta=0.4, max_position_embeddings=512),
        sliding_window=None, pad_token_id=None), rolling=False, plain=_plain_rope),
    # Ministral 3 3B-like: tied embeddings; here also a given attention factor, no truncation and a window on
    # every layer (Ministral 3 applies `sliding_window` to all layers, so decoding may roll).
    "ministral3_tied": Case(transformers.Ministral3Config, transformers.Ministral3ForCausalLM, _ministral3(dict(
        rope_type="yarn", factor=8.0, original_max_position_embeddings=ORIGINAL, attention_factor=1.25, truncate=False,
        llama_4_scaling_beta=0.3), tie_word_embeddings=True, sliding_window=WINDOW, pad_token_id=None),
        rolling=True, plain=_plain_rope),
}
NAMES = list(FAMILY)
LENGTHS = [11, 7, 9]  # each > WINDOW
PACKED = [[5, 6], [11], [3, 4, 4]]  # documents restart positions; each row sums to 11


def _pair(name: str, seed: int = 0) -> tuple[Mistral, torch.nn.Module]:
    """(ours, transformers') with the same weights, both in eval mode."""
    case = FAMILY[name]
    hf_config = case.hf_config(**case.kwargs)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = randomize_(case.hf_model(hf_config), seed).eval()
    ours = Mistral(MistralConfig.from_hf_dict(json.loads(hf_config.to_json_string()), source=name)).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def _inputs(kind: str, random_ids, padded_batch) -> tuple[torch.Tensor, Any, Any, torch.Tensor]:
    """(input_ids, attention_mask | None, position_ids | None, real tokens (B, T))."""
    if kind == "left_pad":
        ids, mask = padded_batch(LENGTHS, 128, pad_id=0, side="left", seed=2)
        return ids, mask, None, mask.bool()
    ids = random_ids(len(LENGTHS), max(LENGTHS), 128, seed=1)
    positions = None
    if kind == "packed":
        positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED])
    return ids, None, positions, torch.ones(ids.shape, dtype=torch.bool)


def _labels(ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """ids with a quarter of the tokens ignored, and every token predicted from padding: a padded query row is
    undefined (transformers and we fill it differently), so no loss may read it."""
    gen = torch.Generator().manual_seed(3)
    labels = ids.clone()
    after_pad = torch.nn.functional.pad(~real[:, :-1], (1, 0), value=False)
    labels[(torch.rand(ids.shape, generator=gen) < 0.25) | ~real | after_pad] = -100
    return labels


@pytest.mark.parametrize("kind", ["plain", "left_pad", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, kind, random_ids, padded_batch, max_abs_diff):
    ours, hf = _pair(name)
    ids, mask, positions, real = _inputs(kind, random_ids, padded_batch)
    with torch.no_grad():
        # use_cache=False: transformers finds packed documents only without a cache.
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        got = ours(ids, attention_mask=mask, position_ids=positions)
    assert max_abs_diff(got, expected, real) <= TOL, f"{name}/{kind}: ours vs transformers"
    plain = FAMILY[name].plain
    if plain is not None:
        # Not vacuous: the same weights without the variant's maths (all layers full; no YaRN nor query scale:
        # Ministral 3 loaded as plain Mistral) give other logits on these lengths.
        other_model = Mistral(plain(ours.config)).eval()
        other_model.load_state_dict(ours.state_dict())
        with torch.no_grad():
            other = other_model(ids, attention_mask=mask, position_ids=positions)
        assert max_abs_diff(other, expected, real) > 1e-3, f"{name}/{kind}: the variant made no difference"


@pytest.mark.parametrize("kind", ["left_pad", "packed"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_every_gradient_match_transformers(name, kind, random_ids, padded_batch):
    ours, hf = _pair(name)
    ours.train(), hf.train()  # dropout is 0: train mode must not change the maths
    ids, mask, positions, real = _inputs(kind, random_ids, padded_batch)
    labels = _labels(ids, real)
    expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, use_cache=False).loss
    got = ours(ids, attention_mask=mask, position_ids=positions, labels=labels)
    expected.backward()
    got.backward()
    got, expected = got.detach(), expected.detach()
    assert abs(float(got) - float(expected)) <= TOL, f"{name}/{kind}: loss {float(got)} vs {float(expected)}"
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert mine.keys() == theirs.keys()
    for key, p in theirs.items():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, f"{key}: transformers' gradient is zero"
        diff = float((mine[key].grad - p.grad).abs().max())
        assert diff <= TOL, f"{name}/{kind}: `{key}` gradient differs by {diff:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_cached_greedy_decoding_past_the_window_equals_transformers_generate(name, padded_batch, max_abs_diff):
    ours, hf = _pair(name)
    ids, mask = padded_batch([6, 3], 128, pad_id=0, side="left", seed=4)
    new = 3 * WINDOW  # decoding runs well past the window and past ORIGINAL
    cache = KVCache.for_model(ours.config, 2, ids.shape[1] + new, torch.float32, "cpu")
    assert cache.rolling == FAMILY[name].rolling, "a rolling cache only where every layer slides"
    if not cache.rolling:
        assert cache.capacity == ids.shape[1] + new
    hf.generation_config.eos_token_id = None  # run every step in both
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True, output_logits=True)
    got, step_logits = generate(ours, ids, new, attention_mask=mask, stop_at_eos=False, return_logits=True)
    assert torch.equal(got, expected.sequences), f"{name}: greedy tokens differ from transformers' generate"
    for step, (mine, theirs) in enumerate(zip(step_logits, expected.logits)):
        assert max_abs_diff(mine, theirs) <= TOL, f"{name}: step {step} logits differ"


def _hf_load(folder) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_folders_round_trip_as_the_same_class(name, tmp_path, padded_batch, max_abs_diff):
    """ours -> save -> transformers loads its own class with equal logits; transformers' folder -> ours, equal."""
    ours, hf = _pair(name)
    ids, mask = padded_batch(LENGTHS, 128, pad_id=0, side="left", seed=5)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = _hf_load(tmp_path / "ours")
    assert type(theirs) is FAMILY[name].hf_model
    assert theirs.config.to_dict().get("layer_types") == hf.config.to_dict().get("layer_types")
    assert theirs.config.head_dim == hf.config.head_dim
    assert theirs.config.rope_parameters == hf.config.rope_parameters
    assert theirs.config.tie_word_embeddings == hf.config.tie_word_embeddings
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as f:
        # a tied checkpoint stores the embedding once, as transformers writes it
        assert ("lm_head.weight" in f.keys()) == (not hf.config.tie_word_embeddings)
    hf.save_pretrained(tmp_path / "hf")
    loaded = Mistral.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config == ours.config
    if hf.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert max_abs_diff(theirs(input_ids=ids, attention_mask=mask).logits, expected, mask) <= TOL
        assert max_abs_diff(loaded(ids, attention_mask=mask), expected, mask) <= TOL
