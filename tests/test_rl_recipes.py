"""The online-RL recipes: tiny_grpo run end to end on CPU, shortened, raises held-out exact match above the
SFT model's; the 7B QLoRA GRPO and Mistral-Nemo tool-use GRPO recipes compose and pass the checks a run makes
before it reads weights (the GRPO settings, the batch shape, the reward functions built, Tekken's included)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import mistral_common
import pytest

from mistral_train import MistralConfig
from mistral_train.cli import main
from mistral_train.config import load_run_config
from mistral_train.data.formats import detect_format
from mistral_train.data.prompt_batches import prompts_per_batch
from mistral_train.data.spec import Batching
from mistral_train.rollout.rewards import build_rewards
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer, resolve_tokenizer_path
from mistral_train.train.objectives import OBJECTIVES
from mistral_train.train.online import check_spec
from mistral_train.train.preflight import check_stage

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tiny_grpo_raises_held_out_exact_match_above_the_sft_models(tmp_path):
    # tiny_grpo as it is (model, data, reward), its pretraining and SFT stages shortened as in
    # tests/test_recipes.py (30 + 120 steps: exact match ~0.1-0.3 on the 102 held-out word lists), then 10 GRPO
    # steps.
    # The GRPO stage scores its starting model at step 0: that is the SFT model, on the same held-out lists.
    short = ["recipe=tiny_grpo", "trainer.max_steps=30", "trainer.batch_size=4", "trainer.max_seq_len=128",
             "tracking.progress_bar=false", "tracking.plot=false", "stages.sft.trainer.max_steps=120",
             "+stages.sft.trainer.batch_size=8", "stages.sft.trainer.eval_every=null",
             "stages.grpo.trainer.eval_every=null",
             # trainer.* above reaches every stage: GRPO keeps the recipe's 16 prompts x 8 completions a step
             "stages.grpo.trainer.batch_size=128", "stages.grpo.trainer.max_steps=10"]
    assert main([f"run.dir={tmp_path}", *short]) == 0
    sft = [r for r in _metrics(tmp_path / "tiny_grpo" / "sft") if "exact_match" in r]
    grpo = [r for r in _metrics(tmp_path / "tiny_grpo" / "grpo") if "exact_match" in r]
    before, after = grpo[0], grpo[-1]
    assert before["step"] == 0 and before["exact_match"] == sft[-1]["exact_match"]  # the SFT model, greedy
    rewards = [r["reward"] for r in _metrics(tmp_path / "tiny_grpo" / "grpo") if "reward" in r]
    assert after["exact_match"] > before["exact_match"], (before, after, rewards)


def _checked(recipe: str, overrides: list[str], vocab: int):
    """What a GRPO run checks before it reads weights or data, on the recipe's composed config."""
    cfg = load_run_config(recipe, overrides)
    assert cfg.run.name == recipe and cfg.trainer.objective == "grpo" and cfg.data.format == "auto"
    assert detect_format({"prompt": "q", "answer": "a"}) == "prompt_only"  # what auto makes of a prompt row
    assert OBJECTIVES[cfg.trainer.objective].data_kind == "prompt" and cfg.adapter.kind == "qlora"
    # the recipe's published shape as the folder's config.json (as in tests/test_plan.py)
    (Path(cfg.model.path) / "config.json").write_text(json.dumps(MistralConfig.from_spec(cfg.model, vocab_size=vocab)
                                                                 .to_hf_dict()))
    check_stage(replace(cfg, trainer=replace(cfg.trainer, device="cpu")))  # preflight, save that we have no CUDA
    check_spec(cfg.trainer.grpo, rloo=False)
    batching = Batching(False, cfg.trainer.max_seq_len, 0, cfg.trainer.batch_size,
                        group_size=cfg.trainer.grpo.num_generations)
    assert prompts_per_batch(batching) >= 1
    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.model.tokenizer, cfg.model.path))
    return cfg, build_rewards(cfg.trainer.grpo, tokenizer)


def _model_folder(folder: Path, tokenizer: Path, name: str) -> Path:
    """A model folder without weights (an empty safetensors file: preflight reads no weights), its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"")
    shutil.copy(tokenizer, folder / name)
    return folder


def test_mistral7b_qlora_grpo_composes_and_its_rewards_build(tmp_path):
    folder = _model_folder(tmp_path / "m7b", bundled_tokenizer_path("v3"), "tokenizer.model")
    cfg, rewards = _checked("mistral7b_qlora_grpo", [f"model.path={folder}", "data.path=prompts.jsonl"], 32768)
    assert rewards.names == ["exact_answer", "length_penalty"] and rewards.weights.tolist() == pytest.approx([1.0, 0.1])


def test_mistral_nemo_tool_grpo_composes_with_a_tekken_folder_and_its_tool_reward_builds(tmp_path):
    folder = _model_folder(tmp_path / "nemo", TEKKEN, "tekken.json")
    cfg, rewards = _checked("mistral_nemo_qlora_tool_grpo", [f"model.path={folder}", "data.path=tools.jsonl"], 131072)
    assert rewards.names == ["tool_call_match"]
    assert rewards.functions[0].kwargs == {"tokenizer": str(folder)}  # parsed with the model's own tekken.json
    assert load_tokenizer(folder).chat_format(None) == "v3" and cfg.model.vocab_size == 131072
