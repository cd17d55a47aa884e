"""The optimizer's parameter groups and the warmup + cosine schedule."""

import math

import pytest
import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.config import TrainerSpec
from mistral_train.train.optim import build_optimizer, build_scheduler, lr_at, lr_factor, param_groups


def _tiny_model() -> Mistral:
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    return Mistral(config)


def test_lr_schedule_warmup_then_cosine_to_min():
    spec = TrainerSpec(lr=1e-3, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    # warmup: linear, never zero at the first step, full lr at the last warmup step
    assert [lr_at(s, spec) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, spec) == pytest.approx(1e-3)
    assert lr_at(19, spec) == pytest.approx(1e-4)  # the last step reaches lr * min_lr_ratio
    mid = 4 + (19 - 4) / 2
    assert lr_factor(mid, spec) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    decay = [lr_at(s, spec) for s in range(4, 20)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after warmup
    assert lr_at(100, spec) == pytest.approx(1e-4)  # clamped past the end


def test_scheduler_follows_lr_at_and_its_state_restores():
    spec = TrainerSpec(lr=2e-3, warmup_steps=3, max_steps=10)
    model = _tiny_model()
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, spec) for s in range(6)])
    # a fresh scheduler loaded from the state continues at step 6
    optimizer2 = build_optimizer(model, spec)
    scheduler2 = build_scheduler(optimizer2, spec)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lr_at(6, spec))
    optimizer2.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lr_at(7, spec))


def test_weight_decay_only_on_matrices():
    model = _tiny_model()
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert "model.embed_tokens.weight" in decayed
    assert plain and all("norm" in n for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out_and_fused_is_used():
    model = _tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainerSpec())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in in_optimizer
    assert optimizer.param_groups[0]["fused"] is True
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_weight_decay_shrinks_matrices_but_not_norms():
    """With zero gradients AdamW only applies decay: matrices shrink, norm scales stay."""
    model = _tiny_model()
    optimizer = build_optimizer(model, TrainerSpec(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(dict(model.named_parameters())[q], before[q] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(dict(model.named_parameters())["model.norm.weight"], before["model.norm.weight"])


def _train(optimizer_name: str, steps: int = 8) -> tuple[list[float], torch.optim.Optimizer, torch.nn.Module]:
    torch.manual_seed(0)
    model = Mistral(MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2))
    optimizer = build_optimizer(model, TrainerSpec(optimizer=optimizer_name, lr=3e-3, weight_decay=0.0))
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, optimizer, model


def test_adamw_8bit_trains_on_cpu_with_one_byte_moments_and_a_loadable_state(tmp_path):
    reference, _, _ = _train("adamw")
    losses, optimizer, model = _train("adamw_8bit")
    assert type(optimizer).__name__ == "AdamW8bit"
    assert losses[-1] < losses[0] - 0.5  # it optimises
    assert abs(losses[-1] - reference[-1]) < 0.1 * reference[-1]  # and close to full-precision AdamW
    q = model.model.layers[0].self_attn.q_proj.weight  # 16384 values: large enough for 8-bit states
    state = optimizer.state[q]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")  # checkpoints load with weights_only=True
    restored = _train("adamw_8bit", steps=0)[1]
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))


def test_paged_optimizers_need_cuda_and_unknown_names_are_refused():
    model = _tiny_model()
    with pytest.raises(RuntimeError, match="paged_adamw pages optimizer states through CUDA"):
        build_optimizer(model, TrainerSpec(optimizer="paged_adamw"))
    with pytest.raises(ValueError, match="trainer.optimizer must be one of"):
        build_optimizer(model, TrainerSpec(optimizer="sgd"))
