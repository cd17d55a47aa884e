"""Mistral's native format (model/native.py): params.json <-> MistralConfig, the key map and rotary layout,
the folder round trip, its tokenizer file, the one-line errors, and `mistral-train export --format native`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file, save_file

from mistral_train import Mistral, MistralConfig
from mistral_train.adapters import LoraConfig, apply_lora, save_adapter
from mistral_train.cli import main
from mistral_train.config import DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.errors import ConfigError, FolderError, TensorNameError
from mistral_train.folders import check_model_folder
from mistral_train.model import native
from mistral_train.model.config import MODEL_TYPES
from mistral_train.plan import model_shape
from mistral_train.tokenizer.files import write_native_tokenizer, write_tokenizer_files
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from mistral_train.train import fit
from tests._tokenizers import bundled
from tests.conftest import randomize_

# GQA, head_dim != hidden / heads (as Nemo), a window shorter than the test sequence
KWARGS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=6, rope_theta=50000.0, max_position_embeddings=256)
# Mistral-7B-v0.1's params.json as published (no rope_theta: 10000 was meant)
MISTRAL_7B_V01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
                  "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}


def _model(seed: int = 0, **overrides) -> Mistral:
    return randomize_(Mistral(MistralConfig(**{**KWARGS, **overrides})), seed).eval()


def _params(folder: Path, **changes) -> Path:
    path = folder / native.PARAMS_FILE
    params = json.loads(path.read_text())
    params.update(changes)
    path.write_text(json.dumps({k: v for k, v in params.items() if v is not ...}))
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_folder_round_trip_is_exact(tmp_path, tied):
    model = _model(tie_word_embeddings=tied)
    native.save_native(model, tmp_path / "n")
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["consolidated.safetensors", "params.json"]
    stored = load_file(str(tmp_path / "n" / native.WEIGHTS_FILE))
    assert ("output.weight" in stored) is not tied  # a tied head is the embedding, stored once
    back = Mistral.from_pretrained(tmp_path / "n").eval()
    assert back.config.tie_word_embeddings is tied and back.config.sliding_window == 6
    assert back.config.head_dim == 16 and back.config.rope_theta == 50000.0
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_interleaved_layers_round_trip_as_a_window_list(tmp_path):
    """Ministral's full and sliding layers: params.json lists each layer's window (null: full), as vLLM reads it."""
    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    model = _model(model_type="ministral", num_hidden_layers=4, layer_types=kinds, sliding_window=3)
    native.save_native(model, tmp_path / "n")
    assert json.loads((tmp_path / "n" / native.PARAMS_FILE).read_text())["sliding_window"] == [None, 3, 3, None]
    back = Mistral.from_pretrained(tmp_path / "n").eval()
    assert back.config.model_type == "ministral" and back.config.layer_types == kinds
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
        assert not torch.allclose(back(ids), _model(sliding_window=3, num_hidden_layers=4)(ids))


@pytest.mark.parametrize("magnitude, apply_scale", [({"mscale": 1.0, "mscale_all_dim": 1.0}, False), ({}, None)])
def test_ministral3_yarn_and_query_scale_round_trip(tmp_path, magnitude, apply_scale):
    """Ministral 3 (YaRN + llama-4 query scaling) -> `yarn` / `llama_4_scaling` -> the same model, past the original
    length; transformers' mscale = mscale_all_dim = 1 (its published configs) is YaRN without magnitude correction,
    written `apply_scale: false`; no mscale keeps the 0.1 ln(factor) + 1 correction (the key left out)."""
    options = dict(factor=4.0, original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0,
                   llama_4_scaling_beta=0.5, **magnitude)
    model = _model(model_type="ministral3", rope_type="yarn", query_scaling="llama4", rope_options=options,
                   sliding_window=None)
    native.save_native(model, tmp_path / "n")
    params = json.loads((tmp_path / "n" / native.PARAMS_FILE).read_text())
    assert params["llama_4_scaling"] == {"original_max_position_embeddings": 8, "beta": 0.5}
    assert params["yarn"].get("apply_scale") is apply_scale and params["yarn"]["beta"] == 32.0
    back = Mistral.from_pretrained(tmp_path / "n").eval()
    assert (back.config.model_type, back.config.rope_type, back.config.query_scaling) == ("ministral3", "yarn", "llama4")
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_native_names_and_layout_on_disk(tmp_path):
    """Each stored tensor under its native name; wq/wk rows interleaved, every other weight as ours."""
    model = _model()
    native.save_native(model, tmp_path / "n")
    stored = load_file(str(tmp_path / "n" / native.WEIGHTS_FILE))
    ours = model.state_dict()
    assert set(stored) == {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{name}" for i in range(2) for name in (
            "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
            "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
            "attention_norm.weight", "ffn_norm.weight")}
    assert torch.equal(stored["layers.1.feed_forward.w1.weight"], ours["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(stored["layers.0.feed_forward.w2.weight"], ours["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(stored["layers.0.attention_norm.weight"], ours["model.layers.0.input_layernorm.weight"])
    # by hand: native row 2i of a head is our row i, row 2i+1 our row i + head_dim/2
    wk, k = stored["layers.0.attention.wk.weight"], ours["model.layers.0.self_attn.k_proj.weight"]
    for head in range(2):
        for i in range(8):
            assert torch.equal(wk[head * 16 + 2 * i], k[head * 16 + i])
            assert torch.equal(wk[head * 16 + 2 * i + 1], k[head * 16 + 8 + i])


def test_permutation_turns_complex_rope_into_rotate_half():
    """The permutation is the right one: rotating pairs (2i, 2i+1) as complex numbers (mistral-inference's rope)
    and then permuting equals permuting and then rotating halves (transformers' rope), frequencies base^(-2i/d)."""
    d, n_heads, T, base = 8, 3, 5, 10000.0
    x = torch.randn(n_heads * d, T, dtype=torch.float64)  # rows: a projection's outputs, one column a position
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = torch.arange(T, dtype=torch.float64)[None, :] * freqs[:, None]  # (d/2, T)
    pairs = torch.view_as_complex(x.reshape(n_heads, d // 2, 2, T).permute(0, 1, 3, 2).contiguous())
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).permute(0, 1, 3, 2)
    native_rope = rotated.reshape(n_heads * d, T)
    half = native.interleaved_to_half(x, n_heads).reshape(n_heads, d, T)
    cos, sin = torch.cos(angles).repeat(2, 1), torch.sin(angles).repeat(2, 1)  # (d, T), as transformers' cat
    rotate_half = torch.cat([-half[:, d // 2:], half[:, :d // 2]], dim=1)
    hf_rope = (half * cos + rotate_half * sin).reshape(n_heads * d, T)
    torch.testing.assert_close(native.interleaved_to_half(native_rope, n_heads), hf_rope, atol=1e-12, rtol=0)
    assert torch.equal(native.half_to_interleaved(native.interleaved_to_half(x, n_heads), n_heads), x)


def test_published_params_map_onto_the_config(tmp_path):
    path = tmp_path / native.PARAMS_FILE
    path.write_text(json.dumps(MISTRAL_7B_V01))
    c = native.read_params(tmp_path)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.intermediate_size) == (4096, 32, 128, 14336)
    assert (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps, c.vocab_size) == (32, 8, 1e-5, 32000)
    assert c.sliding_window == 4096 and c.layer_types is None and c.rope_theta == 10000.0
    assert c.tie_word_embeddings is False and c.hidden_act == "silu"
    # Nemo's: no window, rope_theta 1e6, tied flag and serving length
    path.write_text(json.dumps({**MISTRAL_7B_V01, "dim": 5120, "n_layers": 40, "sliding_window": None,
                                "rope_theta": 1e6, "vocab_size": 131072, "max_seq_len": 131072}))
    c = native.read_params(tmp_path)
    assert c.sliding_window is None and c.rope_theta == 1e6 and c.head_dim == 128 and c.max_position_embeddings == 131072


def test_per_layer_windows_map_as_vllm_reads_them():
    """A `sliding_window` list (null: a full-attention layer) repeats to n_layers, as vllm's
    _remap_mistral_sliding_window does, giving transformers' Ministral `layer_types`."""
    d = native.hf_config_dict({**MISTRAL_7B_V01, "n_layers": 4, "sliding_window": [None, 32768]}, "p")
    assert d["model_type"] == "ministral" and d["sliding_window"] == 32768
    assert d["layer_types"] == ["full_attention", "sliding_attention"] * 2
    with pytest.raises(FolderError, match="`sliding_window`"):
        native.hf_config_dict({**MISTRAL_7B_V01, "sliding_window": [4096, 8192]}, "p")


def test_yarn_and_llama4_scaling_map_as_vllm_reads_them(monkeypatch):
    """vLLM's _remap_mistral_yarn_args: beta -> beta_fast, alpha -> beta_slow, mscale_all_dim 1 (no mscale), and
    apply_scale false -> attention_factor 1; transformers' Ministral 3 keeps the llama-4 query scaling's beta in
    rope_parameters. Without ministral3 support: an error. YaRN alone is a Mistral."""
    params = {**MISTRAL_7B_V01, "rope_theta": 1e6, "yarn": {"factor": 16, "original_max_position_embeddings": 16384,
                                                             "beta": 32, "alpha": 1, "apply_scale": False},
              "llama_4_scaling": {"original_max_position_embeddings": 16384, "beta": 0.1}}
    monkeypatch.delitem(MODEL_TYPES, "ministral3", raising=False)
    with pytest.raises(FolderError, match="p: `llama_4_scaling` describes a Ministral 3 model"):
        native.hf_config_dict(params, "p")
    monkeypatch.setitem(MODEL_TYPES, "ministral3", MODEL_TYPES["mistral"])  # whatever entry: the mapping is tested
    d = native.hf_config_dict(params, "p")
    assert d["model_type"] == "ministral3" and "rope_theta" not in d
    assert d["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                    "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "mscale_all_dim": 1.0, "attention_factor": 1.0, "llama_4_scaling_beta": 0.1}
    d = native.hf_config_dict({**params, "yarn": {"factor": 4, "original_max_position_embeddings": 64},
                               "llama_4_scaling": None}, "p")
    assert d["model_type"] == "mistral" and d["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale_all_dim": 1.0}
    with pytest.raises(FolderError, match="differs"):
        native.hf_config_dict({**params, "llama_4_scaling": {"original_max_position_embeddings": 8192, "beta": 0.1}}, "p")


@pytest.mark.parametrize("key, value, message", [
    ("moe", {"num_experts": 8, "num_experts_per_tok": 2}, "key `moe` is not supported"),
    ("vision_encoder", {"hidden_size": 16}, "key `vision_encoder` is not supported"),
    ("quantization", {"qformat_weight": "fp8_e4m3"}, "key `quantization` is not supported"),
    ("n_heads", ..., "required key `n_heads` is missing"),
    ("model_type", "mamba", "`model_type` is 'mamba'"),
])
def test_params_errors_name_the_file_and_key(tmp_path, key, value, message):
    native.save_native(_model(), tmp_path / "n")
    path = _params(tmp_path / "n", **{key: value})
    with pytest.raises(FolderError, match=message) as err:
        Mistral.from_pretrained(tmp_path / "n")
    assert str(path) in str(err.value)


def test_weight_errors_name_the_file_and_tensor(tmp_path):
    native.save_native(_model(), tmp_path / "n")
    file = tmp_path / "n" / native.WEIGHTS_FILE
    tensors = load_file(str(file))
    save_file({**tensors, "layers.0.attention.wqkv.weight": torch.zeros(2)}, str(file))
    with pytest.raises(TensorNameError, match="unexpected tensor `layers.0.attention.wqkv.weight`"):
        Mistral.from_pretrained(tmp_path / "n")
    save_file({k: v for k, v in tensors.items() if k != "layers.1.ffn_norm.weight"}, str(file))
    with pytest.raises(TensorNameError, match="post_attention_layernorm"):
        Mistral.from_pretrained(tmp_path / "n")
    save_file({**tensors, "layers.0.attention.wk.weight": torch.zeros(30, 32)}, str(file))
    with pytest.raises(FolderError, match="layers.0.attention.wk.weight"):
        Mistral.from_pretrained(tmp_path / "n")
    file.unlink()
    with pytest.raises(FileNotFoundError, match="consolidated.safetensors"):
        Mistral.from_pretrained(tmp_path / "n")


def test_writer_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="silu"):
        native.save_native(_model(hidden_act="gelu"), tmp_path / "a")
    with pytest.raises(ValueError, match="causal LM only"):
        native.save_native(Mistral(MistralConfig(**KWARGS), task="sequence_classification"), tmp_path / "b")
    with pytest.raises(ValueError, match="lora_A.*merge adapters"):
        native.save_native(apply_lora(_model(), LoraConfig(r=2)), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_model_path_detects_a_native_folder(tmp_path):
    native.save_native(_model(), tmp_path / "n", bundled("v3"), "v3")
    check_model_folder(str(tmp_path / "n"))  # preflight of model.path: no ConfigError
    (tmp_path / "n" / native.WEIGHTS_FILE).unlink()
    with pytest.raises(ConfigError, match=r"model.path=.*consolidated.safetensors"):
        check_model_folder(str(tmp_path / "n"))


def test_a_run_starts_from_a_native_folder(tmp_path):
    """model.path=<native folder>: plan reads params.json, the run finds tokenizer.model.v3 and trains from the
    folder's weights (after one AdamW step of lr 1e-3 every weight is within 2e-3 of the folder's; a fresh
    model's differ by order 0.1)."""
    model = _model(vocab_size=32768, sliding_window=None)
    native.save_native(model, tmp_path / "n", bundled("v3"), "v3")
    spec = ModelSpec(path=str(tmp_path / "n"))
    assert model_shape(spec) == model.config
    run_dir = fit(RunConfig(model=spec, data=DataSpec(format="messages", eval_path=None),
                            trainer=TrainerSpec(objective="sft", max_steps=1, max_seq_len=64, batch_size=2, lr=1e-3,
                                                sample_max_new_tokens=2, eval_max_new_tokens=0),
                            run=RunSpec(name="from_native", dir=str(tmp_path)),
                            tracking=TrackingSpec(progress_bar=False, plot=False)))
    trained = Mistral.from_pretrained(run_dir / "final").state_dict()
    assert max(float((trained[k] - v).abs().max()) for k, v in model.state_dict().items()) <= 2e-3
    assert load_tokenizer(run_dir / "final").version == "v3"


def test_sentencepiece_tokenizer_is_named_for_mistral_common(tmp_path):
    """bundled v3 -> tokenizer.model.v3: mistral-common reads the version from the name and encodes our chat ids;
    our own loader finds the file in the folder."""
    native.save_native(_model(vocab_size=32768), tmp_path / "n", bundled("v3"), "v3")
    files = sorted(p.name for p in (tmp_path / "n").iterdir())
    assert files == ["consolidated.safetensors", "params.json", "tokenizer.model.v3"]
    official = MistralTokenizer.from_file(str(tmp_path / "n" / "tokenizer.model.v3"))
    assert official.instruct_tokenizer.tokenizer.version == TokenizerVersion.v3
    chat = [{"role": "user", "content": "Name a colour."}]
    ours = load_tokenizer(tmp_path / "n")
    assert ours.path.name == "tokenizer.model.v3" and ours.version == "v3"
    expected = official.encode_chat_completion(ChatCompletionRequest.from_openai(messages=chat)).tokens
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == expected


def test_tekken_tokenizer_keeps_the_runs_chat_format(tmp_path):
    tekken = load_tokenizer(Path(str(bundled_tokenizer_path("v1"))).parent / "tekken_240911.json")
    assert tekken.version == "v3"
    copied = write_native_tokenizer(tekken, tmp_path)
    assert copied.read_bytes() == tekken.path.read_bytes()  # the file as it came, when the versions agree
    write_native_tokenizer(tekken, tmp_path, "v7")
    assert json.loads(copied.read_text())["config"]["version"] == "v7"
    assert MistralTokenizer.from_file(str(copied)).instruct_tokenizer.tokenizer.version == TokenizerVersion.v7
    hf_json = tmp_path / "hf"
    hf_json.mkdir()
    write_tokenizer_files(bundled("v1"), hf_json)
    (hf_json / "tokenizer.model").unlink()  # a folder with only tokenizer.json
    with pytest.raises(ValueError, match="tokenizer.json has no native form"):
        write_native_tokenizer(load_tokenizer(hf_json), tmp_path)


def test_export_verb_writes_a_full_folder_and_a_merged_adapter(tmp_path, capsys):
    base = tmp_path / "base"
    model = _model(vocab_size=32768)
    model.save_pretrained(base)
    write_tokenizer_files(bundled("v3"), base, "v3")
    assert main(["export", str(base), "--format", "native", "--out", str(tmp_path / "full")]) == 0
    assert (tmp_path / "full" / "tokenizer.model.v3").is_file()
    ids = torch.randint(0, 32768, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(Mistral.from_pretrained(tmp_path / "full")(ids), model(ids))
    # an adapter (as a LoRA run's final/ holds it): merged into its base, then written
    adapted = apply_lora(_model(vocab_size=32768), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(base))
    assert main(["export", str(tmp_path / "adapter"), "--format", "native", "--out", str(tmp_path / "merged")]) == 0
    exported = Mistral.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = adapted(ids)
        assert float((exported(ids) - model(ids)).abs().max()) > 1e-2  # the adapter changes the model
        torch.testing.assert_close(exported(ids), want, atol=1e-5, rtol=1e-5)
    # and back to HF, from the native folder
    assert main(["export", str(tmp_path / "merged"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.model").is_file()
    with torch.no_grad():
        assert torch.equal(Mistral.from_pretrained(tmp_path / "hf")(ids), exported(ids))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "merged"), "--format", "native", "--out", str(tmp_path / "hf")]) == 2
    assert f"--out {tmp_path / 'hf'} exists; pass --overwrite" in capsys.readouterr().err


def test_export_without_a_tokenizer_is_one_line(tmp_path, capsys):
    model = _model()
    model.save_pretrained(tmp_path / "bare")
    assert main(["export", str(tmp_path / "bare"), "--format", "native", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert "holds no tokenizer file: pass --tokenizer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n").exists()
    assert main(["export", str(tmp_path / "bare"), "--format", "native", "--tokenizer", "bundled:v1",
                 "--out", str(tmp_path / "n")]) == 0
    assert (tmp_path / "n" / "tokenizer.model.v1").is_file()
    with torch.no_grad():
        assert torch.equal(Mistral.from_pretrained(tmp_path / "n")(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]])))
