"""VLLMEngine (mistral_train/rollout/vllm_engine.py): a live engine gives our generate's greedy output
before and after a weight push and after an adapter push, with generate's EOS convention."""

from __future__ import annotations

import sys

import pytest
import torch

from mistral_train.adapters import LoraConfig, apply_lora, save_adapter
from mistral_train.rollout import VLLMEngine
from tests.serving._served import bundled, close_engine, our_greedy, tiny_model, write_full_folder

PROMPTS = [[1, 415, 2936, 9060], [1, 6481, 4482, 1032, 1495, 28725, 736], [1, 22557]]  # ragged: no padding needed
NEW = 10


def ours(model, eos: int, prompts=PROMPTS, new: int = NEW) -> list[list[int]]:
    return [p + our_greedy(model, p, eos, new) for p in prompts]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tokenizer = bundled("v3")
    model = tiny_model(tokenizer.vocab_size, seed=5)
    folder = write_full_folder(model, tokenizer, tmp_path_factory.mktemp("rollout") / "final", "v3")
    live = VLLMEngine(folder, max_model_len=256, max_lora_rank=8)
    yield live, model, tokenizer
    close_engine(live.llm)


def test_greedy_equals_ours_and_stops_at_eos(engine):
    live, model, tokenizer = engine
    assert live.generate(PROMPTS, NEW) == ours(model, tokenizer.eos_id)
    # a stop id of our choosing: the 4th token our model emits for the first prompt; the row keeps it and stops
    stop = ours(model, tokenizer.eos_id)[0][len(PROMPTS[0]) + 3]
    got = live.generate(PROMPTS, NEW, eos_token_id=stop)
    assert got == ours(model, stop) and got[0][-1] == stop and len(got[0]) <= len(PROMPTS[0]) + 4
    # top_k=1 sampling at temperature 1 is greedy: the cut reaches vLLM
    assert live.generate(PROMPTS, NEW, temperature=1.0, top_k=1, seed=0) == ours(model, tokenizer.eos_id)
    # seeded sampling repeats, and each row of a repeated prompt has its own seed (a GRPO group differs)
    group = [PROMPTS[1]] * 2
    first = live.generate(group, NEW, temperature=1.0, seed=7)
    assert first == live.generate(group, NEW, temperature=1.0, seed=7) and first[0] != first[1]


def test_push_weights_then_adapter(engine, tmp_path):
    live, model, tokenizer = engine
    updated = tiny_model(tokenizer.vocab_size, seed=6)  # "after an optimizer step": other weights
    before = live.generate(PROMPTS, NEW)
    live.push_weights(updated)
    after = live.generate(PROMPTS, NEW)
    assert after == ours(updated, tokenizer.eos_id) and after != before
    with pytest.raises(ValueError, match="push_adapter"):
        live.push_weights(apply_lora(tiny_model(tokenizer.vocab_size, seed=6), LoraConfig(r=4, target_modules=["q_proj"])))
    # adapters on the pushed weights: each push is read afresh
    for step, seed in enumerate((8, 9)):
        adapted = apply_lora(tiny_model(tokenizer.vocab_size, seed=6), LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        live.push_adapter(save_adapter(adapted.eval(), tmp_path / f"adapter_{step}"))
        assert live.generate(PROMPTS, NEW) == ours(adapted, tokenizer.eos_id), f"adapter push {step}"


def test_missing_vllm_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM sees
    with pytest.raises(ImportError, match="scripts/setup_vllm.sh"):
        VLLMEngine(tmp_path)
