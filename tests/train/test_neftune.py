"""NEFTune (train/neftune.py) against its formula: each embedding entry gets U(-1, 1) * alpha / sqrt(L * H),
L the real length of the token's sequence, H the hidden size; only in training forwards; the uniform draw
comes from torch's global generator (so a restored RNG state replays it)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mistral_train.train.neftune import NEFTune, sequence_lengths

VOCAB, H, ALPHA = 50, 8, 5.0


class Embedder(nn.Module):
    """The one part of the model NEFTune touches: `model.model.embed_tokens`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, H)


def _embed_step(model, batch):
    return model.model.embed_tokens(batch["input_ids"])


def _noised(batch, seed=7, train=True):
    """(what the wrapped step returns, the clean embeddings) for `batch` under a fresh NEFTune."""
    model = Embedder().train(train)
    neftune = NEFTune(ALPHA)
    neftune.attach(model)
    step = neftune.wrap(SimpleNamespace(step=_embed_step, count=lambda b: 0)).step
    torch.manual_seed(seed)
    out = step(model, batch)
    with torch.no_grad():
        clean = nn.functional.embedding(batch["input_ids"], model.model.embed_tokens.weight)
    return out, clean


def _expected_noise(shape, lengths, seed=7):
    """The hand formula: the same global-generator draw, scaled by alpha / sqrt(L * H) per token."""
    torch.manual_seed(seed)
    uniform = torch.empty(shape).uniform_(-1.0, 1.0)
    return uniform * (ALPHA / torch.sqrt(torch.as_tensor(lengths, dtype=torch.float32) * H)).unsqueeze(-1)


def test_padded_rows_are_noised_by_their_unpadded_length():
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out, clean = _noised({"input_ids": ids, "attention_mask": mask})
    lengths = [[6.0] * 6, [3.0] * 6]  # row 2 has 3 real tokens: its noise is sqrt(2) larger, padding or not
    torch.testing.assert_close(out - clean, _expected_noise((2, 6, H), lengths), rtol=0, atol=1e-6)
    assert (out - clean)[1].abs().max() > ALPHA / (6 * H) ** 0.5  # beyond row 1's bound: L is not the padded 6


def test_packed_documents_are_noised_as_if_alone():
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])  # documents of 3, 2 and 1 tokens
    batch = {"input_ids": ids, "position_ids": positions}
    assert sequence_lengths(batch).tolist() == [[3.0, 3.0, 3.0, 2.0, 2.0, 1.0]]
    out, clean = _noised(batch)
    torch.testing.assert_close(out - clean, _expected_noise((1, 6, H), [[3, 3, 3, 2, 2, 1]]), rtol=0, atol=1e-6)


def test_text_rows_and_unrecorded_forwards_use_the_row_length():
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    assert sequence_lengths({"input_ids": ids}).tolist() == [[5.0] * 5] * 2
    one_document = {"input_ids": ids, "position_ids": torch.arange(5).expand(2, 5)}
    assert sequence_lengths(one_document).tolist() == [[5.0] * 5] * 2
    # a training forward outside the wrapped step (no recorded lengths): the padded row length
    model = Embedder().train()
    NEFTune(ALPHA).attach(model)
    torch.manual_seed(7)
    out = model.model.embed_tokens(ids)
    clean = nn.functional.embedding(ids, model.model.embed_tokens.weight)
    torch.testing.assert_close(out - clean, _expected_noise((2, 5, H), [[5.0] * 5] * 2), rtol=0, atol=1e-6)


def test_eval_forwards_are_clean_and_draw_nothing():
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    out, clean = _noised({"input_ids": ids}, train=False)
    assert torch.equal(out, clean)
    torch.manual_seed(7)
    fresh = torch.rand(3)
    _noised({"input_ids": ids}, seed=7, train=False)
    assert torch.equal(torch.rand(3), fresh)  # the global generator did not move in the eval forward


def test_the_noise_replays_from_a_restored_rng_state_and_changes_between_steps():
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(5))
    model = Embedder().train()
    neftune = NEFTune(ALPHA)
    neftune.attach(model)
    step = neftune.wrap(SimpleNamespace(step=_embed_step, count=lambda b: 0)).step
    state = torch.get_rng_state()
    first, second = step(model, {"input_ids": ids}), step(model, {"input_ids": ids})
    assert not torch.equal(first, second)  # a fresh draw each step
    torch.set_rng_state(state)  # what resume restores
    assert torch.equal(step(model, {"input_ids": ids}), first)


def test_the_wrapped_step_forgets_the_lengths_even_when_the_step_fails():
    neftune = NEFTune(ALPHA)

    def failing(model, batch):
        raise RuntimeError("boom")

    step = neftune.wrap(SimpleNamespace(step=failing, count=lambda b: 0)).step
    with pytest.raises(RuntimeError, match="boom"):
        step(None, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    assert neftune._lengths is None


def test_the_hook_noises_a_training_forward_of_the_model_and_detaches(tiny, our_model, random_ids):
    model = our_model(tiny(), seed=0)
    ids = random_ids(2, 8, tiny()["vocab_size"])
    with torch.no_grad():
        reference = model.train()(ids)
        handle = NEFTune(ALPHA).attach(model)
        noised = model(ids)
        assert torch.equal(model.eval()(ids), reference)  # evaluation sees clean embeddings
        handle.remove()
        assert torch.equal(model.train()(ids), reference)
    assert not torch.allclose(noised, reference, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=r"data.neftune_alpha must be > 0"):
        NEFTune(alpha)
