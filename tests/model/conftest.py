"""Fixtures of the model tests."""

import pytest
import torch
from torch._dynamo.utils import counters


@pytest.fixture
def fresh_dynamo():
    """Empty compile caches and counters before and after a test, so graph counts are its own."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _train_step(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def train_step():
    """(model, ids, mask, labels) -> (loss, {name: gradient}) of one forward and backward from zero gradients."""
    return _train_step
