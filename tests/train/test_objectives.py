"""The objective table: each entry says what its objective needs, and adding one is an entry plus its loss."""

import json
import re

import pytest
import torch

from mistral_train.data.sources import bundled_chat_path
from mistral_train.config import DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.data.formats import KIND_NAMES
from mistral_train.errors import ConfigError
from mistral_train.train.preflight import check_stage
from mistral_train.train.loop import fit
from mistral_train.train.objectives import OBJECTIVES, ObjectiveEntry, loss_label, objective_entry
from mistral_train.train.steps import Objective, StepOutput, count_label_tokens, pretrain_step

WEIGHT = 0.25


def weighted_sft_step(model, batch) -> StepOutput:
    """The toy objective's loss: SFT's summed cross-entropy, weighted."""
    out = pretrain_step(model, batch, loss_chunk_size=16)
    return StepOutput(WEIGHT * out.loss_sum, out.n_units)


@pytest.fixture
def weighted_sft(monkeypatch):
    """A new objective, added as one entry (and its loss above) with no edit anywhere else."""
    entry = ObjectiveEntry(lambda *_: Objective(weighted_sft_step, count_label_tokens), "chat", generates=False,
                           loss_label=lambda _: ("weighted loss", "weighted cross-entropy"))
    monkeypatch.setitem(OBJECTIVES, "weighted_sft", entry)
    return entry


def _run(tmp_path, objective: str) -> RunConfig:
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(bundled_chat_path().read_text().splitlines()[:8]) + "\n")
    model = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    trainer = TrainerSpec(objective=objective, max_steps=2, max_seq_len=64, batch_size=2, warmup_steps=1, log_every=1,
                          sample_max_new_tokens=3)
    return RunConfig(model=model, trainer=trainer, data=DataSpec(path=str(chat), format="auto"),
                     run=RunSpec(name=objective, dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False))


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_toy_objective_added_as_one_entry_trains_with_its_own_loss(tmp_path, weighted_sft):
    toy = fit(_run(tmp_path, "weighted_sft"))
    sft = fit(_run(tmp_path, "sft"))
    toy_losses, sft_losses = _losses(toy), _losses(sft)
    assert len(toy_losses) == 2
    # the same model, batches and seed; AdamW's update does not see the loss's scale (up to eps), so the run
    # follows SFT's weights and logs its weighted loss at every step
    assert toy_losses == pytest.approx([WEIGHT * loss for loss in sft_losses], rel=1e-4)
    assert toy_losses[0] != pytest.approx(sft_losses[0], rel=0.1)
    # the rest of the run read the entry: no greedy sample for an objective that does not generate
    assert (sft / "sample.txt").is_file() and not (toy / "sample.txt").exists()
    assert (toy / "final" / "model.safetensors").is_file() and (toy / "loss.png").is_file()
    assert loss_label("weighted_sft") == ("weighted loss", "weighted cross-entropy")


def test_a_toy_objective_refuses_data_of_another_kind_naming_its_own_kind(tmp_path, weighted_sft):
    cfg = _run(tmp_path, "weighted_sft")
    text = tmp_path / "corpus.txt"
    text.write_text("plain words\n")
    cfg.data = DataSpec(path=str(text), format="auto")
    with pytest.raises(ValueError, match=f"holds {KIND_NAMES['text']}, but trainer.objective=weighted_sft trains "
                                         f"on {KIND_NAMES['chat']}.*with trainer.objective=pretrain$"):
        fit(cfg)


@pytest.mark.parametrize("name, kind, task, generates, perplexity, padded_only", [
    ("pretrain", "text", "causal_lm", True, True, False),
    ("sft", "chat", "causal_lm", True, True, False),
    ("dpo", "preference", "causal_lm", True, False, False),
    ("reward", "preference", "sequence_classification", False, False, True),
    ("grpo", "prompt", "causal_lm", True, False, False),
    ("rloo", "prompt", "causal_lm", True, False, False)])
def test_each_entry_says_what_its_objective_needs(name, kind, task, generates, perplexity, padded_only):
    entry = objective_entry(name)
    assert (entry.data_kind, entry.task, entry.generates, entry.perplexity, entry.padded_only) == (
        kind, task, generates, perplexity, padded_only)
    assert entry.chat == (kind != "text")  # samples are prompted in the chat template when the data is conversations
    assert (entry.reference is not None) == (name in ("dpo", "grpo", "rloo"))  # grpo/rloo: when beta > 0


def test_the_table_builds_each_objectives_step_from_the_run_config():
    cfg = RunConfig()
    cfg.trainer.loss_chunk_size = 7
    lm = objective_entry("pretrain").build(cfg, None, None, 0, None)
    assert lm.step.keywords == {"loss_chunk_size": 7} and lm.count is count_label_tokens
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "sequence_index": torch.tensor([[0, 1]]),
             "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    assert objective_entry("reward").build(cfg, None, None, 0, None).count(batch) == 1  # reward counts pairs


def test_unknown_objective_is_refused_naming_the_table():
    with pytest.raises(ValueError, match=r"trainer.objective 'ppo' is not available; expected one of "
                                         + re.escape(str(list(OBJECTIVES)))):
        objective_entry("ppo")
    cfg = RunConfig()
    cfg.trainer.objective = "ppo"
    with pytest.raises(ConfigError, match="trainer.objective=ppo is unknown; expected one of "
                                          + re.escape(", ".join(OBJECTIVES))):
        check_stage(cfg)


def test_preflight_resolves_the_reference_of_an_entry_that_has_one(monkeypatch):
    cfg = RunConfig()
    cfg.trainer.objective = "dpo"
    cfg.trainer.dpo.reference = "adapter_off"  # needs adapters: full fine-tuning has none to switch off
    with pytest.raises(ConfigError, match="trainer.dpo.reference=adapter_off needs adapter=lora or qlora"):
        check_stage(cfg)
    seen = []
    monkeypatch.setitem(OBJECTIVES, "toy", ObjectiveEntry(lambda *_: None, "chat", reference=seen.append))
    cfg.trainer.objective = "toy"
    check_stage(cfg)
    assert seen == [cfg]


def test_loss_labels_come_from_the_table_and_default_to_cross_entropy():
    assert loss_label("sft") == loss_label("no-such-objective") == ("loss", "cross-entropy (nats/token)")
    assert loss_label("dpo", ["sigmoid", "sft"]) == ("DPO loss", "DPO loss (sigmoid+sft), mean per pair")
