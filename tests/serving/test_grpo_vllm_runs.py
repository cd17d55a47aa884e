"""GRPO through fit() with trainer.grpo.rollout_engine=vllm: completions are sampled by a live vLLM engine that
is handed the policy as it is before every rollout (the weights for full fine-tuning, the adapter folder for
LoRA), and the run trains on them. Runs in .venv-vllm (scripts/test.sh), like the rest of tests/serving.

Each run goes in a process of its own: fit() ends the process group its vLLM engine set up in this process (the
Accelerator's release), so a second in-process engine would find vLLM's group state stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from mistral_train.config import (AdapterSpec, DataSpec, GRPOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec,
                                  TrainerSpec)
from mistral_train.rollout.vllm_engine import VLLMEngine
from mistral_train.train import fit
from tests._tiny import save_tiny_folder
from tests._tokenizers import bundled

LENGTH = [{"function": "mistral_train.rollout.rewards:length_penalty", "kwargs": {"target_length": 8}}]


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_a_vllm_rollout_run_pushes_the_policy_before_each_rollout_and_trains(tmp_path, adapter):
    done = subprocess.run([sys.executable, "-m", "tests.serving.test_grpo_vllm_runs", adapter, str(tmp_path)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "vllm run ok" in done.stdout


def _run_case(adapter: str, tmp_path: Path) -> None:
    # head_dim 64: vLLM's CPU attention has no kernel for the 16 of the usual tiny base
    base = save_tiny_folder(tmp_path / "base", seed=0, tokenizer="v1", vocab_size=bundled("v1").vocab_size,
                            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, sliding_window=None, max_position_embeddings=256,
                            initializer_range=0.1)
    data = tmp_path / "prompts.jsonl"
    words = ["cat", "dog", "sun", "sea"]
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in words))
    spec = GRPOSpec(num_generations=2, max_completion_length=6, reward_funcs=LENGTH, rollout_engine="vllm",
                    num_iterations=2, beta=0.04)
    cfg = RunConfig(model=ModelSpec(path=str(base)), data=DataSpec(path=str(data), format="prompt_only"),
                    trainer=TrainerSpec(objective="grpo", max_steps=4, max_seq_len=64, batch_size=4, lr=1e-2,
                                        warmup_steps=0, log_every=1, eval_max_new_tokens=0, sample_max_new_tokens=1,
                                        grpo=spec),
                    adapter=AdapterSpec(kind=adapter, r=4, alpha=8), run=RunSpec(name=adapter, dir=str(tmp_path)),
                    tracking=TrackingSpec(progress_bar=False, plot=False))
    push = "push_adapter" if adapter == "lora" else "push_weights"
    with mock.patch.object(VLLMEngine, push, autospec=True, side_effect=getattr(VLLMEngine, push)) as pushed:
        run = fit(cfg)
    assert pushed.call_count == 2  # one rollout every num_iterations=2 steps, each after the latest update
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 4 and all(r["grad_norm"] > 0 and "reward" in r for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0
    print("vllm run ok")


if __name__ == "__main__":
    _run_case(sys.argv[1], Path(sys.argv[2]))
