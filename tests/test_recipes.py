"""The CPU recipes run end to end from the command line, shortened: every stage leaves its run folder."""

import json

import pytest

from mistral_train.cli import main
from mistral_train.train.stages import summarize

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


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_default_recipe_raises_held_out_exact_match_from_the_pretrained_to_the_fine_tuned_model(tmp_path):
    # The default recipe as it is (model, data, lr schedule), shortened: 30 pretraining steps on rows of 128
    # tokens, 4 per step, and 120 SFT steps. The SFT stage evaluates the pretrained model at step 0
    # (eval_before_training) and the fine-tuned one at the end, on the 102 held-out word lists, whose word
    # pairs never appear in training: a right answer is a learned skill (first word, last word, count).
    short = ["trainer.max_steps=30", "trainer.batch_size=4", "trainer.max_seq_len=128", "tracking.progress_bar=false",
             "tracking.plot=false", "stages.sft.trainer.max_steps=120", "stages.sft.trainer.batch_size=8",
             "stages.sft.trainer.eval_every=null"]
    assert main([f"run.dir={tmp_path}", *short]) == 0
    rows = [r for r in _metrics(tmp_path / "tiny_pretrain_sft" / "sft") if "exact_match" in r]
    before, after = rows[0], rows[-1]
    assert (before["step"], after["step"]) == (0, 120)
    assert after["eval_loss"] < before["eval_loss"] / 2
    assert before["exact_match"] == 0.0 and after["exact_match"] >= 0.1


def test_tiny_dpo_raises_held_out_preference_accuracy_above_a_coin_flip(tmp_path):
    # tiny_dpo as it is, its pretraining and SFT stages shortened as above and DPO to 30 steps (~40 s).
    # Held-out pairs ask about unseen facts; half reject an answer of the wrong kind, which the
    # policy can learn to push down from the training pairs: measured 0.66 at the end (0.5 = chance).
    short = ["recipe=tiny_dpo", "trainer.max_steps=30", "trainer.batch_size=4", "trainer.max_seq_len=128",
             "tracking.progress_bar=false", "tracking.plot=false", "stages.sft.trainer.max_steps=60",
             "+stages.sft.trainer.batch_size=4", "stages.dpo.trainer.max_steps=30",
             "stages.dpo.trainer.batch_size=16"]  # trainer.batch_size reaches every stage; DPO keeps its 16 pairs
    assert main([f"run.dir={tmp_path}", *short]) == 0
    rows = [r for r in _metrics(tmp_path / "tiny_dpo" / "dpo") if "eval_loss" in r]
    before, after = rows[0], rows[-1]
    assert (before["step"], after["step"]) == (0, 30)
    assert before["eval_rewards/margins"] == 0 and before["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert after["eval_rewards/accuracies"] > 0.55 and after["eval_rewards/margins"] > 0
    assert after["eval_loss"] < before["eval_loss"] - 0.02


def _write_metrics(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_staged_run_ends_with_a_before_after_table_and_the_last_sample(tmp_path):
    _write_metrics(tmp_path / "pretrain", [{"step": 5, "loss": 9.0}, {"step": 100, "loss": 2.0}])
    _write_metrics(tmp_path / "sft", [{"step": 0, "eval_loss": 8.5, "exact_match": 0.0},
                                      {"step": 5, "loss": 3.0}, {"step": 30, "loss": 2.5, "exact_match": float("nan")},
                                      {"step": 60, "loss": 1.0, "eval_loss": 0.5, "exact_match": 0.8}])
    _write_metrics(tmp_path / "again", [{"step": 10, "loss": 1.0, "eval_loss": 0.4, "exact_match": 0.9}])
    (tmp_path / "pretrain" / "sample.txt").write_text("The cat sat\n")
    (tmp_path / "sft" / "sample.txt").write_text("[INST] Reverse: cat moon [/INST] moon cat\n")
    header, pretrain, sft, again, sample = summarize(tmp_path, ["pretrain", "sft", "again"]).splitlines()
    # columns only for what some stage logged: no preference accuracy here
    assert header.split("  ")[0] == "stage" and "held-out exact match" in header and "preference" not in header
    assert pretrain.split() == ["pretrain", "9.000", "->", "2.000", "-", "-"]
    # before = the step-0 evaluation (the model the stage started from), after = its last one
    assert "0.00 -> 0.80" in sft and "8.500 -> 0.500" in sft and "3.000 -> 1.000" in sft
    assert "- -> 0.90" in again and "- -> 0.400" in again  # no step-0 evaluation: no "before"
    # the sample of the last stage that wrote one
    assert sample == "sample (sft): [INST] Reverse: cat moon [/INST] moon cat"
