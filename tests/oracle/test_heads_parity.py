"""Classification heads against `MistralForSequenceClassification` / `MistralForTokenClassification`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

TOL = 1e-5
PAD = 0
LENGTHS = [12, 5, 9, 1]  # a one-token row too


def _kwargs(tiny, window):
    return tiny(pad_token_id=PAD, num_labels=3, sliding_window=window, num_key_value_heads=2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_classification_matches_transformers(side, window, attn, tiny, hf_and_ours, padded_batch, max_abs_diff):
    kwargs = _kwargs(tiny, window)
    ours, hf = hf_and_ours(kwargs, task="sequence_classification", attn=attn)
    ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=PAD, side=side, seed=1)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = ours(ids, attention_mask=mask)
    assert got.shape == (len(LENGTHS), 3)
    diff = max_abs_diff(got, expected)
    assert diff <= TOL, f"{side}-padded, window={window}, {attn}: pooled logits differ by {diff:.3g}"


def test_sequence_classification_pools_last_real_token(tiny, our_model, padded_batch, max_abs_diff):
    """Right padding: a row's score equals the score of the row cut at its last real token."""
    kwargs = _kwargs(tiny, None)
    model = our_model(kwargs, task="sequence_classification").eval()
    ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=PAD, side="right", seed=2)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row, n in enumerate(LENGTHS):
            alone = model(ids[row : row + 1, :n])
            assert max_abs_diff(batched[row : row + 1], alone) <= TOL, f"row {row} (length {n}) pooled the wrong token"


def test_sequence_classification_single_row_without_pad_id(tiny, hf_and_ours, random_ids, max_abs_diff):
    kwargs = tiny(num_labels=3)  # pad_token_id None: transformers pools the last position of a single row
    ours, hf = hf_and_ours(kwargs, task="sequence_classification")
    ids = random_ids(1, 10, kwargs["vocab_size"], seed=3)
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False).logits
        got = ours(ids)
    assert max_abs_diff(got, expected) <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_classification_matches_transformers(side, window, attn, tiny, hf_and_ours, padded_batch, max_abs_diff):
    kwargs = _kwargs(tiny, window)
    ours, hf = hf_and_ours(kwargs, task="token_classification", attn=attn)
    ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=PAD, side=side, seed=4)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = ours(ids, attention_mask=mask)
    assert got.shape == (len(LENGTHS), max(LENGTHS), 3)
    diff = max_abs_diff(got, expected, mask)  # padded positions are undefined
    assert diff <= TOL, f"{side}-padded, window={window}, {attn}: token logits differ by {diff:.3g}"


@pytest.mark.parametrize(
    "extra", [{}, {"classifier_dropout": 0.3}, {"hidden_dropout": 0.2}, {"classifier_dropout": None, "hidden_dropout": 0.2}]
)
def test_token_classification_dropout_matches_transformers(extra, tiny, hf_model):
    """The head's dropout probability (train mode only) follows transformers' config lookup."""
    from mistral_train import Mistral, MistralConfig

    kwargs = {**_kwargs(tiny, None), **extra}
    hf = hf_model(kwargs, task="token_classification")
    config = MistralConfig.from_hf_dict(hf.config.to_dict(), source="test")
    ours = Mistral(config, task="token_classification")

    def dropout_ps(model):
        return sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0)

    assert dropout_ps(ours) == dropout_ps(hf)
    assert dropout_ps(hf), "transformers' token-classification head should have a dropout"
