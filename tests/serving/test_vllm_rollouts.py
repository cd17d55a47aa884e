"""GRPO rollouts from vLLM (rollout.sampling.generate_completions with engine=VLLMEngine): greedy completions of
a left-padded prompt batch equal our own rollout (ids, mask through EOS, truncated flags), before and after the
policy's weights change and are pushed into the live engine, as the GRPO loop does after each update."""

from __future__ import annotations

import pytest
import torch

from mistral_train.config import GRPOSpec
from mistral_train.rollout import VLLMEngine
from mistral_train.rollout.sampling import generate_completions
from tests.conftest import pad_batch
from tests.serving._served import bundled, close_engine, tiny_model, write_full_folder

PROMPTS = [[1, 415, 2936, 9060], [1, 6481, 4482, 1032, 1495, 28725, 736], [1, 22557]]
PAD, NEW = 0, 10
GREEDY = GRPOSpec(num_generations=2, max_completion_length=NEW, temperature=0.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([torch.tensor(p) for p in PROMPTS], PAD, side="left")


def _eos_some_rows_reach(model) -> int:
    """A token some of our greedy rows emit and others do not: stops and truncation are both compared."""
    ids, mask = _batch()
    free = generate_completions(model, ids, mask, GRPOSpec(num_generations=1, max_completion_length=NEW,
                                                           temperature=0.0), -1, PAD, None).ids
    return next(t for t in free[0].tolist() if not all(bool((row == t).any()) for row in free))


def _assert_same(got, want, when: str) -> None:
    for name in ("ids", "mask", "truncated"):
        assert torch.equal(getattr(got, name), getattr(want, name)), (
            f"{when}, {name}: vLLM\n{getattr(got, name)}\nours\n{getattr(want, name)}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tokenizer = bundled("v3")
    model = tiny_model(tokenizer.vocab_size, seed=5)
    folder = write_full_folder(model, tokenizer, tmp_path_factory.mktemp("rollouts") / "final", "v3")
    live = VLLMEngine(folder, max_model_len=256)
    yield live, model
    close_engine(live.llm)


def test_greedy_rollout_equals_ours_before_and_after_a_weight_push(engine):
    live, model = engine
    ids, mask = _batch()
    eos = _eos_some_rows_reach(model)
    before = generate_completions(model, ids, mask, GREEDY, eos, PAD, None, engine=live)
    want = generate_completions(model, ids, mask, GREEDY, eos, PAD, None)
    assert want.truncated.any() and not want.truncated.all()
    _assert_same(before, want, "before the push")
    # "an optimizer step": the policy's weights move in place, then the loop pushes them
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    live.push_weights(model)
    after = generate_completions(model, ids, mask, GREEDY, eos, PAD, None, engine=live)
    _assert_same(after, generate_completions(model, ids, mask, GREEDY, eos, PAD, None), "after the push")
    assert not torch.equal(after.ids, before.ids), "the new weights gave the old completions: nothing was pushed"


def test_sampled_rollout_follows_the_generator(engine):
    live, model = engine
    ids, mask = _batch()
    spec = GRPOSpec(num_generations=3, max_completion_length=NEW, temperature=1.0, top_k=50, top_p=0.95)

    def draw(seed: int):
        return generate_completions(model, ids, mask, spec, 2, PAD, torch.Generator().manual_seed(seed), engine=live)

    first = draw(3)
    assert first.ids.shape[0] == len(PROMPTS) * 3
    assert torch.equal(draw(3).ids, first.ids), "the same generator state gave another rollout"
    # the copies of a prompt are separate samples, not one sample repeated
    assert any(not torch.equal(first.ids[i * 3], first.ids[i * 3 + 1]) for i in range(len(PROMPTS)))
