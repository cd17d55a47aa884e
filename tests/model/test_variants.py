"""The variant seam of model/config.py: per-layer attention kinds read by the blocks (against transformers'
Ministral, which has them), a model_type entry as the only thing a new variant maps, and one derivation of
the architecture from a run's ModelSpec shared by model building and `plan`."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from mistral_train import Mistral, MistralConfig
from mistral_train.config import ModelSpec
from mistral_train.generate import generate
from mistral_train.model import config as model_config
from mistral_train.plan import model_shape
from mistral_train.train.model_setup import build_model
from tests.conftest import randomize_

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 3  # below every sequence length used here, so the kinds differ
TOL = 1e-5


def _ministral_pair(tiny, layer_types=LAYER_TYPES):
    """(ours, transformers' MinistralForCausalLM) with the same weights; ours read through the `ministral` entry of
    MODEL_TYPES."""
    hf_config = transformers.MinistralConfig(**tiny(num_hidden_layers=3, sliding_window=WINDOW, head_dim=8),
                                          layer_types=layer_types)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = randomize_(transformers.MinistralForCausalLM(hf_config), seed=0).eval()
    ours = Mistral(MistralConfig.from_hf_dict(hf_config.to_dict(), source="ministral")).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


@pytest.mark.parametrize("case", ["plain", "left_pad", "packed"])
def test_per_layer_attention_kinds_match_transformers_ministral(case, tiny, random_ids, padded_batch, max_abs_diff):
    ours, hf = _ministral_pair(tiny)
    assert [ours.config.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
    mask = positions = None
    if case == "left_pad":
        ids, mask = padded_batch([9, 5, 7], 128, pad_id=0, side="left", seed=2)
    else:
        ids = random_ids(3, 10, 128, seed=1)
        if case == "packed":
            positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([4, 6], [10], [5, 5])])
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        got = ours(ids, attention_mask=mask, position_ids=positions)
        # not vacuous: every layer sliding (Mistral's rule) gives other logits on these lengths
        all_sliding = Mistral(dataclasses.replace(ours.config, layer_types=None)).eval()
        all_sliding.load_state_dict(ours.state_dict())
        other = all_sliding(ids, attention_mask=mask, position_ids=positions)
    assert max_abs_diff(got, expected, real) <= TOL, f"{case}: ours vs transformers' Ministral"
    assert max_abs_diff(other, expected, real) > 1e-3, f"{case}: the full-attention layer made no difference"


def test_cached_decoding_with_mixed_layers_equals_full_forward(tiny, random_ids, max_abs_diff):
    """A full-attention layer needs every key: the cache is not a window-sized rolling buffer then."""
    ours, _ = _ministral_pair(tiny)
    ids = random_ids(2, 4, 128, seed=3)
    out, step_logits = generate(ours, ids, 3 * WINDOW, return_logits=True)
    for i, logits in enumerate(step_logits):
        with torch.no_grad():
            expected = ours(out[:, : 4 + i])[:, -1]
        assert max_abs_diff(logits, expected) <= TOL, f"step {i}: cached logits differ from a full forward"


def test_a_mistral_file_with_layer_types_keeps_every_layer_alike():
    """transformers' Mistral ignores `layer_types` (it warns): ours keeps it an unknown key and writes it back."""
    d = {**transformers.MistralConfig(**{"num_hidden_layers": 2, "sliding_window": 5}).to_dict(),
         "layer_types": ["full_attention", "sliding_attention"]}
    ours = MistralConfig.from_hf_dict(d, source="x")
    assert ours.layer_types is None and [ours.layer_window(i) for i in range(2)] == [5, 5]
    assert ours.to_hf_dict()["layer_types"] == ["full_attention", "sliding_attention"]


MINISTRAL_FILES = {
    "interleaved": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "no_layer_types_window": dict(sliding_window=5),  # transformers: every layer slides
    "no_layer_types_no_window": dict(sliding_window=None),  # transformers: every layer full
    "all_full_with_window": dict(sliding_window=5, layer_types=["full_attention"] * 3),
}


@pytest.mark.parametrize("case", MINISTRAL_FILES)
def test_ministral_layer_kinds_are_transformers_own(case, tiny, tmp_path):
    """Each layer's window is the one transformers' Ministral gives it (its `layer_types`, with its default when the
    file has none); written back, the file loads in transformers as MinistralConfig with the same kinds."""
    hf = transformers.MinistralConfig(**tiny(num_hidden_layers=3, **MINISTRAL_FILES[case]))
    ours = MistralConfig.from_hf_dict(json.loads(hf.to_json_string()), source=case)
    expected = [hf.sliding_window if kind == "sliding_attention" else None for kind in hf.layer_types]
    assert [ours.layer_window(i) for i in range(3)] == expected
    assert "layer_types" not in ours.extra, "a key the variant reads is a field, not an unknown key"
    written = ours.to_hf_dict()
    assert (written["model_type"], written["architectures"]) == ("ministral", ["MinistralForCausalLM"])
    ours.save(tmp_path)
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(again) is transformers.MinistralConfig and again.layer_types == hf.layer_types
    assert MistralConfig.from_json_file(tmp_path / "config.json") == ours


def test_ministral_heads_save_as_ministral_classes(tiny):
    """The head's class is written under the model_type's own name, so transformers builds the same class."""
    ours = MistralConfig(**tiny(sliding_window=3), layer_types=["sliding_attention", "full_attention"],
                         model_type="ministral")
    for ours_name, theirs in (("MistralForSequenceClassification", "MinistralForSequenceClassification"),
                              ("MistralForTokenClassification", "MinistralForTokenClassification")):
        assert ours.to_hf_dict(ours_name)["architectures"] == [theirs]
        assert hasattr(transformers, theirs)


def test_variant_errors_name_the_key(tiny):
    with pytest.raises(ValueError, match="layer_types"):
        MistralConfig(**tiny(), layer_types=["full_attention"])  # two layers
    with pytest.raises(ValueError, match="layer_types"):
        MistralConfig(**tiny(), layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match="mlp_kind"):
        Mistral(MistralConfig(**tiny(), mlp_kind="experts"))
    with pytest.raises(ValueError, match="`layer_types` cannot be written as model_type 'mistral'.*'ministral'"):
        # transformers' Mistral would read it as all sliding
        MistralConfig(**tiny(), layer_types=["full_attention", "sliding_attention"]).to_hf_dict()
    with pytest.raises(ValueError, match="`model_type` 'gemma'"):
        MistralConfig(**tiny(), model_type="gemma")
    with pytest.raises(ValueError, match=r"x: `model_type` is 'llama'"):
        MistralConfig.from_hf_dict({**transformers.MistralConfig().to_dict(), "model_type": "llama"}, source="x")


SPEC = ModelSpec(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
                 head_dim=12, sliding_window=7, rope_theta=5e5, max_position_embeddings=300, tie_word_embeddings=False,
                 initializer_range=0.05)


def test_from_spec_carries_every_architecture_field_of_the_spec():
    shared = {f.name for f in dataclasses.fields(ModelSpec)} & {f.name for f in dataclasses.fields(MistralConfig)}
    assert shared == {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                      "num_key_value_heads", "sliding_window", "rope_theta", "max_position_embeddings",
                      "tie_word_embeddings", "initializer_range", "vocab_size", "model_type", "num_local_experts",
                      "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise"}
    config = MistralConfig.from_spec(SPEC, vocab_size=96, bos_token_id=5)
    # vocab_size is the published one for `plan`; the tokenizer's, given here, decides a run's
    assert all(getattr(config, name) == getattr(SPEC, name) for name in shared - {"vocab_size"})
    assert (config.vocab_size, config.bos_token_id) == (96, 5)


def test_plan_and_the_built_model_read_the_same_architecture():
    """plan.py once copied 9 fields and missed rope_theta and initializer_range; both now use from_spec."""
    built = build_model(SPEC, SimpleNamespace(vocab_size=32000, bos_id=1, eos_id=2)).config
    planned = model_shape(SPEC)  # the bundled v1 tokenizer: 32000 ids
    assert planned == built
    assert (planned.rope_theta, planned.initializer_range) == (5e5, 0.05)
