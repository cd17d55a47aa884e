"""`plan` for mixture-of-experts models: the Mixtral-8x7B and Mistral Small 4 presets reproduce the published
config.json; the total and active parameters `mistral-train plan` prints equal a hand count from that config,
equal what transformers (and our own Mistral) builds from it on the meta device, and are within 1% of the
published figures; routed experts are NF4 under QLoRA (the router is not) and sharded with the weights by FSDP2;
each recipe's header quotes its plan and fits the GPU it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from mistral_train import Mistral, MistralConfig
from mistral_train.cli import main
from mistral_train.config import load_run_config
from mistral_train.plan import NF4_BYTES, PlanOptions, plan_run

REPO = Path(__file__).resolve().parents[1]

# mistralai/Mixtral-8x7B-v0.1's config.json (the keys that shape the weights)
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False)
# mistralai/Mistral-Small-4-119B-2603's (transformers documents Mistral4Config's defaults as this checkpoint)
SMALL_4 = dict(vocab_size=131072, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, q_lora_rank=1024,
               kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=128,
               n_shared_experts=1, moe_intermediate_size=2048, num_experts_per_tok=4, first_k_dense_replace=0,
               tie_word_embeddings=False)


def mixtral_hand(c: dict) -> tuple[int, int]:
    """(total, active) of a Mixtral: per layer q, o (heads x 128), k, v (kv heads x 128), E experts of 3 h i, the
    E x h router, two norms; embedding, final norm, untied head. Active: k of the E experts."""
    h, i, d, e, k = c["hidden_size"], c["intermediate_size"], 128, c["num_local_experts"], c["num_experts_per_tok"]
    attention = 2 * h * c["num_attention_heads"] * d + 2 * h * c["num_key_value_heads"] * d
    other = c["num_hidden_layers"] * (attention + e * h + 2 * h) + 2 * c["vocab_size"] * h + h
    experts = c["num_hidden_layers"] * e * 3 * h * i
    return other + experts, other + experts * k // e


def small4_hand(c: dict) -> tuple[int, int]:
    """(total, active) of Mistral Small 4: per layer q_a (h -> q rank), its norm, q_b (q rank -> heads x (nope +
    rope)), kv_a (h -> kv rank + rope), its norm, kv_b (kv rank -> heads x (nope + v)), o (heads x v -> h), the
    shared expert (3 h i), E routed experts (3 h i each), the E x h router, two norms; embedding, norm, head."""
    h, heads, i, e = c["hidden_size"], c["num_attention_heads"], c["moe_intermediate_size"], c["n_routed_experts"]
    qr, kvr, nope, rope, v = (c["q_lora_rank"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                              c["v_head_dim"])
    attention = h * qr + qr + qr * heads * (nope + rope) + h * (kvr + rope) + kvr + kvr * heads * (nope + v) + heads * v * h
    layer = attention + c["n_shared_experts"] * 3 * h * i + e * h + 2 * h
    other = c["num_hidden_layers"] * layer + 2 * c["vocab_size"] * h + h
    experts = c["num_hidden_layers"] * e * 3 * h * i
    return other + experts, other + experts * c["num_experts_per_tok"] // e


def meta_count(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


def planned(recipe: str, gpu_gib: int, capsys) -> tuple[int, float, str]:
    """(total parameters, active billions, the whole printout) of `mistral-train plan recipe=R device_gib=G`."""
    assert main(["plan", f"recipe={recipe}", f"device_gib={gpu_gib}"]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"^model: ([\d,]+) parameters", out, re.M).group(1).replace(",", ""))
    active = float(re.search(r"([\d.]+) B active per token", out).group(1))
    return total, active, out


# recipe -> (published config, hand count, transformers class and config, published total / active billions, GPU)
ROWS = {
    "mixtral_8x7b_qlora_sft": (MIXTRAL_8X7B, mixtral_hand, "MixtralForCausalLM", "mixtral", 46.7, 12.9, 40),
    "mistral_small4_qlora_sft": (SMALL_4, small4_hand, "Mistral4ForCausalLM", "mistral4", 119.0, 6.5, 80),
}


@pytest.mark.parametrize("recipe", ROWS)
def test_plan_counts_total_and_active_parameters_of_the_published_moe_models(recipe, capsys):
    config, hand, class_name, model_type, total_b, active_b, gpu = ROWS[recipe]
    total, active, _ = planned(recipe, gpu, capsys)
    hand_total, hand_active = hand(config)
    assert total == hand_total
    assert active == round(hand_active / 1e9, 2)
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    assert total == meta_count(getattr(transformers, class_name), hf_config)  # transformers' model of that config
    assert total == meta_count(Mistral, MistralConfig.from_hf_dict(hf_config.to_dict()))  # and ours
    assert abs(total / 1e9 - total_b) / total_b < 0.01
    # Mixtral's 12.9 B active is within 1%; Small 4's card says 6.5 B where embedding + head + 4 of 128 experts
    # count 6.63 B (2%): the card does not say what it leaves out (the 0.54 B embedding lookup would give 6.09 B)
    assert abs(active - active_b) / active_b < (0.01 if model_type == "mixtral" else 0.025)


def test_the_presets_reproduce_the_published_configs():
    mixtral = yaml.safe_load((REPO / "configs/model/mixtral_8x7b.yaml").read_text())
    assert {k: mixtral[k] for k in MIXTRAL_8X7B} == MIXTRAL_8X7B and mixtral["model_type"] == "mixtral"
    small4 = yaml.safe_load((REPO / "configs/model/mistral_small4.yaml").read_text())
    assert {k: v for k, v in small4["hf_config"].items() if k in SMALL_4} == {
        k: v for k, v in SMALL_4.items() if k != "vocab_size"} and small4["vocab_size"] == SMALL_4["vocab_size"]
    default = transformers.Mistral4Config()  # a second witness: transformers' defaults are this checkpoint's
    assert {k: getattr(default, k) for k in SMALL_4} == SMALL_4


def _plan(recipe: str, *overrides: str, processes: int = 1):
    cfg = load_run_config(recipe, ["model.path=null", "data.path=null", *overrides])
    return plan_run(cfg, PlanOptions(num_processes=processes))


def test_qlora_stores_routed_experts_in_nf4_and_keeps_the_router_in_bf16():
    plan = _plan("mixtral_8x7b_qlora_sft")
    c, w = MIXTRAL_8X7B, plan.weights
    experts = 32 * 8 * 3 * 4096 * 14336
    attention = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert w.nf4_bytes == pytest.approx(NF4_BYTES * (experts + attention))
    router_norms_embeddings = 32 * (8 * 4096 + 2 * 4096) + 2 * c["vocab_size"] * 4096 + 4096
    assert w.frozen_bytes == 2 * router_norms_embeddings  # bf16
    assert w.trainable == 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)  # rank 16 on q, k, v, o only
    assert plan.expert_bytes["ddp"] == pytest.approx(NF4_BYTES * experts)


def test_expert_weights_per_device_are_sharded_with_the_weights():
    plan = _plan("mixtral_8x7b_qlora_sft", "adapter=none", processes=4)
    experts = 32 * 8 * 3 * 4096 * 14336
    assert plan.expert_bytes["ddp"] == 2 * experts  # bf16, whole on every process
    assert plan.expert_bytes["fsdp2"] == plan.expert_bytes["zero3"] == 2 * experts / 4
    assert plan.expert_bytes["zero2"] == 2 * experts and plan.expert_bytes["zero3_offload_params"] == 0


@pytest.mark.parametrize("recipe", ROWS)
def test_moe_recipes_quote_their_plan_and_fit_the_gpu_they_name(recipe, capsys):
    gpu = ROWS[recipe][-1]
    total, active, out = planned(recipe, gpu, capsys)
    single = next(line.split() for line in out.splitlines() if line.startswith("single"))
    row_total, fits = single[6], single[-1]
    assert fits == "yes" and float(row_total) + 1 <= gpu
    header = (REPO / "recipes" / f"{recipe}.yaml").read_text().split("defaults:")[0]
    assert f"{row_total} GiB" in header and f"fits {gpu} GiB" in header and f"device_gib={gpu}" in header
    assert f"{total / 1e9:.2f} B parameters, {active:.2f} B active" in header
