"""The optimizer's parameter groups and the warmup + cosine schedule."""

import math

import pytest
import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.config import TrainerSpec
from mistral_train.errors import ConfigError
from mistral_train.train.optim import BF16_UPDATES, build_optimizer, build_scheduler, lr_at, lr_factor, param_groups
from tests._tiny import tiny_model


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
    model = tiny_model()
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
    model = tiny_model()
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
    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainerSpec())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in in_optimizer
    assert optimizer.param_groups[0]["fused"] is True
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_weight_decay_shrinks_matrices_but_not_norms():
    """With zero gradients AdamW only applies decay: matrices shrink, norm scales stay."""
    model = tiny_model()
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
    model = tiny_model()
    with pytest.raises(RuntimeError, match="paged_adamw pages optimizer states through CUDA"):
        build_optimizer(model, TrainerSpec(optimizer="paged_adamw"))
    with pytest.raises(ValueError, match="trainer.optimizer must be one of"):
        build_optimizer(model, TrainerSpec(optimizer="sgd"))


# --- bf16 updates (trainer.bf16_update) ---------------------------------------------------------------------

class _Weight(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())


@pytest.fixture
def eager_torchao(monkeypatch):
    """torchao compiles its AdamW step per parameter shape (~15 s for the first on a CPU): run the same
    function eagerly here (the rounding draws from torch.rand_like instead of the compiled kernel's stream)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)


def _bf16_run(mode: str, dtype: torch.dtype, weights: torch.Tensor, grads: list[torch.Tensor]):
    """`len(grads)` AdamW steps at lr 1e-5 from `weights` with the given gradients; (weight, optimizer)."""
    module = _Weight(weights.to(dtype))
    optimizer = build_optimizer(module, TrainerSpec(lr=1e-5, weight_decay=0.0, bf16_update=mode))
    for grad in grads:
        module.weight.grad = grad.to(dtype)
        optimizer.step()
    return module.weight.detach(), optimizer


def _weights_and_grads(steps: int = 20) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16-representable weights ~N(0, 0.02) and gradients (so every run starts from the same values and
    sees the same gradients); each weight's gradient keeps its direction over the steps (correlation 0.9
    with a fixed one), as on a fine-tuning set, with fresh noise on top."""
    gen = torch.Generator().manual_seed(0)
    weights = (torch.randn(256, 256, generator=gen) * 0.02).bfloat16().float()
    direction = torch.randn(256, 256, generator=gen)
    grads = [0.9 * direction + 0.19**0.5 * torch.randn(256, 256, generator=gen) for _ in range(steps)]
    return weights, [g.bfloat16().float() for g in grads]


def test_bf16_remedies_track_fp32_where_plain_bf16_loses_most_updates(eager_torchao):
    """20 steps at lr 1e-5 (the issue's measurement): plain bf16 AdamW leaves most weights unchanged, each
    remedy moves most of them with a mean |update| within 10% of the fp32 run's."""
    weights, grads = _weights_and_grads()
    fp32, _ = _bf16_run("plain", torch.float32, weights, grads)
    fp32_update = (fp32 - weights).abs().mean()

    def moved_and_ratio(mode: str) -> tuple[float, float]:
        trained, optimizer = _bf16_run(mode, torch.bfloat16, weights, grads)
        assert trained.dtype == torch.bfloat16
        update = trained.float() - weights
        return float((update != 0).float().mean()), float(update.abs().mean() / fp32_update)

    moved, ratio = moved_and_ratio("plain")
    assert moved < 0.2 and ratio < 0.25  # measured 0.155 and 0.17: the updates below half an ulp are lost
    for mode in ("fp32_master", "kahan", "stochastic_rounding"):
        moved, ratio = moved_and_ratio(mode)
        assert moved > 0.75, (mode, moved)  # measured 0.91, 0.91, 0.80
        assert abs(ratio - 1) < 0.1, (mode, ratio)  # measured 1.03, 1.03, 1.02


def test_fp32_master_is_fp32_adamw_and_kahan_carries_the_rounding_residual():
    """What each remedy keeps: fp32_master's masters are torch AdamW's fp32 run (the same maths), and the
    bf16 weights their nearest bf16; kahan's weight + compensation is within 1% of the fp32 update."""
    weights, grads = _weights_and_grads()
    fp32, _ = _bf16_run("plain", torch.float32, weights, grads)
    trained, optimizer = _bf16_run("fp32_master", torch.bfloat16, weights, grads)
    state = next(iter(optimizer.state.values()))
    assert state["master"].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    reference = _Weight(weights)  # torch's foreach AdamW, the code path the masters take (fused differs by an ulp)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    for grad in grads:
        reference.weight.grad = grad
        adamw.step()
    assert torch.equal(state["master"], reference.weight.detach())
    assert torch.equal(trained, state["master"].bfloat16())
    trained, optimizer = _bf16_run("kahan", torch.bfloat16, weights, grads)
    state = next(iter(optimizer.state.values()))
    assert type(optimizer).__module__.startswith("optimi") and state["kahan_comp"].dtype == torch.bfloat16
    effective = trained.float() + state["kahan_comp"].float()
    assert float((effective - fp32).abs().mean() / (fp32 - weights).abs().mean()) < 0.01  # measured 0.002


def _bf16_model() -> Mistral:
    torch.manual_seed(0)
    return tiny_model().to(torch.bfloat16)


@pytest.mark.parametrize("mode", ["fp32_master", "kahan", "stochastic_rounding"])
def test_bf16_remedy_state_round_trips_a_checkpoint_bit_identically(mode, tmp_path, eager_torchao):
    """Save after 3 steps (bf16 weights as the HF folder holds them, optimizer state through torch.save and
    weights_only=True), restore into a fresh model and optimizer, take 3 more: bit-identical weights and
    state to 6 uninterrupted steps (fp32 masters stay fp32 through torch's loader, which casts to bf16)."""
    spec = TrainerSpec(lr=1e-3, weight_decay=0.1, bf16_update=mode)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def steps(model, optimizer, seeds):
        for seed in seeds:
            torch.manual_seed(seed)  # stochastic rounding draws: the loop restores the RNG from the checkpoint
            model(ids, labels=ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model = _bf16_model()
    optimizer = build_optimizer(model, spec)
    steps(model, optimizer, range(6))

    first = _bf16_model()
    optimizer1 = build_optimizer(first, spec)
    steps(first, optimizer1, range(3))
    torch.save(optimizer1.state_dict(), tmp_path / "optimizer.pt")
    resumed = _bf16_model()
    resumed.load_state_dict(first.state_dict())
    optimizer2 = build_optimizer(resumed, spec)
    optimizer2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    steps(resumed, optimizer2, range(3, 6))

    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), optimizer2.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (mode, key)
    if mode == "fp32_master":
        assert all(s["master"].dtype == torch.float32 for s in optimizer2.state.values())


def test_bf16_update_auto_picks_a_remedy_only_for_16_bit_weights_and_plain_only_by_name():
    fp32 = tiny_model()
    assert type(build_optimizer(fp32, TrainerSpec())) is torch.optim.AdamW  # nothing to remedy
    bf16 = _bf16_model()
    assert type(build_optimizer(bf16, TrainerSpec())).__module__ == "optimi.adamw"  # auto: kahan
    assert type(build_optimizer(bf16, TrainerSpec(bf16_update="plain"))) is torch.optim.AdamW
    assert type(build_optimizer(bf16, TrainerSpec(bf16_update="fp32_master"))).__name__ == "MasterWeightAdamW"
    assert type(build_optimizer(bf16, TrainerSpec(bf16_update="stochastic_rounding"))).__name__ == "_AdamW"
    # DeepSpeed steps the optimizer on its own fp32 master partitions: plain AdamW whatever was asked
    assert type(build_optimizer(bf16, TrainerSpec(bf16_update="kahan"), engine_masters=True)) is torch.optim.AdamW
    # a bf16 head trained in full beside fp32 adapters still gets the remedy
    fp32.lm_head.to(torch.bfloat16)
    assert type(build_optimizer(fp32, TrainerSpec())).__module__ == "optimi.adamw"


def test_bf16_update_errors_name_the_key():
    bf16 = _bf16_model()
    with pytest.raises(ConfigError, match=r"trainer.bf16_update=fp64_master: expected one of auto, fp32_master"):
        build_optimizer(bf16, TrainerSpec(bf16_update="fp64_master"))
    with pytest.raises(ConfigError, match=r"trainer.optimizer=adamw_8bit over bfloat16 trained weights: "
                                          r"trainer.bf16_update=auto is offered by adamw only"):
        build_optimizer(bf16, TrainerSpec(optimizer="adamw_8bit"))
    assert type(build_optimizer(bf16, TrainerSpec(optimizer="adamw_8bit", bf16_update="plain"))).__name__ == "AdamW8bit"
    with pytest.raises(ConfigError, match="stochastic_rounding rounds to bf16 only and the trained weights are float16"):
        build_optimizer(tiny_model().half(), TrainerSpec(bf16_update="stochastic_rounding"))


def test_no_recipe_takes_plain_bf16_updates():
    """Every Mistral-7B recipe (bf16 weights) leaves bf16_update to auto (a remedy over 16-bit trained weights:
    LoRA's fp32 adapters need none, a trained bf16 score head gets one) or names a remedy; the full fine-tunes
    name theirs (the ZeRO-3 recipe keeps DeepSpeed's fp32 masters)."""
    from mistral_train.config import list_recipes, load_run_config

    chosen = {}
    for recipe in (r for r in list_recipes() if r.startswith("mistral7b_")):
        cfg = load_run_config(recipe, ["model.path=/models/m", "data.path=rows.jsonl"])
        assert cfg.model.dtype == "bfloat16", recipe
        chosen[recipe] = cfg.trainer.bf16_update
    assert "plain" not in chosen.values() and set(chosen.values()) <= set(BF16_UPDATES)
    assert {r: chosen[r] for r in ("mistral7b_full_sft", "mistral7b_continued_pretrain", "mistral7b_full_sft_fsdp2")} \
        == {"mistral7b_full_sft": "kahan", "mistral7b_continued_pretrain": "kahan", "mistral7b_full_sft_fsdp2": "fp32_master"}
