"""bitsandbytes' paged AdamW (trainer.optimizer=paged_adamw / paged_adamw_8bit, train/optim.py) on CUDA: the
states really are paged (CUDA unified memory), and the steps match torch AdamW on the same gradients: to fp32
rounding for the 32-bit one, in direction for the 8-bit one (block-wise 8-bit moments)."""

from __future__ import annotations

import copy

import torch

from mistral_train.config import TrainerSpec
from mistral_train.train.optim import build_optimizer
from tests.cuda._helpers import small_mistral

STEPS = 5


def train(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, TrainerSpec(optimizer=name, lr=1e-3, weight_decay=0.1))
    for _ in range(STEPS):
        model(ids, labels=ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def updates(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()])


def test_paged_adamw_matches_torch_adamw_and_pages_its_states(cuda: torch.device) -> None:
    base = small_mistral().to(cuda)
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    ids = torch.randint(0, base.config.vocab_size, (2, 64), device=cuda, generator=torch.Generator(cuda).manual_seed(0))
    reference, paged, paged8 = (copy.deepcopy(base) for _ in range(3))
    assert isinstance(train(reference, "adamw", ids), torch.optim.AdamW)
    optimizer = train(paged, "paged_adamw", ids)
    states = [s for state in optimizer.state.values() for s in state.values() if torch.is_tensor(s)]
    assert any(getattr(s, "is_paged", False) for s in states), "no optimizer state is paged"
    for (name, p), q in zip(paged.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    train(paged8, "paged_adamw_8bit", ids)
    want, got = updates(reference, start), updates(paged8, start)
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    assert cosine > 0.99, f"paged_adamw_8bit's update is off torch AdamW's: cosine {cosine:.4f}"
    assert abs(float(got.norm() / want.norm()) - 1) < 0.05
