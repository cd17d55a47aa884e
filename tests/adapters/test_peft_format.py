"""PEFT adapter folders written and read by us (peft itself reads them in tests/oracle)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_train.adapters import LoraConfig, LoRALinear, apply_lora, load_adapter, lora_layers, save_adapter


@pytest.fixture
def adapted(tiny, our_model):
    """A tiny Mistral with a random (non-zero) DoRA adapter and a trained lm_head copy."""
    model = our_model(tiny(), seed=0).eval()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head"], init="none"))
    with torch.no_grad():
        model.lm_head.modules_to_save.weight.mul_(1.1)
    return model


def _ids(model) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def test_round_trip_gives_identical_logits(adapted, tiny, our_model, tmp_path):
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path="some/base")
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "temporary folders left behind"
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(our_model(tiny(), seed=0), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(_ids(adapted)), adapted(_ids(adapted)))
    assert loaded.lora_config.use_dora and loaded.lora_config.modules_to_save == ["lm_head"]
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {n for n, p in adapted.named_parameters() if p.requires_grad}
    save_adapter(loaded, tmp_path / "adapter")  # overwriting an existing adapter folder works
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_config_and_keys_are_peft_s(adapted, tmp_path):
    save_adapter(adapted, tmp_path / "a", base_model_name_or_path="some/base")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias", "init_lora_weights", "use_dora", "use_rslora")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "bias": "none",
        "init_lora_weights": False, "use_dora": True, "use_rslora": False,
    }
    assert config["base_model_name_or_path"] == "some/base" and config["modules_to_save"] == ["lm_head"]
    assert config["target_modules"] == sorted(name for name, _ in lora_layers(adapted)), "all-linear is stored expanded, as peft does"
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {f"{q}.lora_A.weight", f"{q}.lora_B.weight", f"{q}.lora_magnitude_vector", "base_model.model.lm_head.weight"} <= keys
    assert len(keys) == 3 * 14 + 1


def _rewrite(folder, config_changes=None, tensors=None):
    if config_changes:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_load_errors_name_the_key_and_both_shapes(adapted, tiny, our_model, tmp_path):
    folder = tmp_path / "a"
    save_adapter(adapted, folder)
    _rewrite(folder, {"r": 8})
    plain = our_model(tiny(), seed=0)
    message = r"lora_A\.weight` has shape \(4, (\d+)\) but `.*lora_A` needs \(8, \1\) \(r=8 .*weight shape \(out, in\) = \(\d+, \1\)"
    with pytest.raises(ValueError, match=message):
        load_adapter(plain, folder)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules()), "a failed load changed the model"


def test_load_refuses_modules_the_model_lacks(adapted, tiny, our_model, tmp_path):
    save_adapter(adapted, tmp_path / "a")
    with pytest.raises(ValueError, match=r"model\.layers\.1\..*match no module"):
        load_adapter(our_model(tiny(num_hidden_layers=1), seed=0), tmp_path / "a")  # expanded names name layer 1
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.zeros(4, 32)
    _rewrite(tmp_path / "a", tensors=tensors)
    with pytest.raises(ValueError, match=r"x_proj.*module the model does not have"):
        load_adapter(our_model(tiny(), seed=0), tmp_path / "a")


def test_load_refuses_missing_tensors_pickles_and_unsupported_features(adapted, tiny, our_model, tmp_path):
    folder = tmp_path / "a"
    save_adapter(adapted, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors.pop("base_model.model.lm_head.weight")
    _rewrite(folder, tensors=tensors)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*lm_head\.weight"):
        load_adapter(our_model(tiny(), seed=0), folder)
    _rewrite(folder, {"rank_pattern": {"q_proj": 8}})  # read now (peft's per-target r): the r=4 tensors do not fit
    with pytest.raises(ValueError, match=r"q_proj.lora_A` needs \(8, 32\)"):
        load_adapter(our_model(tiny(), seed=0), folder)
    _rewrite(folder, {"rank_pattern": {}, "layers_to_transform": 0})  # 0 is a layer index, not "unset"
    with pytest.raises(ValueError, match="layers_to_transform=0"):
        load_adapter(our_model(tiny(), seed=0), folder)
    _rewrite(folder, {"layers_to_transform": None, "init_lora_weights": "loftq"})
    with pytest.raises(ValueError, match="loftq"):
        load_adapter(our_model(tiny(), seed=0), folder)
    _rewrite(folder, {"init_lora_weights": False})
    os.remove(folder / "adapter_model.safetensors")
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_adapter(our_model(tiny(), seed=0), folder)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(our_model(tiny(), seed=0), tmp_path)


def test_save_needs_an_adapter(tiny, our_model, tmp_path):
    with pytest.raises(ValueError, match="apply_lora"):
        save_adapter(our_model(tiny(), seed=0), tmp_path / "a")
    assert not (tmp_path / "a").exists()
