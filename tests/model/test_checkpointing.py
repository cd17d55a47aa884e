"""Selective activation checkpointing: every policy gives the gradients of no checkpointing,
recomputes exactly the part it names, and keeps fewer saved bytes than the policies above it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistral_train.model.saved_bytes import SavedBytes

# (policy, every) cases; "attention" with every=2 checks that `every` applies to any policy.
POLICIES = [("block", 1), ("attention", 1), ("mlp", 1), ("every_k", 2), ("attention", 2)]
LAYERS = 4


def _kwargs(tiny):
    # A sliding window shorter than the rows and padding: the mask is a tensor, not SDPA's causal path.
    return tiny(num_key_value_heads=2, sliding_window=5, num_hidden_layers=LAYERS, intermediate_size=96)


def _batch(padded_batch):
    ids, mask = padded_batch([16, 9, 12], 128, pad_id=0, side="right", seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _count_calls(model) -> dict[str, list[int]]:
    """Per layer, how often its attention and MLP run (a pre-hook: recomputation may stop early)."""
    calls = {"attention": [0] * LAYERS, "mlp": [0] * LAYERS}
    for i, block in enumerate(model.model.layers):
        for part, module in (("attention", block.self_attn), ("mlp", block.mlp)):
            module.register_forward_pre_hook(lambda *_, part=part, i=i: calls[part].__setitem__(i, calls[part][i] + 1))
    return calls


def _expected_recomputes(policy: str, every: int) -> dict[str, list[int]]:
    parts = {"block": ("attention", "mlp"), "every_k": ("attention", "mlp"), "attention": ("attention",), "mlp": ("mlp",)}
    return {part: [int(part in parts[policy] and i % every == 0) for i in range(LAYERS)] for part in ("attention", "mlp")}


@pytest.mark.parametrize("policy,every", POLICIES, ids=[f"{p}-{e}" for p, e in POLICIES])
def test_policy_gives_the_gradients_of_no_checkpointing(policy, every, tiny, our_model, padded_batch, train_step):
    ids, mask, labels = _batch(padded_batch)
    reference = our_model(_kwargs(tiny), seed=3).train()
    expected_loss, expected = train_step(reference, ids, mask, labels)

    model = our_model(_kwargs(tiny), seed=3).train()
    model.set_gradient_checkpointing(policy, every=every)
    calls = _count_calls(model)
    loss = model(ids, attention_mask=mask, labels=labels)
    forward = {part: list(counts) for part, counts in calls.items()}
    loss.backward()
    recomputed = {part: [c - f for c, f in zip(calls[part], forward[part])] for part in calls}
    assert recomputed == _expected_recomputes(policy, every), f"{policy}/{every}: parts run again in backward: {recomputed}"

    assert torch.equal(loss.detach(), expected_loss)
    for name, grad in expected.items():
        # The recomputation runs the same kernels on the same inputs: equal to fp32 rounding.
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-6, atol=1e-7, msg=name)


def saved_bytes(model, ids, mask, labels) -> int:
    with SavedBytes() as counter:
        loss = model(ids, attention_mask=mask, labels=labels)
    loss.backward()
    return counter.nbytes


def test_saved_activation_bytes_shrink_with_the_policy(tiny, our_model, padded_batch):
    ids, mask, labels = _batch(padded_batch)
    model = our_model(_kwargs(tiny), seed=3).train()
    sizes = {}
    for policy, every in [("none", 1), ("attention", 1), ("mlp", 1), ("every_k", 2), ("block", 1)]:
        model.set_gradient_checkpointing(policy, every=every)
        sizes[policy] = saved_bytes(model, ids, mask, labels)
    assert sizes["block"] < sizes["attention"] < sizes["none"], sizes
    assert sizes["block"] < sizes["mlp"] < sizes["none"], sizes
    assert sizes["block"] < sizes["every_k"] < sizes["none"], sizes


def test_policies_are_named_and_checked(tiny, our_model):
    model = our_model(_kwargs(tiny))
    model.set_gradient_checkpointing(True)  # the boolean form keeps working
    assert model.gradient_checkpointing == "block" and [b.recompute for b in model.model.layers] == ["block"] * LAYERS
    model.set_gradient_checkpointing("mlp", every=3)
    assert [b.recompute for b in model.model.layers] == ["mlp", None, None, "mlp"]
    model.set_gradient_checkpointing("every_k", every=2)
    assert [b.recompute for b in model.model.layers] == ["block", None, "block", None]
    model.set_gradient_checkpointing(False)
    assert model.gradient_checkpointing is None and all(b.recompute is None for b in model.model.layers)
    with pytest.raises(ValueError, match="'every_k' needs every >= 2"):
        model.set_gradient_checkpointing("every_k")
    with pytest.raises(ValueError, match="must be one of"):
        model.set_gradient_checkpointing("selective")
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        model.set_gradient_checkpointing("block", every=0)


@pytest.mark.parametrize("policy", ["attention", "block"])
def test_no_recomputation_without_a_backward(policy, tiny, our_model, random_ids):
    """Eval mode or no_grad: checkpointing would only cost time, so blocks run plainly."""
    model = our_model(_kwargs(tiny)).train()
    model.set_gradient_checkpointing(policy)
    calls = _count_calls(model)
    ids = random_ids(2, 8, 128)
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids, labels=ids).backward()
    assert calls == {"attention": [2] * LAYERS, "mlp": [2] * LAYERS}
