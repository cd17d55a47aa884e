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

# preset -> (published config, transformers class, published round figure in billions and where it is published)
ROWS = {
    "mistral_nemo_12b": (NEMO, "MistralForCausalLM", 12.2),  # the Hub's model size of Mistral-Nemo-Base-2407
    "mistral_small_24b": (SMALL_24B, "MistralForCausalLM", 23.6),  # the Hub's size of Mistral-Small-24B-Base-2501
}


def decoder_parameters(c: dict) -> int:
    """Hand count of a Mistral decoder: per layer q, k, v, o (heads x head_dim wide), gate, up, down and two
    RMSNorm weights; the embedding, the final norm and an lm_head unless it is tied."""
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    return c["num_hidden_layers"] * layer + c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + h


def transformers_parameters(class_name: str, config: dict) -> int:
    """The parameters transformers' class has for `config`, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = getattr(transformers, class_name)(transformers.AutoConfig.for_model("mistral", **config))
    return sum(p.numel() for p in model.parameters())


def planned_parameters(preset: str, capsys) -> int:
    """The count `mistral-train plan recipe=mistral7b_qlora_sft model=PRESET` prints (no model.path: the preset's
    shape, its published vocabulary)."""
    assert main(["plan", "recipe=mistral7b_qlora_sft", f"model={preset}", "device_gib=24"]) == 0
    out = capsys.readouterr().out
    return int(re.search(r"model: ([\d,]+) parameters", out).group(1).replace(",", ""))


@pytest.mark.parametrize("preset", list(ROWS))
def test_preset_reproduces_the_published_config(preset):
    public, _, _ = ROWS[preset]
    values = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    assert {k: values[k] for k in public} == public


@pytest.mark.parametrize("preset", list(ROWS))
def test_plan_counts_the_published_models_parameters(preset, capsys):
    public, class_name, billions = ROWS[preset]
    by_hand = decoder_parameters(public)
    assert planned_parameters(preset, capsys) == by_hand
    assert transformers_parameters(class_name, public) == by_hand
    assert by_hand / 1e9 == pytest.approx(billions, rel=0.01)
