"""The CPU recipes run end to end from the command line, shortened: every stage leaves its run folder."""

import json

import pytest

from mistral_train.cli import main

SHORT = ["trainer.max_steps=3", "trainer.max_seq_len=64", "trainer.batch_size=2", "tracking.progress_bar=false",
         "trainer.sample_max_new_tokens=2", "model.hidden_size=64", "model.intermediate_size=128",
         "model.num_hidden_layers=2"]
SHORT_SFT = ["stages.sft.trainer.max_steps=3", "stages.sft.trainer.eval_max_new_tokens=2",
             "stages.sft.trainer.sample_max_new_tokens=2"]


@pytest.mark.parametrize("recipe, adapter", [("tiny_lora_sft", "lora"), ("tiny_qlora_sft", "qlora")])
def test_tiny_adapter_recipes_pretrain_then_train_an_adapter_and_merge_it(tmp_path, recipe, adapter):
    assert main([f"recipe={recipe}", f"run.dir={tmp_path}", *SHORT, *SHORT_SFT]) == 0
    home = tmp_path / recipe
    assert (home / "pretrain" / "final" / "model.safetensors").is_file()
    sft = home / "sft"
    config = json.loads((sft / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(home / "pretrain" / "final")
    note = json.loads((sft / "final" / "mistral_train_base.json").read_text())
    assert note["quantize"] == ("nf4" if adapter == "qlora" else None)
    assert (sft / "merged" / "model.safetensors").is_file() and (sft / "merged" / "tokenizer.model").is_file()
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 0 and "exact_match" in r for r in rows) and rows[-1]["step"] == 3


def test_an_adapter_recipe_given_a_model_skips_pretraining(tmp_path):
    assert main(["recipe=tiny_lora_sft", f"run.dir={tmp_path}", "run.name=first", *SHORT, *SHORT_SFT]) == 0
    base = tmp_path / "first" / "pretrain" / "final"
    assert main(["recipe=tiny_lora_sft", f"run.dir={tmp_path}", "run.name=second", f"model.path={base}",
                 *SHORT, *SHORT_SFT]) == 0
    assert not (tmp_path / "second" / "pretrain").exists()
    config = json.loads((tmp_path / "second" / "sft" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
