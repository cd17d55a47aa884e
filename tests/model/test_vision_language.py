"""model/vision_language.py without transformers: Mistral3ForConditionalGeneration folders written by hand.

Each folder holds a tiny Mistral's weights under a language prefix (either layout), two bf16 "vision" tensors
and a projector tensor; the parity against transformers itself is tests/oracle/test_vision_language_parity.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_train import Mistral, MistralConfig
from mistral_train.errors import FolderError, TensorNameError
from mistral_train.model.vision_language import language_name, transformers_module_name
from tests._tiny import SMALL

LAYOUTS = {  # our prefix -> the checkpoint's, and where the vision parts live
    "legacy": ({"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}, ""),
    "v5": ({"model.": "model.language_model.", "lm_head.": "lm_head."}, "model."),
}


def _vision(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "vision_tower.patch_conv.weight": torch.randn(8, 3, 2, 2, generator=gen).to(torch.bfloat16),
        "vision_tower.ln_pre.weight": torch.randn(8, generator=gen).to(torch.bfloat16),
        "multi_modal_projector.linear_1.weight": torch.randn(32, 8, generator=gen),
    }


def _write_folder(folder, layout="legacy", seed=0, top=None, extra_tensors=None, with_head=True):
    """(folder, the text model whose weights it holds): a mistral3 folder in `layout`, in two files."""
    torch.manual_seed(seed)
    text = Mistral(MistralConfig(**SMALL))
    prefixes, vision_prefix = LAYOUTS[layout]
    language = {}
    for key, tensor in text.state_dict().items():
        ours = next(p for p in prefixes if key.startswith(p))
        if with_head or ours != "lm_head.":
            language[prefixes[ours] + key[len(ours):]] = tensor.clone()
    vision = {vision_prefix + k: v for k, v in _vision().items()} | (extra_tensors or {})
    folder.mkdir()
    save_file(language, str(folder / "a.safetensors"))
    save_file(vision, str(folder / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in language} | {k: "b.safetensors" for k in vision}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text_config = text.config.to_hf_dict()
    text_config.pop("architectures")
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
              "vision_config": {"model_type": "pixtral", "hidden_size": 8}, "text_config": text_config,
              "tie_word_embeddings": False} | (top or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, text


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loads_the_language_model_only(tmp_path, layout):
    folder, text = _write_folder(tmp_path / "vl", layout)
    ours = Mistral.from_pretrained(folder)
    assert ours.state_dict().keys() == text.state_dict().keys()
    for key, tensor in text.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key
    assert sorted(ours.vision_language.carried) == sorted(_vision())  # saved under the legacy names


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_save_round_trip_keeps_config_and_vision_tensors(tmp_path, layout):
    folder, _ = _write_folder(tmp_path / "vl", layout)
    ours = Mistral.from_pretrained(folder)
    with torch.no_grad():
        ours.model.norm.weight.add_(1.0)  # a trained change must reach the saved folder
    ours.save_pretrained(tmp_path / "out")
    saved = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        saved |= load_file(file)
    for key, tensor in _vision().items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert torch.equal(saved["language_model.model.norm.weight"], ours.model.norm.weight.detach())
    assert not [k for k in saved if k.startswith("model.")], "saved in the layout transformers writes"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert config["vision_config"] == source["vision_config"] and config["image_token_index"] == 10
    assert config["text_config"]["hidden_size"] == SMALL["hidden_size"] and "architectures" not in config["text_config"]
    again = Mistral.from_pretrained(tmp_path / "out")
    assert torch.equal(again.model.norm.weight, ours.model.norm.weight)


def test_tie_follows_the_top_level_flag_and_a_stored_head(tmp_path):
    """transformers ties by the top-level flag (absent: true), unless the folder stores a head of its own."""
    untied, _ = _write_folder(tmp_path / "a", top={"tie_word_embeddings": True})
    assert not Mistral.from_pretrained(untied).config.tie_word_embeddings  # a stored head wins
    headless, _ = _write_folder(tmp_path / "b", with_head=False)
    config = json.loads((headless / "config.json").read_text())
    del config["tie_word_embeddings"]
    (headless / "config.json").write_text(json.dumps(config))
    ours = Mistral.from_pretrained(headless)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_unknown_tensor_is_named(tmp_path):
    folder, _ = _write_folder(tmp_path / "vl", extra_tensors={"audio_tower.w": torch.zeros(2)})
    with pytest.raises(TensorNameError, match=r"b\.safetensors: unexpected tensor `audio_tower\.w`"):
        Mistral.from_pretrained(folder)


@pytest.mark.parametrize("top, task, message", [
    ({"text_config": None}, "causal_lm", r"config\.json: `text_config` must be"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "causal_lm", r"config\.json: `quantization_config`"),
    ({}, "sequence_classification", r"config\.json: a Mistral3ForConditionalGeneration folder loads as a causal LM only"),
])
def test_folder_errors_name_the_file_and_key(tmp_path, top, task, message):
    folder, _ = _write_folder(tmp_path / "vl", top=top)
    with pytest.raises(FolderError, match=message):
        Mistral.from_pretrained(folder, task=task)


def test_text_config_errors_name_text_config(tmp_path):
    folder, _ = _write_folder(tmp_path / "vl")
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FolderError, match=r"config\.json `text_config`: required key `hidden_size` is missing"):
        Mistral.from_pretrained(folder)


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_a_changed_source_stops_the_save_before_anything_is_written(tmp_path, change):
    folder, _ = _write_folder(tmp_path / "vl")
    ours = Mistral.from_pretrained(folder)
    vision_file = folder / "b.safetensors"
    if change == "removed":
        vision_file.unlink()
    else:
        save_file({k: v + 1 for k, v in load_file(vision_file).items()}, str(vision_file))
        stat = vision_file.stat()
        os.utime(vision_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a same-size rewrite: mtime tells
    with pytest.raises(FolderError, match=r"b\.safetensors: (changed|gone) since the model was loaded"):
        ours.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_names_map_both_layouts_and_back():
    for name in ("model.layers.0.self_attn.q_proj", "model.embed_tokens", "lm_head"):
        assert language_name(transformers_module_name(name)) == name
    assert language_name("language_model.model.layers.1.mlp.down_proj.weight") == "model.layers.1.mlp.down_proj.weight"
    assert language_name("language_model.lm_head.weight") == "lm_head.weight"
    assert language_name("model.vision_tower.ln_pre.weight") is None
    assert language_name("multi_modal_projector.linear_1.weight") is None


def test_a_run_accepts_the_folder_as_model_path(tmp_path):
    from mistral_train.folders import check_model_folder
    from mistral_train.model.hf import folder_config

    folder, text = _write_folder(tmp_path / "vl")
    check_model_folder(str(folder))  # raises ConfigError for a folder a run cannot load
    assert folder_config(folder).hidden_size == text.config.hidden_size
