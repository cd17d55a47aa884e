"""Packed and padded batches change nothing but speed.

(a) Packed rows and padded rows (one example each) give the same summed loss, label count and
    gradients on our model.
(b) A packed row with a sliding window shorter than its documents gives, for every document,
    the logits of `transformers.MistralForCausalLM` run on that document alone (sdpa and eager).
(c) A right-padded batch gives each example the loss transformers gives it alone, with
    pad == eos, so EOS labels must survive the padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mistral_train.data.collate import collate_packed, collate_padded
from mistral_train.data.packing import pack_examples

EOS = 2


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def make_examples(lengths: list[int], seed: int) -> list[Example]:
    """Examples whose prompt carries no labels and whose answer ends in a labelled EOS; every
    other one is trained on all its tokens, BOS included, as `train_on=all` does."""
    rng = random.Random(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = [1] + [rng.randint(3, 127) for _ in range(n - 2)] + [EOS]
        prompt = 0 if i % 2 else rng.randint(1, n - 2)
        examples.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return examples


def loss_and_grads(model, batch: dict, n_tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss_sum = model(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        labels=batch["labels"],
        reduction="sum",
        loss_chunk_size=16,
    )
    (loss_sum / n_tokens).backward()  # the token-normalised loss the trainer differentiates
    return loss_sum.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def label_count(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("window", [None, 5])
def test_packed_equals_padded_loss_and_gradients(window, tiny, our_model):
    model = our_model(tiny(sliding_window=window), seed=0).train()
    examples = make_examples([3, 16, 9, 5, 12, 7, 14, 4, 11, 6], seed=1)
    packed = collate_packed(pack_examples(examples, max_seq_len=32), pad_id=EOS, pad_to=32)
    padded = collate_padded(examples, pad_id=EOS, max_seq_len=32)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # rows really hold several documents
    n_tokens = label_count(padded)
    assert label_count(packed) == n_tokens  # no label lost, none added at a document boundary

    loss_packed, grads_packed = loss_and_grads(model, packed, n_tokens)
    loss_padded, grads_padded = loss_and_grads(model, padded, n_tokens)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=1e-5)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # The check is sharp: the same rows with documents allowed to see each other differ.
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    loss_leaky, _ = loss_and_grads(model, leaky, n_tokens)
    assert abs(float(loss_leaky - loss_padded)) > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_with_sliding_window_matches_transformers_per_document(attn, tiny, hf_and_ours):
    ours, hf = hf_and_ours(tiny(sliding_window=4), attn=attn, seed=2)
    examples = make_examples([7, 12, 9, 11, 8, 10], seed=3)
    rows = pack_examples(examples, max_seq_len=40)
    assert all(len(row.example_indices) >= 2 for row in rows)
    batch = collate_packed(rows, pad_id=EOS, pad_to=44)
    with torch.no_grad():
        logits = ours(batch["input_ids"], position_ids=batch["position_ids"])
        leaky = ours(batch["input_ids"])  # the same rows read as one long document each
    checked = 0
    for b, row in enumerate(rows):
        start = 0
        for index in row.example_indices:
            ids = torch.tensor([examples[index].input_ids])
            with torch.no_grad():
                expected = hf(ids, use_cache=False).logits[0]
            span = slice(start, start + ids.shape[1])
            torch.testing.assert_close(logits[b, span], expected, rtol=0, atol=1e-5)
            if start > 0:  # a later document's first tokens would otherwise see the one before
                assert (leaky[b, span] - expected).abs().max() > 1e-3
                checked += 1
            start += ids.shape[1]
    assert checked >= len(rows)


def test_padded_batch_gives_each_example_its_own_loss(tiny, hf_and_ours):
    ours, hf = hf_and_ours(tiny(sliding_window=6), seed=4)
    examples = make_examples([5, 14, 9, 3, 12], seed=5)
    batch = collate_padded(examples, pad_id=EOS, max_seq_len=16, pad_to_max=True)  # pad == eos
    with torch.no_grad():
        logits = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
        total = ours(**batch, reduction="sum")
    expected_total = 0.0
    for i, example in enumerate(examples):
        ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
        with torch.no_grad():
            alone = hf(ids, labels=labels, use_cache=False).loss
        row = F.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100)
        torch.testing.assert_close(row, alone, rtol=0, atol=1e-5)
        expected_total += float(alone) * int((labels[0, 1:] != -100).sum())
    assert abs(float(total) - expected_total) < 1e-4
