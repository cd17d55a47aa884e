"""Our LoRA against peft on a tiny Mistral (fp32): logits, gradients, and adapter files both ways.

The base model is a seeded transformers Mistral saved with `save_pretrained` and loaded by
`Mistral.from_pretrained`; peft wraps the transformers twin. Adapters get random NON-ZERO
A, B (and DoRA magnitudes) copied into both, so every adapter term shows in the logits.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mistral_train import Mistral  # noqa: E402
from mistral_train.adapters import (  # noqa: E402
    LoraConfig,
    TrainableCopy,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    save_adapter,
)

LOGIT_TOL = 1e-5
GRAD_REL_TOL = 1e-5
R, ALPHA = 4, 12
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.fixture
def base(tmp_path, tiny, hf_model):
    """(folder, transformers model, ours) with the same order-one random weights."""
    folder = tmp_path / "base"
    hf = hf_model(tiny(hidden_size=64, intermediate_size=128), seed=0)
    hf.save_pretrained(folder)
    return folder, hf, Mistral.from_pretrained(folder).eval()


def _peft_config(targets, modules_to_save=None, dropout=0.0, init=True, **opts) -> "peft.LoraConfig":
    return peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets, modules_to_save=modules_to_save,
        init_lora_weights=init, task_type="CAUSAL_LM", **opts,
    )


@torch.no_grad()
def _randomize_and_copy(ours, peft_model, seed: int = 1) -> None:
    """Random non-zero A, B, magnitudes and modules_to_save copies in ours, copied into peft's model."""
    gen = torch.Generator().manual_seed(seed)
    inner = peft_model.base_model.model
    for name, layer in lora_layers(ours):
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.in_features**0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1 / R**0.5)
        theirs = inner.get_submodule(name)
        theirs.lora_A["default"].weight.copy_(layer.lora_A)
        theirs.lora_B["default"].weight.copy_(layer.lora_B)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=gen))
            theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    for name, module in ours.named_modules():
        if isinstance(module, TrainableCopy):
            module.modules_to_save.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
            inner.get_submodule(name).modules_to_save["default"].weight.copy_(module.modules_to_save.weight)


def _pair(base, targets="all-linear", modules_to_save=None, dropout=0.0, **opts):
    _, hf, ours = base
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=targets, modules_to_save=modules_to_save or [], **opts))
    peft_model = peft.get_peft_model(hf, _peft_config(targets, modules_to_save, dropout, **opts))
    _randomize_and_copy(ours, peft_model)
    return ours.eval(), peft_model.eval()


def _ids(vocab: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _assert_logits_equal(ours, peft_model, what: str, ids=None) -> torch.Tensor:
    ids = _ids(ours.config.vocab_size) if ids is None else ids
    with torch.no_grad():
        got, expected = ours(ids), peft_model(input_ids=ids).logits
    diff = float((got - expected).abs().max())
    assert diff <= LOGIT_TOL, f"{what}: max |ours - peft| logits = {diff:.3g} > {LOGIT_TOL}"
    return got


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_peft(variant, base):
    ours, peft_model = _pair(base, **VARIANTS[variant])
    wrapped = {name for name, _ in lora_layers(ours)}
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == peft_wrapped, f"'all-linear' picks differ: {wrapped ^ peft_wrapped}"
    got = _assert_logits_equal(ours, peft_model, variant)
    with torch.no_grad(), disable_adapters(ours):
        plain = ours(_ids(ours.config.vocab_size))
    assert float((got - plain).abs().max()) > 0.1, "the adapters barely change the logits: the comparison would prove little"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_match_peft(variant, dropout, base):
    """Loss and every adapter gradient equal peft's; with dropout both draw the same masks
    (same RNG seed, same call order), which also checks DoRA's dropout rule."""
    ours, peft_model = _pair(base, dropout=dropout, **VARIANTS[variant])
    ours.train(), peft_model.train()
    ids = _ids(ours.config.vocab_size)
    torch.manual_seed(5)
    loss = ours(ids, labels=ids)
    loss.backward()
    torch.manual_seed(5)
    expected = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5, f"loss {loss.item()!r} vs peft {expected.item()!r}"
    inner = peft_model.base_model.model
    for name, layer in lora_layers(ours):
        theirs = inner.get_submodule(name)
        pairs = {"lora_A": (layer.lora_A, theirs.lora_A["default"].weight), "lora_B": (layer.lora_B, theirs.lora_B["default"].weight)}
        if layer.use_dora:
            pairs["lora_magnitude_vector"] = (layer.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)
        for what, (mine, ref) in pairs.items():
            scale = float(ref.grad.abs().max())
            assert scale > 0, f"{name}.{what}: peft's gradient is all zeros"
            rel = float((mine.grad - ref.grad).abs().max()) / scale
            assert rel <= GRAD_REL_TOL, f"{name}.{what} gradient differs by {rel:.3g} (relative) > {GRAD_REL_TOL}"
    adapter = ("lora_A", "lora_B", "lora_magnitude_vector")
    frozen = [n for n, p in ours.named_parameters() if p.grad is not None and n.rpartition(".")[2] not in adapter]
    assert not frozen, f"frozen parameters received gradients: {frozen[:3]}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_adapter_loads_in_peft(variant, base, tmp_path):
    folder, _, _ = base
    ours, peft_model = _pair(base, targets=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"], **VARIANTS[variant])
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    fresh = transformers.MistralForCausalLM.from_pretrained(folder)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].use_dora == VARIANTS[variant].get("use_dora", False)
    assert loaded.peft_config["default"].use_rslora == VARIANTS[variant].get("use_rslora", False)
    _assert_logits_equal(ours, loaded, f"{variant}: our file in peft")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_ours(variant, base, tmp_path):
    folder, _, _ = base
    ours, peft_model = _pair(base, modules_to_save=["lm_head", "embed_tokens"], **VARIANTS[variant])
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    fresh = load_adapter(Mistral.from_pretrained(folder), tmp_path / "peft_adapter").eval()
    assert fresh.lora_config.modules_to_save == ["lm_head", "embed_tokens"]
    _assert_logits_equal(fresh, peft_model, f"{variant}: peft's file in ours")


def test_modules_to_save_round_trip_and_disable(base, tmp_path):
    """A trained lm_head/embed_tokens copy goes ours -> file -> peft -> file -> ours unchanged,
    and disabling reverts both to the originals in ours and in peft alike."""
    folder, _, _ = base
    ours, peft_model = _pair(base, targets=["q_proj"], modules_to_save=["lm_head", "embed_tokens"])
    save_adapter(ours, tmp_path / "a")
    in_peft = peft.PeftModel.from_pretrained(transformers.MistralForCausalLM.from_pretrained(folder), tmp_path / "a")
    in_peft.save_pretrained(tmp_path / "b")
    back = load_adapter(Mistral.from_pretrained(folder), tmp_path / "b").eval()
    for name in ("lm_head", "model.embed_tokens"):
        assert torch.equal(back.get_submodule(name).modules_to_save.weight, ours.get_submodule(name).modules_to_save.weight), name
    _assert_logits_equal(back, peft_model, "after the round trip")
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad(), disable_adapters(back), peft_model.disable_adapter():
        diff = float((back(ids) - peft_model(input_ids=ids).logits).abs().max())
    assert diff <= LOGIT_TOL, f"disabled: ours vs peft differ by {diff:.3g}"


def test_pissa_init_matches_peft(base, tmp_path):
    """PiSSA: the same A, B and residual base as peft, logits of the base model at init; peft's saved
    PiSSA adapter re-derives the residual from the original weights in ours as in peft."""
    folder, hf, ours = base
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        before = hf(input_ids=ids).logits
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=["q_proj", "up_proj"], init="pissa"))
    peft_model = peft.get_peft_model(hf, _peft_config(["q_proj", "up_proj"], init="pissa")).eval()
    inner = peft_model.base_model.model
    for name, layer in lora_layers(ours):
        theirs = inner.get_submodule(name)
        for mine, ref, what in [(layer.lora_A, theirs.lora_A["default"].weight, "A"), (layer.lora_B, theirs.lora_B["default"].weight, "B"),
                                (layer.weight, theirs.base_layer.weight, "residual")]:
            diff = float((mine.detach() - ref.detach()).abs().max())
            assert diff <= 1e-5, f"{name} PiSSA {what} differs from peft by {diff:.3g}"
    got = _assert_logits_equal(ours, peft_model, "PiSSA at init")
    assert float((got - before).abs().max()) <= 1e-4, "PiSSA at init must reproduce the base model"
    with torch.no_grad():
        theirs = inner.get_submodule("model.layers.0.self_attn.q_proj")
        theirs.lora_B["default"].weight.add_(0.05)  # "train" peft's adapter a little
    peft_model.save_pretrained(tmp_path / "pissa")
    fresh = load_adapter(Mistral.from_pretrained(folder), tmp_path / "pissa").eval()
    _assert_logits_equal(fresh, peft_model, "peft's PiSSA adapter in ours")


def test_regex_targets_pick_what_peft_picks(base, tmp_path):
    """A regex must match the whole module name (peft's re.fullmatch); the file keeps the regex."""
    folder, _, _ = base
    regex = r".*layers\.0\..*(q|v|up)_proj"
    ours, peft_model = _pair(base, targets=regex)
    wrapped = {name for name, _ in lora_layers(ours)}
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == peft_wrapped and len(wrapped) == 3, f"ours {sorted(wrapped)} vs peft {sorted(peft_wrapped)}"
    save_adapter(ours, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(transformers.MistralForCausalLM.from_pretrained(folder), tmp_path / "a").eval()
    assert loaded.peft_config["default"].target_modules == regex
    _assert_logits_equal(ours, loaded, "regex targets: our file in peft")
