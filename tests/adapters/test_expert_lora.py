"""LoRA on MoE expert weights without an oracle library: the hand formula per expert on both dispatch paths,
merge / unmerge / merge_and_unload (float and NF4 stacks), disabling, the peft file's target order, NF4 expert
stacks through from_pretrained and the state dict, the run config, and the errors (one line naming the entry).
Parity with peft and bitsandbytes is tests/oracle/test_moe_adapters_parity.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mistral_train import Mistral, MistralConfig
from mistral_train.adapters import (
    LoraConfig,
    apply_lora,
    disable_adapters,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from mistral_train.adapters.expert_lora import ExpertLoRA, expert_adapters
from mistral_train.config import AdapterSpec, load_run_config
from mistral_train.model.moe import expert_groups
from mistral_train.quant import quantize_model
from mistral_train.quant.nf4_experts import NF4ExpertStack
from mistral_train.train.model_setup import lora_config

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = 1e-5


def _moe(seed: int = 0, **overrides) -> Mistral:
    """A tiny Mixtral (4 experts, top-2, hidden 32, 2 layers) with order-one weights."""
    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, model_type="mixtral", mlp_kind="moe", num_local_experts=4,
                           num_experts_per_tok=2, **overrides)
    torch.manual_seed(seed)
    model = Mistral(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def lora_rows_reference(rows: torch.Tensor, adapter: ExpertLoRA, expert: int) -> torch.Tensor:
    """s * B_e A_e x for rows of one expert, the plain way: A_e = lora_A rows e*r.., B_e = lora_B columns e, e+E, ..."""
    E, r = adapter.num_experts, adapter.r
    a_e, b_e = adapter.lora_A[expert * r:(expert + 1) * r], adapter.lora_B[:, expert::E]
    return (rows @ a_e.T) @ b_e.T * adapter.scaling


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per-expert"])
def test_each_expert_adds_its_own_low_rank_term(grouped):
    """Experts.project with the adapter = base grouped product + s B_e A_e x, expert by expert (hand formula)."""
    model = _moe()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS, init="none"))
    experts = model.model.layers[0].mlp.experts
    experts.grouped = grouped
    adapter = experts.gate_up_proj_lora
    x = torch.randn(10, 32)
    chosen = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3], [3, 0], [1, 2], [0, 3], [2, 1], [3, 1], [0, 2]])
    order, counts = expert_groups(chosen, 4)
    rows = x[order // 2]
    out = experts.project("gate_up_proj", rows, counts)
    start = 0
    for e, n in enumerate(counts.tolist()):
        part = rows[start:start + n]
        expected = part @ experts.gate_up_proj[e].T + lora_rows_reference(part, adapter, e)
        assert (out[start:start + n] - expected).abs().max() <= TOL, e
        start += n
    assert (lora_rows_reference(rows, adapter, 0)).abs().max() > 0.1  # the term is not vacuous


def test_merge_unmerge_unload_and_disable():
    model = _moe()
    base = copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, init="none"))
    ids = _ids()
    with torch.no_grad():
        live, plain = model(ids), base(ids)
        assert (live - plain).abs().max() > 0.1
        with disable_adapters(model):
            assert torch.equal(model(ids), plain)
        merge_lora(model)
        assert (model(ids) - live).abs().max() <= TOL
        with pytest.raises(ValueError, match="unmerge_lora"):
            with disable_adapters(model):
                pass
        unmerge_lora(model)
        assert (model.model.layers[0].mlp.experts.gate_up_proj - base.model.layers[0].mlp.experts.gate_up_proj).abs().max() <= TOL
        unloaded = merge_and_unload(model)
        assert not expert_adapters(unloaded) and "gate_up_proj_lora" not in dict(unloaded.named_modules())
        assert (unloaded(ids) - live).abs().max() <= TOL


def test_merge_and_unload_dequantizes_an_nf4_stack():
    model = quantize_model(_moe(), compute_dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS, init="none"))
    ids = _ids()
    with torch.no_grad():
        live = model(ids)
        with pytest.raises(ValueError, match="cannot merge into the NF4 expert weight"):
            merge_lora(model)
        merged = merge_and_unload(model)
        weight = merged.model.layers[1].mlp.experts.down_proj
        assert isinstance(weight, nn.Parameter) and weight.shape == (4, 32, 64)
        assert (merged(ids) - live).abs().max() <= TOL


def test_a_peft_file_lists_target_parameters_in_any_order(tmp_path):
    """peft writes target_parameters from a set; the nesting (which weight is `base_layer.`) follows the module's
    parameter order, so a file with the list reversed loads the same tensors into the same weights."""
    model = _moe()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=EXPERTS, init="none"))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_parameters"] = list(reversed(config["target_parameters"]))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_adapter(_moe(), tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_from_pretrained_nf4_quantizes_expert_stacks_and_keeps_the_router_float(tmp_path):
    model = _moe()
    model.save_pretrained(tmp_path / "base")
    quantized = Mistral.from_pretrained(tmp_path / "base", quantize="nf4")
    for layer in quantized.model.layers:
        assert type(layer.mlp.gate) is nn.Linear and layer.mlp.gate.weight.dtype == torch.float32
        assert isinstance(layer.mlp.experts.gate_up_proj, NF4ExpertStack)
    reference = quantize_model(copy.deepcopy(model), compute_dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(quantized(ids), reference(ids))  # the same quantisation, while reading or after
        # the state dict round trip: bitsandbytes' keys under the parameter's name, loaded into a fresh stack
        state = reference.state_dict()
        assert "model.layers.0.mlp.experts.down_proj.quant_state.bitsandbytes__nf4" in state
        fresh = quantize_model(_moe(seed=5), compute_dtype=torch.float32)
        fresh.load_state_dict(state)
        assert torch.equal(fresh(ids), reference(ids))


def test_run_config_carries_target_parameters():
    cfg = load_run_config(overrides=["adapter=lora", "adapter.target_parameters=[mlp.experts.gate_up_proj]"])
    assert cfg.adapter.target_parameters == ["mlp.experts.gate_up_proj"]
    assert lora_config(cfg.adapter).target_parameters == ["mlp.experts.gate_up_proj"]
    assert lora_config(AdapterSpec(kind="lora")).target_parameters == []


def test_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"target_parameters entry 'experts.w1' matches no parameter.*down_proj"):
        apply_lora(_moe(), LoraConfig(target_modules=[], target_parameters=["experts.w1"]))
    with pytest.raises(ValueError, match=r"'model.norm.weight' names `model.norm.weight` \(32,\)"):
        apply_lora(_moe(), LoraConfig(target_modules=[], target_parameters=["model.norm.weight"]))
    with pytest.raises(ValueError, match="LoraConfig.dropout=0.1 cannot be used with target_parameters"):
        LoraConfig(dropout=0.1, target_parameters=EXPERTS)
    with pytest.raises(ValueError, match=r"`model.layers.0.mlp.gate` is a MoE router.*target_parameters=\['gate.weight'\]"):
        apply_lora(_moe(), LoraConfig(r=2, target_modules=["gate"]))
    with pytest.raises(ValueError, match="named by both target_modules and target_parameters"):
        apply_lora(_moe(), LoraConfig(target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"]))
    model = _moe()
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"], target_parameters=["nothing"]))
    assert not any("lora" in name for name, _ in model.named_parameters()), "a failed apply changed the model"


def test_a_qlora_run_trains_expert_adapters_over_nf4_experts(tmp_path):
    """fit() with adapter=qlora and adapter.target_parameters on a tiny Mixtral folder (read through
    from_pretrained(quantize="nf4"), which stores the experts in NF4: test above) trains, and final/ is a PEFT
    adapter with expert keys as peft nests them, whose expert B matrices moved, and nothing on the router."""
    from safetensors.torch import load_file

    from mistral_train.config import DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
    from mistral_train.data.sources import bundled_chat_path
    from mistral_train.train import fit
    from tests._tiny import save_tiny_folder

    base = save_tiny_folder(tmp_path / "base", tokenizer="v1", vocab_size=32000, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, model_type="mixtral",
                            mlp_kind="moe", num_local_experts=4, num_experts_per_tok=2)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(bundled_chat_path().read_text().splitlines()[:16]) + "\n")
    cfg = RunConfig(model=ModelSpec(path=str(base)), data=DataSpec(path=str(chat), format="messages"),
                    trainer=TrainerSpec(objective="sft", max_steps=3, max_seq_len=64, batch_size=4, lr=2e-2,
                                        warmup_steps=0, log_every=1, sample_max_new_tokens=1, eval_max_new_tokens=0),
                    adapter=AdapterSpec(kind="qlora", r=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS),
                    run=RunSpec(name="moe_qlora", dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False, plot=False))
    final = fit(cfg) / "final"
    written = json.loads((final / "adapter_config.json").read_text())
    assert written["target_parameters"] == EXPERTS and written["target_modules"] == ["q_proj"]
    saved = load_file(final / "adapter_model.safetensors")
    expert_b = [t for k, t in saved.items() if k.endswith("mlp.experts.base_layer.lora_B.weight")]
    assert len(expert_b) == 2 and all(float(t.abs().max()) > 0 for t in expert_b)
    assert not any(".mlp.gate." in key for key in saved)


def test_rank_and_alpha_patterns_pick_per_target_values():
    """peft's rule: the first pattern matching a tail of the target's name after a dot."""
    model = _moe()
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
                     rank_pattern={r".*\.gate_up_proj": 8, "layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    apply_lora(model, cfg)
    layers = model.model.layers
    assert layers[0].mlp.experts.gate_up_proj_lora.r == 8 and layers[0].mlp.experts.down_proj_lora.r == 4
    assert layers[0].mlp.experts.gate_up_proj_lora.lora_A.shape == (4 * 8, 32)
    assert layers[1].self_attn.q_proj.r == 2 and layers[0].self_attn.q_proj.r == 4
    assert layers[0].self_attn.v_proj.scaling == 3 / 4 and layers[0].self_attn.q_proj.scaling == 8 / 4
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]=0: a rank must be a positive int"):
        LoraConfig(rank_pattern={"q_proj": 0})


def test_nf4_storage_counts_expert_stacks():
    """nf4_storage_bytes covers the expert stacks too: 4 bits a weight plus the double-quantized block scales, as
    plan's NF4_BYTES says, over every decoder linear except the router and every expert weight."""
    from mistral_train.plan import NF4_BYTES
    from mistral_train.quant import nf4_storage_bytes

    model = _moe()
    experts = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 3)
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if type(m) is nn.Linear and not name.endswith(("mlp.gate", "lm_head")))
    stored, params = nf4_storage_bytes(quantize_model(model))
    assert params == experts + linears and experts > linears
    # the rest: the code books (16 NF4 levels, 256 nested levels, fp32, shared) and each tensor's partial blocks
    assert 0 <= stored - NF4_BYTES * params <= 2048 < 0.1 * stored


def test_vllm_weight_push_refuses_a_model_with_expert_adapters():
    """push_weights sends a plain model's state dict; expert adapters would be dropped silently, so it refuses
    (before touching an engine: no vLLM needed to check it)."""
    from mistral_train.rollout.vllm_engine import VLLMEngine

    model = apply_lora(_moe(), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="push_adapter"):
        VLLMEngine.push_weights(None, model)


@pytest.mark.parametrize("modules, params", [(["q_proj"], EXPERTS), ([], ["down_proj", "mlp.gate.weight"])])
def test_plan_counts_expert_adapters_as_the_model_has_them(modules, params):
    """plan's trainable count with adapter.target_parameters equals the adapted model's own count."""
    from mistral_train.plan import run_weights

    model = _moe()
    spec = AdapterSpec(kind="lora", r=4, alpha=8, target_modules=modules, target_parameters=params)
    apply_lora(model, lora_config(spec))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert run_weights(model.config, spec, 2).trainable == trainable
