"""Vision-language checkpoints (transformers' Mistral3ForConditionalGeneration) against transformers and peft.

A tiny Mistral3ForConditionalGeneration (pixtral tower of one layer, a Mistral text model) with order-one
random weights is saved by transformers itself; its vision tower is cast to bf16 first, so the folder also
shows that carried tensors keep their dtype while the language model is fp32. Text only (input_ids, no
pixels): the language model is all we train.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mistral_train import Mistral  # noqa: E402
from mistral_train.adapters import LoraConfig, apply_lora, load_adapter, save_adapter  # noqa: E402
from mistral_train.model.vision_language import language_name  # noqa: E402
from tests.conftest import randomize_, tiny_kwargs  # noqa: E402

TOL = 1e-5
TEXT = tiny_kwargs(hidden_size=64, intermediate_size=128, head_dim=16)
# Ministral 3 / Magistral / Devstral Small 2: YaRN and llama-4 query scaling past an original context of 8
# (the test prompts have 12 tokens)
MINISTRAL3 = {k: v for k, v in TEXT.items() if k != "rope_theta"} | dict(rope_parameters=dict(
    rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=8, beta_fast=8.0, beta_slow=0.5,
    mscale=1.3, mscale_all_dim=0.7, llama_4_scaling_beta=0.4))
TEXTS = {"mistral": (transformers.MistralConfig, TEXT), "ministral3": (transformers.Ministral3Config, MINISTRAL3)}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
              image_size=56, patch_size=14)
# transformers 5 builds (and reads) these names; it writes the legacy ones (language_model.model.*, vision_tower.*)
_V5_NAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def _hf_config(tie: bool = False, text: str = "mistral"):
    text_class, text_kwargs = TEXTS[text]
    config = transformers.Mistral3Config(text_config=text_class(**text_kwargs),
                                         vision_config=transformers.PixtralVisionConfig(**VISION),
                                         tie_word_embeddings=tie)
    config._attn_implementation = "sdpa"
    return config


def _save_source(folder, layout: str, tie: bool = False, seed: int = 0, text: str = "mistral"):
    """A transformers Mistral3ForConditionalGeneration saved in `folder` (sharded), in `layout`: "legacy"
    (as transformers writes it) or "v5" (its module names)."""
    torch.manual_seed(seed)
    model = randomize_(transformers.Mistral3ForConditionalGeneration(_hf_config(tie, text)), seed)
    model.model.vision_tower.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="60KB")
    if layout == "v5":
        for file in folder.glob("*.safetensors"):
            save_file({_rename(k): v for k, v in load_file(file).items()}, str(file), metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"] = {_rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    return folder


def _rename(key: str) -> str:
    for old, new in _V5_NAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _hf_load(folder, **kw):
    model, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, attn_implementation="sdpa", **kw)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[what], f"transformers loading {folder}: {what} = {info[what]}"
    return model.eval()


def _ids(vocab: int = TEXT["vocab_size"], seed: int = 2) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def _raw_tensors(folder) -> dict[str, tuple[str, list[int], bytes]]:
    """key -> (dtype, shape, stored bytes) of every tensor of a folder, read from the files themselves."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        data = file.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        header.pop("__metadata__", None)
        for key, info in header.items():
            start, end = info["data_offsets"]
            out[key] = (info["dtype"], info["shape"], data[8 + length + start:8 + length + end])
    return out


def _carried(raw: dict) -> dict:
    """The vision tower's and projector's tensors under their legacy names."""
    return {_legacy(k): v for k, v in raw.items() if language_name(k) is None}


def _legacy(key: str) -> str:
    for old, new in _V5_NAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


@pytest.fixture(params=[("legacy", "mistral"), ("v5", "mistral"), ("legacy", "ministral3")], ids="-".join)
def source(request, tmp_path):
    layout, text = request.param
    return _save_source(tmp_path / f"source-{layout}-{text}", layout, text=text)


def test_text_logits_and_grads_equal_transformers(source):
    ours = Mistral.from_pretrained(source).eval()
    theirs = _hf_load(source)
    hf_params = dict(theirs.named_parameters())
    language = {language_name(k) for k in hf_params if language_name(k) is not None}
    assert set(ours.state_dict()) == language, "ours holds exactly the language model (no vision tensor loaded)"
    ids = _ids()
    assert _max_diff(_logits(ours, ids), _logits(theirs, ids)) <= TOL
    ours.zero_grad()
    ours(ids, labels=ids).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    for hf_name, p in hf_params.items():
        name = language_name(hf_name)
        if name is None:
            assert p.grad is None or not p.grad.any(), f"{hf_name}: text-only input reaches the vision tower"
            continue
        mine = ours.get_parameter(name).grad
        scale = float(p.grad.abs().max()) or 1.0
        assert _max_diff(mine, p.grad) <= TOL * max(1.0, scale), f"{name}: gradient differs from transformers"


def test_saved_folder_is_mistral3_with_the_vision_bytes_unchanged(source, tmp_path):
    ours = Mistral.from_pretrained(source).eval()
    out = tmp_path / "ours"
    ours.save_pretrained(out, max_shard_size="60KB")
    src_config, config = (json.loads((f / "config.json").read_text()) for f in (source, out))
    assert config["architectures"] == ["Mistral3ForConditionalGeneration"] and config["model_type"] == "mistral3"
    assert config["vision_config"] == src_config["vision_config"]
    for key in ("image_token_index", "spatial_merge_size", "projector_hidden_act", "vision_feature_layer"):
        assert config[key] == src_config[key], key
    reread = transformers.Mistral3Config.from_pretrained(out).text_config.to_dict()
    expected = transformers.Mistral3Config.from_pretrained(source).text_config.to_dict()
    assert {k: v for k, v in reread.items() if k != "dtype"} == {k: v for k, v in expected.items() if k != "dtype"}
    saved, given = _raw_tensors(out), _raw_tensors(source)
    vision = _carried(given)
    assert {v[0] for k, v in vision.items() if k.startswith("vision_tower.")} == {"BF16"}  # the language model is F32
    assert _carried(saved) == vision, "vision tower / projector tensors: names, dtypes, shapes or bytes changed"
    assert {k for k in saved if language_name(k)} == {k for k in _raw_tensors(_save_source(tmp_path / "l", "legacy"))
                                                        if language_name(k)}, "language keys as transformers writes them"
    theirs = _hf_load(out)
    assert _max_diff(_logits(ours, _ids()), _logits(theirs, _ids())) <= TOL
    ref = _hf_load(source)
    for name, p in ref.model.vision_tower.named_parameters():
        assert torch.equal(p, theirs.model.vision_tower.get_parameter(name)), name


def test_tied_checkpoint_round_trips(tmp_path):
    """Top-level tie_word_embeddings (Mistral3Config's default is true) ties the head, as in transformers."""
    source = _save_source(tmp_path / "tied", "legacy", tie=True)
    ours = Mistral.from_pretrained(source).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert _max_diff(_logits(ours, _ids()), _logits(_hf_load(source), _ids())) <= TOL
    ours.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert _max_diff(_logits(ours, _ids()), _logits(_hf_load(tmp_path / "out"), _ids())) <= TOL


def _train_one_step(model, ids) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(ids, labels=ids).backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_adapter_loads_in_peft_on_the_transformers_model(tmp_path, targets):
    source = _save_source(tmp_path / "source", "legacy")
    ours = Mistral.from_pretrained(source)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=targets))
    _train_one_step(ours, _ids(seed=5))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] and all(t.startswith("model.language_model.layers.") for t in config["target_modules"])
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    assert any(v.abs().max() > 0 for k, v in keys.items() if "lora_B" in k), "the step moved lora_B"
    theirs = peft.PeftModel.from_pretrained(_hf_load(source), tmp_path / "adapter").eval()
    wrapped = [n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and n.endswith("_proj")]
    assert wrapped and not any("vision_tower" in n for n in wrapped), "peft put adapters on the vision tower"
    assert _max_diff(_logits(ours, _ids()), _logits(theirs, _ids())) <= TOL
    again = load_adapter(Mistral.from_pretrained(source), tmp_path / "adapter").eval()
    assert _max_diff(_logits(ours, _ids()), _logits(again, _ids())) <= TOL


def test_peft_adapter_on_the_transformers_model_loads_in_ours(tmp_path):
    """peft's own file for the transformers model (a regex over its module names) loads in ours."""
    source = _save_source(tmp_path / "source", "v5")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|down_proj)",
                          init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(_hf_load(source), cfg).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_adapter(Mistral.from_pretrained(source), tmp_path / "adapter").eval()
    assert _max_diff(_logits(ours, _ids()), _logits(theirs, _ids())) <= TOL


def test_merged_adapter_is_a_mistral3_folder(tmp_path):
    """`merge` (train/export.py) of an adapter trained on a vision-language base writes the same class, the
    vision tower byte for byte, and transformers gives the adapter model's logits."""
    from mistral_train.train.export import merge_adapter_folder

    source = _save_source(tmp_path / "source", "legacy")
    ours = Mistral.from_pretrained(source)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _train_one_step(ours, _ids(seed=5))
    save_adapter(ours, tmp_path / "adapter")
    merge_adapter_folder(tmp_path / "adapter", tmp_path / "merged", base=str(source))
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert _carried(_raw_tensors(tmp_path / "merged")) == _carried(_raw_tensors(source))
    assert _max_diff(_logits(ours.eval(), _ids()), _logits(_hf_load(tmp_path / "merged"), _ids())) <= TOL


def test_qlora_adapter_loads_in_peft_on_transformers_bitsandbytes(tmp_path):
    """quantize="nf4" reads the language linears of a mistral3 folder as NF4 (bitsandbytes' format); the
    adapter trained on it loads in peft on transformers' 4-bit Mistral3 with equal logits."""
    bnb = pytest.importorskip("bitsandbytes")
    from mistral_train.quant.linear import NF4Linear

    source = _save_source(tmp_path / "source", "legacy")
    ours = Mistral.from_pretrained(source, dtype=torch.float32, quantize="nf4")
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == 7 * TEXT["num_hidden_layers"]
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _train_one_step(ours, _ids(seed=5))
    save_adapter(ours, tmp_path / "adapter")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = _hf_load(source, quantization_config=quant)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # fp32 math, not the bf16 gemv (STACK-NOTES, trap 1)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert _max_diff(_logits(ours.eval(), _ids()), _logits(theirs, _ids())) <= TOL


def test_merged_qlora_adapter_on_some_linears_is_a_plain_mistral3_folder(tmp_path):
    """A QLoRA adapter on q_proj only: `merge` dequantizes the untargeted NF4 linears too, so transformers
    reads a full-precision folder (no packed weights left behind) with the adapter model's logits."""
    from mistral_train.folders import BASE_NOTE
    from mistral_train.train.export import merge_adapter_folder

    source = _save_source(tmp_path / "source", "legacy")
    ours = Mistral.from_pretrained(source, dtype=torch.float32, quantize="nf4")
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    _train_one_step(ours, _ids(seed=5))
    save_adapter(ours, tmp_path / "adapter")
    (tmp_path / "adapter" / BASE_NOTE).write_text(json.dumps({"base": str(source), "quantize": "nf4"}))
    merge_adapter_folder(tmp_path / "adapter", tmp_path / "merged")
    saved = _raw_tensors(tmp_path / "merged")
    assert not [k for k in saved if "quant" in k or "absmax" in k], "NF4 state left in the merged folder"
    assert _carried(saved) == _carried(_raw_tensors(source))
    assert _max_diff(_logits(ours.eval(), _ids()), _logits(_hf_load(tmp_path / "merged"), _ids())) <= TOL
