"""GRPO under DDP with 2 CPU processes (accelerate launch): each process samples its own micro-batches, the
rewards and token counts of the window are gathered (batch-scaled advantages, dapo's window normaliser), and
the run equals one process with the same global batch (grad_accum_steps 2): per-step losses, rewards and the
final weights. The rollout seeds one generator per micro-batch by its place in the window, so both runs sample
the same completions."""

from __future__ import annotations

import json

import pytest

WORDS = ["cat", "dog", "sun", "moon", "tree", "ship", "red", "blue", "one", "two", "fish", "bird"]


def _grpo(data, launch) -> list[str]:
    """The distributed tests' tiny SFT overrides (2 completions a micro-batch, 6 steps, checkpoints at 3 and 6),
    turned into GRPO on `data`: one prompt x 2 completions a micro-batch, a length reward with spread."""
    reward = "[{function:'mistral_train.rollout.rewards:length_penalty',kwargs:{target_length:8}}]"
    tiny = [a for a in launch.overrides("sft", data.parent)[1:] if not a.startswith("data.")]
    return ["recipe=tiny_sft", *tiny, f"data.path={data}", "data.format=prompt_only", "data.eval_fraction=0.0",
            "trainer.objective=grpo", "trainer.grpo.num_generations=2", "trainer.grpo.max_completion_length=6",
            "trainer.grpo.loss_type=dapo", "trainer.grpo.scale_rewards=batch", "trainer.grpo.beta=0.04",
            f"trainer.grpo.reward_funcs={reward}", "trainer.eval_max_new_tokens=0"]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, launch):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in WORDS))
    args = _grpo(data, launch)
    one = launch.fit_here(tmp_path, "one", [*args, "trainer.grad_accum_steps=2"])
    two = launch.run(tmp_path, "two", [*args, "trainer.grad_accum_steps=1"])
    rows = {name: [r for r in launch.metrics(run) if "loss" in r] for name, run in (("one", one), ("two", two))}
    assert len(rows["two"]) == launch.MAX_STEPS
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("reward", "completions/mean_length", "kl"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        assert b["grad_norm"] > 0
    launch.assert_same_run(two, one, atol=1e-5)
