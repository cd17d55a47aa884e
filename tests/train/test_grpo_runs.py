"""GRPO and RLOO through fit() on a tiny model with the real v1 tokenizer: the run trains (finite loss, a
gradient, trl's reward metrics logged), resumes exactly mid-window (weights and metrics equal a straight run,
the generation RNG and the reused window included), trains a LoRA adapter, and refuses chat rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mistral_train.config import (AdapterSpec, DataSpec, GRPOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec,
                                  TrainerSpec)
from mistral_train.errors import DataError
from mistral_train.train import fit

REWARD = "tests.train.test_grpo_runs:short_completion"


def short_completion(prompts, completions, **_columns):
    """Reward: the shorter the better (rewards read the decoded texts; conversational rows get message lists)."""
    return [-float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


def _prompts(folder, n=12):
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n"
                            for w in ["cat", "dog", "sun", "moon", "tree", "ship", "red", "blue", "one", "two",
                                      "fish", "bird"][:n]))
    return path


def _run(tmp_path, base, name, *, objective="grpo", adapter="none", steps=3, save_every=0, resume=None,
         grad_accum_steps=1, data=None, **grpo) -> RunConfig:
    spec = GRPOSpec(**{"num_generations": 4, "max_completion_length": 6, "reward_funcs": [REWARD], **grpo})
    trainer = TrainerSpec(objective=objective, max_steps=steps, max_seq_len=64, batch_size=8,
                          grad_accum_steps=grad_accum_steps, lr=1e-2, warmup_steps=0, weight_decay=0.0, log_every=1,
                          save_every=save_every, eval_max_new_tokens=0, sample_max_new_tokens=1, grpo=spec)
    return RunConfig(model=ModelSpec(path=str(base)),
                     data=DataSpec(path=str(data or _prompts(tmp_path)), format="auto", packing=False),
                     trainer=trainer, adapter=AdapterSpec(kind=adapter, r=4, alpha=8),
                     run=RunSpec(name=name, dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False, plot=False),
                     resume=resume)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_fit_trains_and_logs_trls_metrics(tmp_path, tiny_base_folder):
    rows = [r for r in _rows(fit(_run(tmp_path, tiny_base_folder, "grpo", beta=0.04, loss_type="dapo")))
            if "loss" in r]
    assert len(rows) == 3
    for row in rows:
        assert torch.isfinite(torch.tensor(row["loss"])) and row["grad_norm"] > 0
        for key in ("reward", "reward_std", f"rewards/short_completion/mean", "completions/mean_length",
                    "clip_ratio/region_mean", "kl"):
            assert key in row, key
        assert row["reward"] == pytest.approx(row["rewards/short_completion/mean"])  # one function, weight 1
        assert row["reward"] < 0  # -len(text): the functions' score, not the advantage
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert rows[-1]["kl"] > 0


def test_rloo_fit_trains(tmp_path, tiny_base_folder):
    rows = [r for r in _rows(fit(_run(tmp_path, tiny_base_folder, "rloo", objective="rloo", steps=2, beta=0.05)))
            if "loss" in r]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 and "reward" in r for r in rows)


def test_resume_mid_window_is_exact(tmp_path, tiny_base_folder):
    """num_iterations 3: the checkpoint at step 2 falls inside the first window; 2 steps + resume 2 equals 4
    straight steps (weights and every logged metric)."""
    data = _prompts(tmp_path)
    straight = fit(_run(tmp_path, tiny_base_folder, "straight", steps=4, save_every=2, num_iterations=3, data=data))
    resumed = fit(_run(tmp_path, tiny_base_folder, "resumed", steps=4, num_iterations=3, data=data,
                       resume=str(straight / "checkpoints" / "step_2")))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "reward", "grad_norm", "completions/mean_length")
    want = {r["step"]: [r[k] for k in keys] for r in _rows(straight) if "loss" in r and r["step"] > 2}
    got = {r["step"]: [r[k] for k in keys] for r in _rows(resumed) if "loss" in r}
    assert got == want and sorted(got) == [3, 4]


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_lora_grpo_trains_the_adapter_only(tmp_path, tiny_base_folder, adapter):
    """The reference is the adapter switched off (kl 0 at step 1); every step has a gradient; B moved from 0."""
    run = fit(_run(tmp_path, tiny_base_folder, adapter, adapter=adapter, steps=2, beta=0.04))
    rows = [r for r in _rows(run) if "loss" in r]
    assert all(r["grad_norm"] > 0 for r in rows) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # every B starts at 0: each took a gradient


def test_chat_rows_are_refused_with_the_data_kind_message(tmp_path, tiny_base_folder):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises((DataError, ValueError), match="trainer.objective=grpo trains on prompts"):
        fit(_run(tmp_path, tiny_base_folder, "chat", data=chat))


def test_sharded_strategies_are_refused_naming_the_setting(monkeypatch, tmp_path, tiny_base_folder):
    """generate() reads the embeddings and head outside the sharded blocks' forwards: fsdp2/zero3 are refused
    before the first rollout, in one line naming trainer.strategy."""
    from types import SimpleNamespace

    from mistral_train.dist.strategy import Strategy
    from mistral_train.errors import ConfigError
    from mistral_train.train.online import build_online

    accelerator = SimpleNamespace(strategy=Strategy("fsdp2", 2), num_processes=2)
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp2 shards it; use ddp or zero2"):
        build_online(_run(tmp_path, tiny_base_folder, "fsdp2"), None, None, 0, accelerator, rloo=False)
