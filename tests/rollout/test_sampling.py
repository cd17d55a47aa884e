"""rollout.sampling.generate_completions: groups of num_generations consecutive completions per prompt,
right-padded ids, a mask through the first EOS, truncated flags, reproducible from the generator's state,
and at temperature 0 the greedy continuation `generate` gives each prompt alone."""

from __future__ import annotations

import torch

from mistral_train.config import GRPOSpec
from mistral_train.generate import generate
from mistral_train.rollout.sampling import completions_from_tokens, generate_completions
from tests.conftest import pad_batch

VOCAB, PAD = 128, 0
LENGTHS = [5, 2, 4]  # prompts of different lengths: a left-padded batch


def _model(our_model, tiny):
    return our_model(tiny(vocab_size=VOCAB), seed=3)


def _prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=gen) for n in LENGTHS]
    return pad_batch(rows, PAD, side="left")


def _eos_some_rows_reach(model, ids, mask, new: int) -> int:
    """A token that some greedy rows emit within `new` steps and others do not (so both cases are tested)."""
    free = generate(model, ids, new, attention_mask=mask)[:, ids.shape[1]:]
    for token in free[0].tolist():
        hits = [(row == token).any().item() for row in free]
        if not all(hits):
            return token
    raise AssertionError("every candidate token occurs in every row: pick other prompts")


def test_cut_after_first_eos_by_hand():
    tokens = torch.tensor([[5, 9, 7, 9, 4], [5, 6, 7, 8, 4], [9, 3, 3, 3, 3]])
    got = completions_from_tokens(tokens, eos_token_id=9, pad_id=0)
    assert got.ids.tolist() == [[5, 9, 0, 0, 0], [5, 6, 7, 8, 4], [9, 0, 0, 0, 0]]
    assert got.mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert got.truncated.tolist() == [False, True, False]


def test_shapes_groups_mask_and_truncation(our_model, tiny):
    model = _model(our_model, tiny)
    ids, mask = _prompts()
    greedy = GRPOSpec(num_generations=3, max_completion_length=12, temperature=0.0)
    eos = _eos_some_rows_reach(model, ids, mask, greedy.max_completion_length)
    spec = GRPOSpec(num_generations=3, max_completion_length=12, temperature=1.0, top_k=40, top_p=0.95)
    out = generate_completions(model, ids, mask, spec, eos, PAD, torch.Generator().manual_seed(0))
    N = len(LENGTHS) * 3
    assert out.ids.shape == out.mask.shape and out.ids.shape[0] == N and out.ids.shape[1] <= 12
    assert out.ids.dtype == out.mask.dtype == torch.long and out.truncated.shape == (N,)
    for row in range(N):
        n = int(out.mask[row].sum())
        assert out.mask[row, :n].all() and not out.mask[row, n:].any(), f"row {row}: mask is not a prefix"
        assert (out.ids[row, n:] == PAD).all(), f"row {row}: not right-padded after its completion"
        has_eos = bool((out.ids[row, :n] == eos).any())
        assert has_eos == (not out.truncated[row]), f"row {row}: truncated flag disagrees with its EOS"
        if has_eos:
            assert out.ids[row, n - 1] == eos and not (out.ids[row, : n - 1] == eos).any(), f"row {row}"
        else:
            assert n == 12, f"row {row}: no EOS yet shorter than max_completion_length"
    # greedy: each group is its prompt's one continuation, repeated; the EOS choice gives both outcomes
    out = generate_completions(model, ids, mask, greedy, eos, PAD, None)
    for prompt in range(len(LENGTHS)):
        group = out.ids[prompt * 3: prompt * 3 + 3]
        assert (group == group[0]).all(), f"prompt {prompt}'s greedy group differs within itself"
    assert out.truncated.any() and not out.truncated.all()


def test_temperature_zero_equals_greedy_generate_row_by_row(our_model, tiny):
    model = _model(our_model, tiny)
    ids, mask = _prompts(seed=2)
    eos = _eos_some_rows_reach(model, ids, mask, 10)
    spec = GRPOSpec(num_generations=2, max_completion_length=10, temperature=0.0)
    out = generate_completions(model, ids, mask, spec, eos, PAD, None)
    for prompt, n in enumerate(LENGTHS):
        alone = generate(model, ids[prompt, -n:].tolist(), 10, eos_token_id=eos)[0, n:]  # this prompt unpadded, by itself
        for copy in range(2):
            row = prompt * 2 + copy
            got = out.ids[row, : int(out.mask[row].sum())]
            assert got.tolist() == alone.tolist(), f"prompt {prompt}, copy {copy}: {got.tolist()} != {alone.tolist()}"


def test_generator_state_decides_the_rollout(our_model, tiny):
    model = _model(our_model, tiny).train()  # the loop's model is in training mode: generation must not change that
    ids, mask = _prompts(seed=4)
    spec = GRPOSpec(num_generations=4, max_completion_length=8, temperature=1.0)

    def draw(gen):
        return generate_completions(model, ids, mask, spec, eos_token_id=2, pad_id=PAD, generator=gen)

    first = draw(torch.Generator().manual_seed(11))
    torch.manual_seed(999)  # the global RNG must not matter
    again = draw(torch.Generator().manual_seed(11))
    assert torch.equal(first.ids, again.ids) and torch.equal(first.mask, again.mask)
    assert model.training, "generate_completions left the policy in eval mode"
    # a generator's saved state (what a checkpoint keeps) replays the next rollout exactly
    gen = torch.Generator().manual_seed(12)
    state = gen.get_state()
    second = draw(gen)
    assert torch.equal(draw(torch.Generator().set_state(state)).ids, second.ids)
    assert not torch.equal(draw(gen).ids, second.ids), "the generator did not advance"
    # sampled copies of one prompt differ: a group is not one sample repeated
    assert any(not torch.equal(first.ids[i * 4], first.ids[i * 4 + 1]) for i in range(len(LENGTHS)))

