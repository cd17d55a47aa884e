"""`plan` rows of the published Mistral models: each configs/model preset reproduces the model's public
config.json, and the parameter count `mistral-train plan` prints equals a hand count from that config, equals
what transformers builds from it (on the meta device: no memory, no download) and is within 1% of the published
round figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from mistral_train.cli import main

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"

# mistralai's published config.json, the keys that shape the weights (text models: the whole file's architecture).
NEMO = dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, sliding_window=None, rope_theta=1000000.0,
            max_position_embeddings=1024000, tie_word_embeddings=False)
SMALL_24B = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=None,
                 rope_theta=100000000.0, max_position_embeddings=32768, tie_word_embeddings=False)

# Mistral-Small-3.2-24B-Instruct-2506 (Mistral3ForConditionalGeneration): text_config, vision_config (Pixtral) and the
# projector's top-level keys
SMALL_3_2 = dict(SMALL_24B, rope_theta=1000000000.0, max_position_embeddings=131072)
PIXTRAL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, head_dim=64,
               patch_size=14, num_channels=3, image_size=1540, rope_theta=10000.0)
# Ministral-3-8B-Base-2512's text_config (model_type ministral3; its rotary scaling does not change the count)
MINISTRAL3_8B = dict(vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_hidden_layers=34,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=None,
                     rope_theta=1000000.0, max_position_embeddings=262144, tie_word_embeddings=False)
PROJECTOR = dict(spatial_merge_size=2, multimodal_projector_bias=False, projector_hidden_act="gelu",
                 image_token_index=10, vision_feature_layer=-1)

# preset -> (published config, its vision tower and projector or None, transformers class, published round figure
# in billions: the Hub's model size)
ROWS = {
    "mistral_nemo_12b": (NEMO, None, "MistralForCausalLM", 12.2),  # Mistral-Nemo-Base-2407
    "mistral_small_24b": (SMALL_24B, None, "MistralForCausalLM", 23.6),  # Mistral-Small-24B-Base-2501
    "mistral_small_3_2_24b": (SMALL_3_2, (PIXTRAL, PROJECTOR), "Mistral3ForConditionalGeneration", 24.0),
    # the card says "8.4B language model + 0.4B vision encoder", truncating (its 3B and 14B siblings' 3.4 and 13.5
    # round 3.43 and 13.51): 8.49 + 0.43 = 8.92
    "ministral3_8b": (MINISTRAL3_8B, (PIXTRAL, PROJECTOR), "Mistral3ForConditionalGeneration", 8.9),
}


def decoder_parameters(c: dict) -> int:
    """Hand count of a Mistral decoder: per layer q, k, v, o (heads x head_dim wide), gate, up, down and two
    RMSNorm weights; the embedding, the final norm and an lm_head unless it is tied."""
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h


def vision_parameters(tower: dict, projector: dict, text_hidden: int) -> int:
    """Hand count of a Pixtral tower (patch conv without bias, ln_pre, per layer two norms, q k v o, gate up down)
    and Mistral3's projector (norm, 2x2 patch merger, two linears to the text width, no biases)."""
    h, i, p = tower["hidden_size"], tower["intermediate_size"], tower["patch_size"]
    assert projector["spatial_merge_size"] == 2 and not projector["multimodal_projector_bias"]
    tower_count = 3 * p * p * h + h + tower["num_hidden_layers"] * (2 * h + 4 * h * h + 3 * h * i)
    return tower_count + h + 4 * h * h + h * text_hidden + text_hidden * text_hidden


def transformers_parameters(class_name: str, config: dict, vision) -> int:
    """The parameters transformers' class has for `config`, built on the meta device (no memory is allocated)."""
    if vision is None:
        hf_config = transformers.AutoConfig.for_model("mistral", **config)
    else:  # the published checkpoints store lm_head: untied at the top level too
        text_class = transformers.Ministral3Config if config is MINISTRAL3_8B else transformers.MistralConfig
        hf_config = transformers.Mistral3Config(text_config=text_class(**config),
                                                vision_config=transformers.PixtralVisionConfig(**vision[0]),
                                                tie_word_embeddings=False, **vision[1])
    with torch.device("meta"):
        model = getattr(transformers, class_name)(hf_config)
    return sum(p.numel() for p in model.parameters())


def planned_parameters(preset: str, capsys) -> tuple[int, int]:
    """(trained model, carried untouched) counts `mistral-train plan recipe=mistral7b_qlora_sft model=PRESET` prints
    (no model.path: the preset's shape, its published vocabulary)."""
    assert main(["plan", "recipe=mistral7b_qlora_sft", f"model={preset}", "device_gib=24"]) == 0
    out = capsys.readouterr().out
    carried = re.search(r"carried untouched: ([\d,]+) parameters", out)
    return (int(re.search(r"model: ([\d,]+) parameters", out).group(1).replace(",", "")),
            int(carried.group(1).replace(",", "")) if carried else 0)


@pytest.mark.parametrize("preset", list(ROWS))
def test_preset_reproduces_the_published_config(preset):
    public, vision, _, _ = ROWS[preset]
    values = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    assert {k: values[k] for k in public} == public
    if vision is not None:  # the numbers plan needs, as published
        tower, projector = vision
        assert values["vision"] == {**{k: tower[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                             "patch_size", "num_channels")},
                                    **{k: projector[k] for k in ("spatial_merge_size", "multimodal_projector_bias")}}


@pytest.mark.parametrize("preset", list(ROWS))
def test_plan_counts_the_published_models_parameters(preset, capsys):
    public, vision, class_name, billions = ROWS[preset]
    text = decoder_parameters(public)
    tower = 0 if vision is None else vision_parameters(*vision, public["hidden_size"])
    assert planned_parameters(preset, capsys) == (text, tower)
    assert transformers_parameters(class_name, public, vision) == text + tower
    assert (text + tower) / 1e9 == pytest.approx(billions, rel=0.01)


def test_the_carried_vision_tower_takes_no_device_memory(capsys):
    """Small 3.2 plans as Small-24B does: the tower is counted, the rows are the language model's."""
    rows = {}
    for preset in ("mistral_small_24b", "mistral_small_3_2_24b"):
        assert main(["plan", "recipe=mistral7b_qlora_sft", f"model={preset}", "device_gib=24"]) == 0
        rows[preset] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("single")]
    assert rows["mistral_small_24b"] == rows["mistral_small_3_2_24b"] and len(rows["mistral_small_24b"]) == 1


@pytest.mark.parametrize("override, message", [("+model.vision.patch_sise=14", "unknown key(s) ['patch_sise']"),
                                               ("~model.vision.patch_size", "missing patch_size")])
def test_a_wrong_vision_key_is_one_line_naming_it(override, message, capsys):
    assert main(["plan", "recipe=mistral7b_qlora_sft", "model=mistral_small_3_2_24b", override]) == 2
    err = capsys.readouterr().err
    assert "model.vision" in err and message in err and err.count("\n") == 1


def test_the_ministral3_preset_is_transformers_own_ministral_3_8b_default():
    """transformers documents Ministral3Config's defaults as mistralai/Ministral-3-8B-Base-2512: a second witness."""
    default = transformers.Ministral3Config()
    assert {k: getattr(default, k) for k in MINISTRAL3_8B if k != "rope_theta"} == {
        k: v for k, v in MINISTRAL3_8B.items() if k != "rope_theta"}
    assert default.rope_parameters["rope_theta"] == MINISTRAL3_8B["rope_theta"]


@pytest.mark.parametrize("recipe, gpu_gib", [("ministral3_8b_qlora_sft", 16), ("mistral_small3_qlora_sft", 24)])
def test_vision_language_recipes_quote_their_plan_and_fit_the_gpu_they_name(recipe, gpu_gib, capsys):
    """`mistral-train plan recipe=R device_gib=G` (the preset's shape, no download): the single-GPU row fits, and
    the recipe's header quotes its total, the GPU and the carried tower."""
    assert main(["plan", f"recipe={recipe}", f"device_gib={gpu_gib}"]) == 0
    out = capsys.readouterr().out
    single = next(line.split() for line in out.splitlines() if line.startswith("single"))
    total, fits = single[6], single[-1]
    assert fits == "yes" and float(total) + 1 <= gpu_gib
    header = (Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml").read_text().split("defaults:")[0]
    carried = re.search(r"\(([\d.]+) B: vision tower", out).group(1)
    assert f"{total} GiB" in header and f"fits {gpu_gib} GiB" in header and f"device_gib={gpu_gib}" in header
    assert f"{carried} B carried untouched" in header
