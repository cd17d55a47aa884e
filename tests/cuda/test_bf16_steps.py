"""bf16 training on CUDA against fp32: the same model, weights and batch trained a few AdamW steps three ways
(fp32; bf16 autocast over fp32 weights; bf16 weights with the default Kahan-compensated update, optimi's
CUDA path); every step's loss within bf16 tolerance of fp32's, and each run learns."""

from __future__ import annotations

import copy

import torch

from mistral_train.config import TrainerSpec
from mistral_train.train.optim import build_optimizer
from tests.cuda._helpers import small_mistral

STEPS = 6


def losses(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> list[float]:
    optimizer = build_optimizer(model, TrainerSpec(lr=1e-3, weight_decay=0.0))
    out = []
    for _ in range(STEPS):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_bf16_steps_track_fp32_within_bf16_tolerance(cuda: torch.device) -> None:
    base = small_mistral().to(cuda)
    ids = torch.randint(0, base.config.vocab_size, (4, 128), device=cuda, generator=torch.Generator(cuda).manual_seed(0))
    fp32 = losses(copy.deepcopy(base), ids, autocast=False)
    autocast = losses(copy.deepcopy(base), ids, autocast=True)
    pure = copy.deepcopy(base).to(torch.bfloat16)
    assert type(build_optimizer(pure, TrainerSpec())).__module__.startswith("optimi")  # bf16 weights: Kahan update
    bf16 = losses(pure, ids, autocast=False)
    for name, run in (("bf16 autocast", autocast), ("bf16 weights", bf16)):
        for step, (got, want) in enumerate(zip(run, fp32)):
            assert abs(got - want) <= 2e-2 * want, f"{name} step {step}: loss {got:.4f} vs fp32 {want:.4f}"
        assert run[-1] < run[0] - 0.05, f"{name}: loss {run[0]:.4f} -> {run[-1]:.4f} did not fall"
    assert fp32[-1] < fp32[0] - 0.05
