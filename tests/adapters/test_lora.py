"""LoRA unit tests on a tiny `Mistral` (ours only; parity with peft is in tests/oracle)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_train.adapters import (
    LoraConfig,
    LoRALinear,
    TrainableCopy,
    apply_lora,
    disable_adapters,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

ADAPTER_KEYS = ("lora_A", "lora_B", "lora_magnitude_vector")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def model(tiny, our_model):
    return our_model(tiny(), seed=0).eval()


def _ids(model, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _perturb_copies(model, seed: int = 1) -> None:
    """Make every modules_to_save copy differ from its original."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, TrainableCopy):
            m.modules_to_save.weight.add_(0.1 * torch.randn(m.weight.shape, generator=gen))


def test_swap_keeps_base_keys_and_tensors(model):
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    param_names = {n for n, _ in model.named_parameters()}
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    after = model.state_dict()
    wrapped = sorted(name for name, _ in lora_layers(model))
    assert len(wrapped) == 2 * len(PROJECTIONS) and "lm_head" not in wrapped
    for key, ptr in before.items():
        assert key in after, f"`{key}` disappeared after apply_lora"
        assert after[key].data_ptr() == ptr, f"`{key}` was copied: LoRALinear must own the same tensor"
    assert set(after) - set(before) == {f"{n}.{k}" for n in wrapped for k in ("lora_A", "lora_B")}
    assert param_names <= {n for n, _ in model.named_parameters()}, "named_parameters lost a base name"


def test_only_adapters_and_saved_copies_train(model):
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head"], init="none"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.self_attn.{p}.{k}" for i in range(2) for p in ("q_proj", "v_proj") for k in ADAPTER_KEYS}
    assert trainable == expected | {"lm_head.modules_to_save.weight"}
    model.train()
    ids = _ids(model)
    model(ids, labels=ids).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("opts", [{}, {"init": "gaussian"}, {"use_dora": True}, {"use_rslora": True, "use_dora": True}])
def test_zero_b_is_the_base_model_exactly(model, opts):
    ids = _ids(model)
    with torch.no_grad():
        expected = model(ids)
        apply_lora(model, LoraConfig(r=4, target_modules="all-linear", **opts))
        got = model(ids)
    assert all(torch.count_nonzero(layer.lora_A) > 0 for _, layer in lora_layers(model)), "A must be random"
    assert torch.equal(got, expected), f"B = 0 changes the logits by {float((got - expected).abs().max()):.3g}"


@pytest.mark.parametrize("opts", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merged_equals_unmerged(model, opts):
    ids = _ids(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"], init="none", **opts))
    _perturb_copies(model)
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        merged = model(ids)
        assert all(not torch.equal(layer.weight, weights[n]) for n, layer in lora_layers(model)), "merge left a weight unchanged"
        unmerge_lora(model)
        unmerged = model(ids)
    assert float((merged - adapted).abs().max()) <= 1e-5
    assert float((unmerged - adapted).abs().max()) <= 1e-5
    for name, layer in lora_layers(model):
        assert float((layer.weight - weights[name]).abs().max()) <= 1e-6, f"{name}: unmerge did not restore the weight"
    keys = set(model.state_dict())
    merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, TrainableCopy)) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in weights)
    assert set(model.state_dict()) == {k for k in keys if not any(a in k for a in ADAPTER_KEYS + ("original_module",))} - {
        "lm_head.modules_to_save.weight"
    } | {"lm_head.weight"}
    with torch.no_grad():
        unloaded = model(ids)
    assert float((unloaded - adapted).abs().max()) <= 1e-5


def test_disable_adapters_is_the_base_model_exactly(model):
    ids = _ids(model)
    with torch.no_grad():
        base_logits, base_loss = model(ids), model(ids, labels=ids)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True, modules_to_save=["lm_head", "embed_tokens"], init="none"))
    _perturb_copies(model)
    with torch.no_grad():
        adapted = model(ids)
        with disable_adapters(model):
            disabled_logits, disabled_loss = model(ids), model(ids, labels=ids)
        again = model(ids)
    assert torch.equal(disabled_logits, base_logits)
    assert torch.equal(disabled_loss, base_loss), "the chunked loss path (lm_head.weight) must revert too"
    assert not torch.equal(adapted, base_logits)
    assert torch.equal(again, adapted), "leaving the context must restore the adapters"
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert not any(m.disabled for m in model.modules() if isinstance(m, (LoRALinear, TrainableCopy)))
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        with disable_adapters(model):
            pass


def test_disable_refuses_a_pissa_residual(model):
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"], init="pissa"))
    with pytest.raises(ValueError, match="PiSSA"):
        with disable_adapters(model):
            pass


def test_no_dropout_module_when_dropout_is_zero(tiny, our_model):
    lean = apply_lora(our_model(tiny(), seed=0), LoraConfig(r=4, target_modules="all-linear", init="none"))
    assert not any(isinstance(m, nn.Dropout) for _, layer in lora_layers(lean) for m in layer.modules())
    assert all(layer.lora_dropout is None for _, layer in lora_layers(lean))
    torch.manual_seed(0)
    dropped = apply_lora(our_model(tiny(), seed=0), LoraConfig(r=4, dropout=0.1, target_modules="all-linear", init="none"))
    assert all(isinstance(layer.lora_dropout, nn.Dropout) for _, layer in lora_layers(dropped))


def _saved_activation_elements(layer: LoRALinear, x: torch.Tensor) -> list[int]:
    """Element counts of the tensors autograd saves for backward, other than the layer's own parameters."""
    params = {p.data_ptr() for p in layer.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return shapes


def test_frozen_base_saves_no_extra_activation():
    """Lean: with dropout 0 backward keeps only x (for A's grad) and the rank-r intermediate (for B's);
    nothing out-wide, and the frozen base matmul adds no copy of x."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 256, bias=False).requires_grad_(False), r=4, alpha=8)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = _saved_activation_elements(layer, x)
    assert sorted(saved) == [15 * 4, 15 * 64], f"element counts saved for backward: {saved} (x is 15 x 64, r = 4)"


@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_computes_the_lora_and_dora_formulas(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True).requires_grad_(False)
    x = torch.randn(4, 16)
    scaling = 6 / math.sqrt(3) if use_rslora else 6 / 3
    plain = LoRALinear(base, r=3, alpha=6, use_rslora=use_rslora)
    plain.reset_adapter("none")
    expected = x @ base.weight.T + base.bias + scaling * x @ plain.lora_A.T @ plain.lora_B.T
    assert torch.allclose(plain(x), expected, atol=1e-5)
    dora = LoRALinear(base, r=3, alpha=6, use_rslora=use_rslora, use_dora=True)
    dora.reset_adapter("none")
    adapted = base.weight + scaling * dora.lora_B @ dora.lora_A  # (out, in)
    assert torch.allclose(dora.lora_magnitude_vector, adapted.norm(dim=1)), "DoRA magnitude starts at ||W + sBA||"
    with torch.no_grad():
        dora.lora_magnitude_vector.mul_(1.5)
    expected = (dora.lora_magnitude_vector / adapted.norm(dim=1)) * (x @ adapted.T) + base.bias
    assert torch.allclose(dora(x), expected, atol=1e-5)


ERRORS = [
    ({"target_modules": ["q_prj", "v_proj"]}, r"\['q_prj'\].*'q_proj'"),
    ({"target_modules": r"layers\.\d+\.attn\.q_proj"}, r"matches no module.*model\.layers\.0\.self_attn\.q_proj"),
    ({"target_modules": ["k_proj"], "r": 20}, r"r=20.*model\.layers\.0\.self_attn\.k_proj.*\(16, 32\)"),
    ({"target_modules": ["embed_tokens"]}, r"model\.embed_tokens.*Embedding.*modules_to_save"),
    ({"target_modules": ["lm_head"]}, r"lm_head.*modules_to_save=\['lm_head'\]"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_hed"]}, r"modules_to_save.*'lm_hed'.*lm_head"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["self_attn"]}, r"q_proj.*both"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS)
def test_bad_targets_fail_clearly_and_change_nothing(model, kwargs, message):
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoraConfig(**kwargs))
    assert set(model.state_dict()) == keys and not hasattr(model, "lora_config")
    assert all(p.requires_grad for p in model.parameters()), "a failed apply_lora froze the model"


def test_apply_twice_is_refused(model):
    apply_lora(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(model, LoraConfig(r=2))


@pytest.mark.parametrize(
    "kwargs,message",
    [({"r": 0}, "positive"), ({"dropout": 1.0}, r"\[0, 1\)"), ({"init": "kaiming"}, "kaiming"), ({"target_modules": []}, "empty"),
     ({"target_modules": "q_proj("}, "regex")],
)
def test_bad_config_fails_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_config_is_a_hydra_structured_schema():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(LoraConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, {"r": 16, "target_modules": "all-linear", "modules_to_save": ["lm_head"]}))
    assert isinstance(cfg, LoraConfig) and cfg.target_modules == "all-linear" and cfg.scaling == 1.0


class FakeQuantLinear(nn.Module):
    """A stand-in for an NF4 linear: int8 weight + per-row scale buffers, dequantized in forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize())


def _quantized(tiny, our_model):
    model = our_model(tiny(), seed=0).eval()
    for block in model.model.layers:
        block.self_attn.q_proj = FakeQuantLinear(block.self_attn.q_proj)
        block.mlp.down_proj = FakeQuantLinear(block.mlp.down_proj)
    return model


def test_pluggable_base_keeps_keys_and_trains_adapters(tiny, our_model):
    model = _quantized(tiny, our_model)
    ids = _ids(model)
    base_keys = set(model.state_dict())
    with torch.no_grad():
        base_logits = model(ids)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, init="none"))
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.scale" in keys and not any("base_layer" in k for k in keys)
    assert base_keys <= keys
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == torch.int8, "`.weight` should reach the pluggable base's weight"
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(ids), base_logits)
    twin = apply_lora(_quantized(tiny, our_model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    twin.load_state_dict(model.state_dict())  # strict: flattened keys load back into base_layer
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))
    model.train()
    model(ids, labels=ids).backward()
    for name, l in lora_layers(model):
        for key in ADAPTER_KEYS:
            assert getattr(l, key).grad is not None and getattr(l, key).grad.abs().sum() > 0, f"{name}.{key} got no gradient"
    with pytest.raises(ValueError, match="merge_and_unload"):
        merge_lora(model)
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_and_unload(model)
        assert float((model(ids) - adapted).abs().max()) <= 1e-5
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear


def test_bf16_base_trains_fp32_adapters(tiny, our_model):
    """Adapters stay fp32 (the optimizer updates full-precision values) and are cast to the
    activations' dtype in forward, so a bf16 model computes in bf16 end to end."""
    model = our_model(tiny(), seed=0).to(torch.bfloat16).train()
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True, init="none"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    ids = _ids(model)
    assert model(ids).dtype == torch.bfloat16
    model(ids, labels=ids).backward()
    for name, l in lora_layers(model):
        for key in ADAPTER_KEYS:
            grad = getattr(l, key).grad
            assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), f"{name}.{key}"


def test_deepcopy_of_an_adapted_model(model):
    """A frozen copy is one way to get a DPO reference policy."""
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"], init="none"))
    twin = copy.deepcopy(model)
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))
