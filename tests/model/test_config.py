"""MistralConfig <-> transformers' config.json: both rope forms, unknown keys, types, head_dim."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from mistral_train import MistralConfig
from mistral_train.errors import FolderError
from mistral_train.model import config as model_config

# fields no transformers MistralConfig attribute holds (the variant, set by model_type and rope_parameters;
# the expert fields of classes with experts): checked below
ARCH_FIELDS = [f.name for f in dataclasses.fields(MistralConfig)
               if f.name not in ("extra", "rope_theta", "num_labels", *model_config._VARIANT) or f.name == "model_type"]


def _hf_dict(**kwargs) -> dict:
    """The dict transformers itself writes to config.json (v5: `rope_parameters`), as read back from JSON."""
    return json.loads(transformers.MistralConfig(**kwargs).to_json_string())


def _v4_dict() -> dict:
    """A config.json in the pre-v5 layout (top-level `rope_theta`), as Mistral-7B-v0.1 ships it, scaled down."""
    return {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 8, "num_hidden_layers": 3, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 320,
    }


def _assert_same_architecture(ours: MistralConfig, hf: transformers.MistralConfig) -> None:
    for name in ARCH_FIELDS:
        assert getattr(ours, name) == getattr(hf, name), f"`{name}`: ours {getattr(ours, name)!r}, transformers {getattr(hf, name)!r}"
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    # transformers' Mistral: every layer sees the same window, default rotary, a dense MLP
    assert [ours.layer_window(i) for i in range(ours.num_hidden_layers)] == [hf.sliding_window] * hf.num_hidden_layers
    assert (ours.rope_type, ours.mlp_kind) == (hf.rope_parameters["rope_type"], "dense")


HF_CASES = {
    "defaults": {},
    "tiny_window_theta": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=8, num_key_value_heads=1, sliding_window=7, rope_theta=1e6,
                              tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=0, head_dim=16),
    "no_window": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, sliding_window=None),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_from_v5_transformers_dict(case):
    hf = transformers.MistralConfig(**HF_CASES[case])
    ours = MistralConfig.from_hf_dict(hf.to_dict(), source="test")
    _assert_same_architecture(ours, hf)


def test_from_v4_rope_theta_dict_loads_in_transformers_too():
    d = _v4_dict()
    ours = MistralConfig.from_hf_dict(d, source="v4")
    assert ours.rope_theta == 1e6 and ours.rms_norm_eps == 1e-5 and ours.vocab_size == 320
    _assert_same_architecture(ours, transformers.MistralConfig(**d))


@pytest.mark.parametrize("case", HF_CASES)
def test_to_hf_dict_loads_in_transformers_with_same_values(case, tmp_path):
    ours = MistralConfig.from_hf_dict(_hf_dict(**HF_CASES[case]), source="test")
    d = ours.to_hf_dict()
    _assert_same_architecture(ours, transformers.MistralConfig(**d))
    # Through a file, as from_pretrained reads it.
    ours.save(tmp_path)
    _assert_same_architecture(ours, transformers.AutoConfig.from_pretrained(tmp_path))
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "mistral"


def test_unknown_keys_survive_the_round_trip(tmp_path):
    d = _hf_dict(hidden_size=64, num_attention_heads=8)
    unknown = {"my_flag": True, "quantization_config": {"bits": 4, "quant_method": "bitsandbytes"}, "note": "x"}
    d.update(unknown)
    ours = MistralConfig.from_hf_dict(d, source="test")
    written = ours.to_hf_dict()
    for key, value in unknown.items():
        assert written[key] == value, f"`{key}` lost or changed: {written.get(key)!r}"
    ours.save(tmp_path)
    again = MistralConfig.from_json_file(tmp_path / "config.json")
    assert again.to_hf_dict() == written


def test_round_trip_keeps_every_value():
    """from_hf_dict -> to_hf_dict writes back the same value for every key it read."""
    for d in (_v4_dict(), _hf_dict(**HF_CASES["tiny_window_theta"])):
        written = MistralConfig.from_hf_dict(d, source="test").to_hf_dict()
        # File bookkeeping is rewritten; rope is written in both forms (checked elsewhere).
        skip = {"architectures", "transformers_version", "torch_dtype", "dtype", "rope_theta", "rope_parameters"}
        for key, value in d.items():
            if key not in skip:
                assert written.get(key) == value, f"`{key}`: read {value!r}, wrote {written.get(key)!r}"


def test_list_of_eos_ids_round_trips():
    """Some Mistral checkpoints list several EOS ids; writing back must keep the list."""
    d = _hf_dict(hidden_size=64, num_attention_heads=8, eos_token_id=[2, 5])
    written = MistralConfig.from_hf_dict(d, source="test").to_hf_dict()
    assert written["eos_token_id"] == [2, 5]


def test_from_json_file_reads_transformers_file(tmp_path):
    hf = transformers.MistralConfig(**HF_CASES["tiny_window_theta"])
    hf.save_pretrained(tmp_path)
    _assert_same_architecture(MistralConfig.from_json_file(tmp_path / "config.json"), hf)


@pytest.mark.parametrize(
    "key,value",
    [("hidden_size", "abc"), ("num_hidden_layers", 2.0), ("num_attention_heads", True), ("rms_norm_eps", "1e-6"),
     ("rope_theta", None), ("sliding_window", "4096"), ("tie_word_embeddings", 1), ("head_dim", 8.5),
     ("pad_token_id", "0")],
)
def test_wrong_types_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        MistralConfig(**{**HF_CASES["no_window"], key: value})
    d = {**_hf_dict(**HF_CASES["no_window"]), key: value}
    if key == "rope_theta":
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": value}
    with pytest.raises(ValueError) as err:
        MistralConfig.from_hf_dict(d, source="/some/config.json")
    assert key in str(err.value) and "/some/config.json" in str(err.value), str(err.value)


def test_required_key_missing_is_named():
    d = _hf_dict()
    del d["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        MistralConfig.from_hf_dict(d, source="x")


def test_inconsistent_heads_rejected():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        MistralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=3)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "llama3", "longrope"])
def test_unsupported_rope_type_is_a_folder_error_naming_the_key(rope_type):
    d = _hf_dict()
    d["rope_parameters"] = {"rope_type": rope_type, "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(FolderError, match=rf"x: `rope_parameters.rope_type` '{rope_type}' is not supported"):
        MistralConfig.from_hf_dict(d, source="x")
    v4 = {**_v4_dict(), "rope_scaling": {"type": rope_type, "factor": 4.0}}  # the pre-v5 spelling
    with pytest.raises(FolderError, match="rope_type"):
        MistralConfig.from_hf_dict(v4, source="x")


@pytest.mark.parametrize("hidden,heads,head_dim", [(64, 8, None), (96, 4, None), (64, 4, 32), (32, 4, 16)])
def test_head_dim_default_matches_transformers(hidden, heads, head_dim):
    kwargs = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim)
    ours = MistralConfig(**kwargs)
    assert ours.head_dim == (head_dim if head_dim is not None else hidden // heads)
    assert ours.head_dim == transformers.MistralConfig(**kwargs).head_dim
    # A config.json without `head_dim` (older checkpoints) gets the same default.
    d = _hf_dict(**kwargs)
    if head_dim is None:
        del d["head_dim"]
    assert MistralConfig.from_hf_dict(d, source="x").head_dim == ours.head_dim
    assert json.loads(json.dumps(ours.to_hf_dict()))["head_dim"] == ours.head_dim


# Mistral-Nemo-Base-2407's published config.json (transformers 4.43 layout): head_dim 128 while hidden / heads is 160,
# the Tekken vocabulary of 131072; layers cut from 40 to 1, as every layer has the same shapes.
NEMO = {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 1, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 131072}


def test_nemo_shapes_equal_transformers_parameter_for_parameter():
    """Nemo's head_dim != hidden / heads: every parameter of ours has the shape of transformers' (meta device,
    no memory), and the written config.json keeps head_dim and the vocabulary."""
    import torch

    from mistral_train import Mistral

    ours_config = MistralConfig.from_hf_dict(NEMO, source="nemo")
    assert (ours_config.head_dim, ours_config.vocab_size, ours_config.sliding_window) == (128, 131072, None)
    with torch.device("meta"):
        ours = Mistral(ours_config)
        theirs = transformers.MistralForCausalLM(transformers.MistralConfig(**NEMO))
    expected = {name: tuple(p.shape) for name, p in theirs.named_parameters()}
    assert {name: tuple(p.shape) for name, p in ours.named_parameters()} == expected
    assert expected["model.layers.0.self_attn.q_proj.weight"] == (32 * 128, 5120)  # not (5120, 5120)
    written = ours_config.to_hf_dict()
    assert (written["head_dim"], written["vocab_size"]) == (128, 131072)


@pytest.mark.parametrize("key,value", [("attention_bias", True), ("mlp_bias", True), ("partial_rotary_factor", 0.5),
                                       ("final_logit_softcapping", 30.0), ("use_qk_norm", True)])
def test_a_key_that_changes_the_maths_is_a_folder_error_naming_it(key, value):
    d = {**_hf_dict(hidden_size=64, num_attention_heads=8), key: value}
    with pytest.raises(FolderError, match=rf"^/m/config.json: `{key}` is {value!r}, which changes the model"):
        MistralConfig.from_hf_dict(d, source="/m/config.json")
    neutral = {**d, key: {"partial_rotary_factor": 1.0}.get(key, None if "softcapping" in key else False)}
    assert MistralConfig.from_hf_dict(neutral, source="x").to_hf_dict()[key] == neutral[key], "a neutral value round-trips"


@pytest.mark.parametrize("rope,key", [
    ({"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}, "low_freq_factor"),  # llama3's
    ({"rope_type": "yarn", "factor": 4.0, "short_factor": [1.0]}, "short_factor"),  # longrope's
    ({"rope_type": "default", "factor": 4.0}, "factor"),  # a factor the default rotary would ignore
    ({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "yarn"}, "factor"),  # required: transformers fails without it
])
def test_rope_parameters_we_do_not_compute_are_named(rope, key):
    d = {**_hf_dict(), "rope_parameters": {"rope_theta": 1e6, **rope}}
    with pytest.raises(FolderError, match=rf"^x: `rope_parameters.{key}` is"):
        MistralConfig.from_hf_dict(d, source="x")


def test_ministral3_needs_its_query_scale_keys_and_saves_only_as_itself():
    d = json.loads(transformers.Ministral3Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                                 num_hidden_layers=2).to_json_string())
    ours = MistralConfig.from_hf_dict(d, source="x")
    assert (ours.model_type, ours.rope_type, ours.query_scaling) == ("ministral3", "yarn", "llama4")
    assert ours.to_hf_dict()["architectures"] == ["Ministral3ForCausalLM"]
    del d["rope_parameters"]["llama_4_scaling_beta"]
    with pytest.raises(FolderError, match=r"`rope_parameters.llama_4_scaling_beta` is required"):
        MistralConfig.from_hf_dict(d, source="x")
    with pytest.raises(ValueError, match=r"`query_scaling` cannot be written as model_type 'mistral'"):
        dataclasses.replace(ours, model_type="mistral").to_hf_dict()  # transformers' Mistral would drop it
    with pytest.raises(ValueError, match=r"`query_scaling` cannot be written as model_type 'ministral3'"):
        dataclasses.replace(ours, query_scaling=None).to_hf_dict()  # transformers' Ministral 3 always scales


def test_ministral3_file_without_optional_keys_gets_transformers_defaults():
    """Ministral3Config's defaults differ from Mistral's (head_dim 128, no window, YaRN): a sparse file means them."""
    d = {"model_type": "ministral3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4}
    ours = MistralConfig.from_hf_dict(d, source="x")
    theirs = transformers.Ministral3Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert (ours.head_dim, ours.sliding_window, ours.rms_norm_eps, ours.pad_token_id, ours.max_position_embeddings) == (
        theirs.head_dim, theirs.sliding_window, theirs.rms_norm_eps, theirs.pad_token_id, theirs.max_position_embeddings)
    assert {"rope_type": ours.rope_type, "rope_theta": ours.rope_theta, **ours.rope_options} == {
        "rope_type": "yarn", **{k: v for k, v in theirs.rope_parameters.items() if k != "type"}}
