"""LoRA and QLoRA on Mixtral's experts against peft, bitsandbytes and a hand formula (issue 16 item 4).

- Expert LoRA is peft's parameter-target LoRA (`target_parameters`, its ParamWrapper over the fused 3-D weights
  mlp.experts.gate_up_proj / down_proj). Our adapter, with random NON-ZERO A and B on experts and attention,
  loads with PeftModel.from_pretrained on transformers' MixtralForCausalLM with equal logits (fp32 1e-5), and a
  peft-written one loads in ours; the files' keys are the ones peft writes, and the gradients of every adapter
  tensor agree.
- The router (mlp.gate) gets no adapter from all-linear and stays float under QLoRA.
- NF4 expert stacks are bitsandbytes' quantize_4bit bytes of the same tensor, and dequantize as its
  dequantize_4bit does (transformers 5.25 keeps 3-D expert parameters float under BitsAndBytesConfig, so
  bitsandbytes' functional API is the reference for the stack).
- DPO with expert LoRA: the adapter-disabled and the copy reference both run, start at ln 2, give the base
  model's log-probs, and one step moves only adapter tensors.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.adapters import LoraConfig, apply_lora, disable_adapters, load_adapter, lora_layers, save_adapter  # noqa: E402
from mistral_train.adapters.expert_lora import expert_adapters  # noqa: E402
from mistral_train.adapters.peft_format import _live_tensors  # noqa: E402
from mistral_train.config import DPOSpec  # noqa: E402
from mistral_train.data.preference import PreferencePair, collate_pairs  # noqa: E402
from mistral_train.quant import NF4Linear, dequantize_model, quantize_model  # noqa: E402
from mistral_train.quant.nf4_experts import NF4ExpertStack  # noqa: E402
from mistral_train.train.loop import backward_window  # noqa: E402
from mistral_train.train.reference import build_reference  # noqa: E402
from mistral_train.train.steps import dpo_objective, sequence_logprobs  # noqa: E402
from tests.conftest import randomize_, tiny_kwargs  # noqa: E402

TOL = 1e-5
R, ALPHA = 4, 8
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _pair(seed: int = 0):
    """(ours, transformers' MixtralForCausalLM), same order-one weights: 4 experts, top-2, hidden 32, 2 layers."""
    hf_config = transformers.MixtralConfig(**tiny_kwargs(num_local_experts=4, num_experts_per_tok=2))
    hf_config._attn_implementation = "sdpa"
    hf = randomize_(transformers.MixtralForCausalLM(hf_config), seed=seed)
    ours = Mistral(MistralConfig.from_hf_dict(json.loads(hf_config.to_json_string()), source="mixtral"))
    ours.load_state_dict(hf.state_dict())
    return ours.eval(), hf.eval()


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize_adapters(model, seed: int = 1) -> None:
    """Order-0.1..1 random A and B everywhere, so every adapter term (every expert's too) shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for _, tensor in sorted(_live_tensors(model).items()):
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.3 if "lora_A" in _ else 0.2))


def _peft_keys(peft_model) -> dict[str, torch.Tensor]:
    """peft's adapter parameters by the key its file uses (the `.default` adapter name dropped)."""
    return {f"{name.replace('.default', '')}": p for name, p in peft_model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("targets, params", [
    (["q_proj", "v_proj"], EXPERTS),
    ("all-linear", EXPERTS),
    ([], ["down_proj"]),  # one weight per module: no base_layer nesting in the keys
], ids=["attn+experts", "all-linear+experts", "down_proj-only"])
def test_our_expert_adapter_loads_in_peft_with_equal_logits_and_gradients(tmp_path, targets, params):
    ours, hf = _pair()
    ids = _ids()
    with torch.no_grad():
        base_logits = ours(ids)
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=targets, target_parameters=params))
    assert len(expert_adapters(ours)) == 2 * (2 if len(params) == 2 else 1)
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_parameters"] == params

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()
    ours_logits = ours(ids)
    theirs = peft_model(input_ids=ids).logits
    assert (ours_logits - theirs).abs().max() <= TOL
    assert (ours_logits - base_logits).abs().max() > 0.1, "the adapters must change the logits"

    # the same keys peft writes for a fresh adapter of the config we wrote (all-linear is stored expanded: peft's
    # own all-linear on a MoE also adapts the router, see test_router_...), and every adapter tensor's gradient
    fresh = peft.get_peft_model(_pair()[1], peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=written["target_modules"],
                                                             target_parameters=params))
    ours_tensors, theirs_tensors = _live_tensors(ours), _peft_keys(peft_model)
    assert set(ours_tensors) == set(_peft_keys(fresh)) == set(theirs_tensors)
    ours_logits.float().square().mean().backward()
    theirs.float().square().mean().backward()
    for key, p in ours_tensors.items():
        scale = theirs_tensors[key].grad.abs().max()
        assert scale > 0 and (p.grad - theirs_tensors[key].grad).abs().max() <= TOL * max(1.0, float(scale)), key


def test_a_peft_expert_adapter_loads_in_ours_with_equal_logits(tmp_path):
    ours, hf = _pair()
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["k_proj", "o_proj"], target_parameters=EXPERTS,
                             init_lora_weights=False, use_rslora=True)  # init False: random non-zero B
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    load_adapter(ours, tmp_path / "theirs")
    assert {name.rpartition(".")[2] for name, _ in lora_layers(ours)} == {"k_proj", "o_proj"}
    assert all(torch.count_nonzero(a.lora_B) > 0 for _, a in expert_adapters(ours))
    ids = _ids(seed=4)
    with torch.no_grad():
        diff = (ours(ids) - peft_model(input_ids=ids).logits).abs().max()
        with disable_adapters(ours):  # switched off: exactly the base model
            off = (ours(ids) - _pair()[0](ids)).abs().max()
    assert diff <= TOL and off == 0


def test_expert_lora_is_per_expert_w_plus_s_b_a_in_peft_layout():
    """Hand formula: the adapted expert e computes with W_e + s B_e A_e, where A_e is rows e*r.. of lora_A and
    B_e column j is lora_B column j*E + e (peft's reshape): merging gives the same logits as the live adapter."""
    ours, _ = _pair()
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=[], target_parameters=EXPERTS, init="none"))
    name, adapter = expert_adapters(ours)[0]
    E, r = adapter.num_experts, adapter.r
    a, b = adapter.factors()
    for e in range(E):
        assert torch.equal(a[e], adapter.lora_A[e * r:(e + 1) * r])
        assert torch.equal(b[e], adapter.lora_B[:, e::E])
    ids = _ids()
    with torch.no_grad():
        live = ours(ids)
        weight = ours.get_submodule(name.rpartition(".")[0]).gate_up_proj.detach().clone()
        merged = copy.deepcopy(ours)
        from mistral_train.adapters import merge_lora
        merge_lora(merged)
        delta = merged.get_submodule(name.rpartition(".")[0]).gate_up_proj - weight
        expected = adapter.scaling * torch.stack([b[e] @ a[e] for e in range(E)])
        assert (delta - expected).abs().max() <= TOL
        assert (merged(ids) - live).abs().max() <= TOL


def test_router_has_no_adapter_and_stays_float_under_qlora():
    ours, _ = _pair()
    quantize_model(ours, compute_dtype=torch.float32)
    for layer in ours.model.layers:
        assert type(layer.mlp.gate) is torch.nn.Linear and layer.mlp.gate.weight.dtype == torch.float32
        assert isinstance(layer.mlp.experts.gate_up_proj, NF4ExpertStack)
        assert isinstance(layer.mlp.experts.down_proj, NF4ExpertStack)
        assert isinstance(layer.self_attn.q_proj.base_layer if hasattr(layer.self_attn.q_proj, "base_layer")
                          else layer.self_attn.q_proj, NF4Linear)
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear", target_parameters=EXPERTS, init="none"))
    adapted = {name for name, _ in lora_layers(ours)} | {name for name, _ in expert_adapters(ours)}
    assert not any(".mlp.gate" in name for name in adapted) and len(adapted) == 2 * (4 + 2)
    # peft's all-linear differs here: on transformers v5 it maps v4's linears (w1/w2/w3 and the router gate) onto
    # target_parameters, router included; ours leaves the router alone unless named (test below)
    theirs = peft.get_peft_model(_pair()[1], peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    assert "gate.weight" in theirs.peft_config["default"].target_parameters
    dense = dequantize_model(copy.deepcopy(ours), torch.float32)  # the same adapters over float expert weights
    ours.train()
    ids = _ids()
    ours(ids, labels=ids).backward()
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)  # router, experts and the rest frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in ours.named_parameters() if p.requires_grad)

    # the NF4 path computes with the dequantized stack: equal to the same adapters over a float copy of it
    ours.eval()
    assert all(isinstance(layer.mlp.experts.down_proj, torch.nn.Parameter) for layer in dense.model.layers)
    with torch.no_grad():
        assert (ours(ids) - dense(ids)).abs().max() <= TOL


def test_a_router_is_adapted_only_when_named():
    ours, hf = _pair()
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"],
                                init="none"))
    assert {name for name, _ in lora_layers(ours)} >= {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    # the same as peft's ParamWrapper on transformers' router weight (its key names included)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"],
                                                         target_parameters=["mlp.gate.weight"]))
    ours_tensors, theirs = _live_tensors(ours), _peft_keys(peft_model)
    assert set(ours_tensors) == set(theirs)
    with torch.no_grad():
        for key, t in ours_tensors.items():
            theirs[key].copy_(t)
        ids = _ids()
        assert (ours(ids) - peft_model.eval()(input_ids=ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_expert_stack_equals_bitsandbytes_bytes_and_dequantization(double_quant):
    ours, _ = _pair()
    stacks = {name: p.detach().clone() for name, p in ours.named_parameters() if p.ndim == 3}
    quantize_model(ours, compute_dtype=torch.float32, double_quant=double_quant)
    assert len(stacks) == 4
    for name, weight in stacks.items():
        module_name, _, param = name.rpartition(".")
        stack = getattr(ours.get_submodule(module_name), param)
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                     quant_type="nf4")
        assert torch.equal(stack.packed, packed), name
        if double_quant:
            assert torch.equal(stack.absmax, state.absmax) and torch.equal(stack.nested_absmax, state.state2.absmax)
            assert stack.offset == pytest.approx(float(state.offset), abs=0)
        else:
            assert torch.equal(stack.absmax, state.absmax)
        # bitsandbytes' CPU dequantize is wrong for a last dim that is no multiple of 64 (gate_up_proj's 32 here,
        # STACK-NOTES trap 2), so it decodes the same bytes as whole rows of 64, the blocks they are
        state.shape = torch.Size((weight.numel() // 64, 64))
        reference = bnb_functional.dequantize_4bit(packed, state).reshape(weight.shape)
        assert torch.equal(stack.dequantize(torch.float32), reference), name
        assert (stack.dequantize(torch.float32) - weight).abs().max() <= weight.abs().max() / 7  # NF4's step
    keys = ours.state_dict().keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.experts.gate_up_proj.absmax" in keys


def _pairs_batch():
    gen = torch.Generator().manual_seed(7)

    def ids(n):
        return torch.randint(3, 128, (n,), generator=gen).tolist()

    pairs = [PreferencePair([1] + ids(4), ids(5) + [2], ids(3) + [2], "test", row) for row in range(2)]
    return collate_pairs(pairs, pad_id=0, packing=False, max_seq_len=32)


@pytest.mark.parametrize("kind", ["adapter_off", "copy", "initial_adapter"])  # the last: the starting (zero-B) adapter
def test_dpo_step_with_a_moe_reference(kind):
    ours, _ = _pair()
    base = copy.deepcopy(ours)
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS))
    batch = _pairs_batch()
    reference = build_reference(kind, ours, 64)
    objective = dpo_objective(DPOSpec(beta=0.5), reference, 64)
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}
    ours.train()
    loss, _, stats = backward_window(ours, objective, [batch], contextlib.nullcontext)
    assert loss == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert "router_aux_loss" in stats  # the MoE aux term is in the same backward
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0).step()
    moved = {name for name, p in ours.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved and all("lora_B" in name for name in moved)  # B first: A's gradient is B^T (...) = 0 at B = 0
    assert any("experts.gate_up_proj_lora" in name for name in moved)

    ours.eval()
    with torch.no_grad():
        ref = reference(ours, batch)
        expected, _ = sequence_logprobs(base.eval(), batch, 64)
        policy, _ = sequence_logprobs(ours, batch, 64)
    assert (ref - expected).abs().max() <= TOL  # the reference is the base model...
    assert (policy - expected).abs().max() > 1e-3  # ...while the policy moved
    loss2, _, _ = backward_window(ours.train(), objective, [batch], contextlib.nullcontext)
    assert loss2 < math.log(2)


def test_merged_expert_adapter_exports_a_folder_transformers_loads_as_peft_merges_it(tmp_path):
    """`mistral-train merge`'s path (merge_adapter_folder): base folder + our expert adapter -> an HF folder that
    MixtralForCausalLM loads with the logits of peft's own merge_and_unload of the same adapter."""
    from mistral_train.train.export import merge_adapter_folder

    ours, hf = _pair()
    hf.save_pretrained(tmp_path / "base")
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=["q_proj"], target_parameters=EXPERTS))
    _randomize_adapters(ours, seed=9)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    difference = merge_adapter_folder(tmp_path / "adapter", tmp_path / "merged", base=str(tmp_path / "base"),
                                      dtype="float32")
    assert difference <= TOL
    merged = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_merged = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().eval()
    ids = _ids(seed=6)
    with torch.no_grad():
        expected = peft_merged(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() <= TOL
        assert (expected - _pair()[1](input_ids=ids).logits).abs().max() > 0.1  # the merge changed the model


def test_mistral_small4_expert_adapter_loads_in_peft_with_equal_logits(tmp_path):
    """The same on Mistral Small 4 (transformers' Mistral4ForCausalLM: latent attention, shared experts beside the
    routed ones, a dense first layer): all-linear + routed-expert LoRA, our file in peft, equal logits."""
    from tests.oracle.test_mistral4_parity import _pair as mistral4_pair

    ours, hf = mistral4_pair()
    ours.eval(), hf.eval()
    apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear", target_parameters=EXPERTS))
    assert not any(name.endswith("mlp.gate") for name, _ in lora_layers(ours))  # the router stays out
    assert any("shared_experts" in name for name, _ in lora_layers(ours)) and len(expert_adapters(ours)) == 2 * 2
    _randomize_adapters(ours, seed=4)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert set(_live_tensors(ours)) == set(_peft_keys(peft_model))
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_logits = ours(ids)
        assert (ours_logits - peft_model(input_ids=ids).logits).abs().max() <= TOL
        with disable_adapters(ours):
            assert (ours(ids) - ours_logits).abs().max() > 0.1


def test_peft_all_linear_adapter_on_mixtral_loads_in_ours_and_back(tmp_path):
    """peft's own all-linear on a transformers v5 Mixtral: it maps v4's linears onto target_parameters (router
    gate.weight, gate_up_proj with r and alpha doubled through rank_pattern / alpha_pattern, down_proj). Such a
    file loads in ours with equal logits, and what we save from it loads back in peft with equal logits."""
    ours, hf = _pair()
    torch.manual_seed(8)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                         init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    stored = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert stored["rank_pattern"] == {r".*\.gate_up_proj": 2 * R} and "gate.weight" in stored["target_parameters"]
    load_adapter(ours, tmp_path / "theirs")
    assert expert_adapters(ours)[0][1].r == 2 * R and expert_adapters(ours)[1][1].r == R  # gate_up_proj, down_proj
    assert "model.layers.0.mlp.gate" in {name for name, _ in lora_layers(ours)}  # named by peft's file: adapted
    ids = _ids(seed=8)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert (ours(ids) - expected).abs().max() <= TOL
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_pair()[1], tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - expected).abs().max() <= TOL
