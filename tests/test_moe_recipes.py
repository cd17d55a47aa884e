"""Fresh mixture-of-experts models from a recipe: the model group's expert keys build a Mixtral, a training
forward records tokens per expert per layer (padding excluded), the loop logs them as expert_tokens/L/E, the
run's loss plot gains an expert-load panel, and the tiny MoE recipe runs end to end on CPU."""

import json

import pytest
import torch
import transformers

from mistral_train import Mistral, MistralConfig
from mistral_train.cli import main
from mistral_train.config import ModelSpec, load_run_config
from mistral_train.model.moe import take_aux_loss, take_expert_load
from mistral_train.tracking.metrics import expert_load_metrics
from mistral_train.tracking.plots import draw_run, expert_load

SHORT = ["trainer.max_steps=2", "trainer.max_seq_len=64", "trainer.batch_size=2", "tracking.progress_bar=false",
         "trainer.log_every=1", "trainer.sample_max_new_tokens=2", "model.hidden_size=64",
         "model.intermediate_size=32", "model.num_hidden_layers=2", "stages.sft.trainer.max_steps=2",
         "stages.sft.trainer.eval_max_new_tokens=2", "stages.sft.trainer.sample_max_new_tokens=2",
         "stages.sft.trainer.eval_every=null"]


def _tiny_moe(**over) -> Mistral:
    spec = ModelSpec(**{**dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, model_type="mixtral", num_local_experts=4,
                                num_experts_per_tok=2, router_aux_loss_coef=0.02), **over})
    torch.manual_seed(0)
    return Mistral(MistralConfig.from_spec(spec, vocab_size=64))


def test_the_tiny_moe_model_group_builds_a_mixtral_with_its_expert_keys():
    cfg = load_run_config("tiny_moe_pretrain_sft")
    config = MistralConfig.from_spec(cfg.model, vocab_size=32000)
    assert (config.model_type, config.mlp_kind) == ("mixtral", "moe")
    assert (config.num_local_experts, config.num_experts_per_tok, config.router_aux_loss_coef) == (8, 2, 0.01)
    # hand count: tied 32000 x 256 embedding, final norm; per layer attention (q, o 256x256; k, v 256x128),
    # 8 experts of 3 x 256 x 192, the 256 x 8 router and two norms
    layer = 2 * 256 * 256 + 2 * 256 * 128 + 8 * 3 * 256 * 192 + 256 * 8 + 2 * 256
    assert sum(p.numel() for p in Mistral(config).parameters()) == 32000 * 256 + 256 + 4 * layer == 13_707_520


def test_a_fresh_mixtral_from_a_spec_saves_a_folder_transformers_loads_with_equal_logits(tmp_path):
    model = _tiny_moe().eval()
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    assert (theirs.config.num_local_experts, theirs.config.router_aux_loss_coef) == (4, 0.02)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() <= 1e-5


def test_a_dense_spec_ignores_the_expert_keys_and_an_unknown_model_type_is_named():
    assert MistralConfig.from_spec(ModelSpec(num_local_experts=3), vocab_size=64).mlp_kind == "dense"
    with pytest.raises(ValueError, match="`model_type` 'mixtrall' is not one of"):
        MistralConfig.from_spec(ModelSpec(model_type="mixtrall"), vocab_size=64)


def test_expert_load_counts_each_layers_routed_real_tokens():
    model = _tiny_moe().train()
    gates = []  # each layer's router logits, seen from outside the model
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda module, args, out: gates.append(out.detach()))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # three padding tokens: routed by the model, not counted
    model(ids, attention_mask=mask)
    load = take_expert_load(model)
    real = mask.reshape(-1).bool()
    for layer, logits in enumerate(gates):
        chosen = logits[real].topk(2, dim=-1).indices  # the top-2 experts of each real token
        assert load[layer].tolist() == [int((chosen == e).sum()) for e in range(4)]
        assert int(load[layer].sum()) == 2 * 11  # k x real tokens
    assert take_expert_load(model) is None  # taken once
    assert take_aux_loss(model) is not None


def test_expert_load_is_recorded_with_the_aux_loss_off_and_not_outside_training():
    model = _tiny_moe(router_aux_loss_coef=0.0).train()
    ids = torch.randint(3, 64, (1, 5))
    model(ids)
    assert take_aux_loss(model) is None and int(take_expert_load(model).sum(1)[0]) == 2 * 5
    model.eval()
    model(ids)
    assert take_expert_load(model) is None


def test_expert_load_metrics_and_the_plots_mean_over_layers():
    load = torch.tensor([[3, 1], [1, 3]])
    metrics = expert_load_metrics(load)
    assert metrics == {"expert_tokens/0/0": 3.0, "expert_tokens/0/1": 1.0, "expert_tokens/1/0": 1.0,
                       "expert_tokens/1/1": 3.0}
    rows = [{"step": 1, "loss": 2.0, **metrics}, {"step": 2, "loss": 1.5, "expert_tokens/0/0": 4.0,
                                                  "expert_tokens/0/1": 0.0, "expert_tokens/1/0": 2.0,
                                                  "expert_tokens/1/1": 2.0}]
    assert expert_load(rows) == ([1, 2], {0: [2.0, 3.0], 1: [2.0, 1.0]})
    labels = [ax.get_ylabel() for ax in draw_run(rows).axes]
    assert any(label.startswith("tokens per expert") for label in labels)
    assert not any(label.startswith("tokens per expert") for label in draw_run([{"step": 1, "loss": 2.0}]).axes
                   for label in [label.get_ylabel()])


def test_the_tiny_moe_recipe_logs_expert_load_in_both_stages_and_plots_it(tmp_path):
    assert main(["recipe=tiny_moe_pretrain_sft", f"run.dir={tmp_path}", *SHORT]) == 0
    home = tmp_path / "tiny_moe_pretrain_sft"
    for stage in ("pretrain", "sft"):
        rows = [json.loads(line) for line in (home / stage / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rows if "loss" in r]
        assert [r["step"] for r in trained] == [1, 2]
        for row in trained:
            per_layer = [sum(row[f"expert_tokens/{layer}/{e}"] for e in range(8)) for layer in range(2)]
            assert per_layer[0] == per_layer[1] > 0 and per_layer[0] % 2 == 0  # k = 2 per routed token
            assert row["router_aux_loss"] > 0  # logged beside the load: E * sum f_e P_e (k = 2 when balanced)
        assert (home / stage / "loss.png").stat().st_size > 0
    pretrain = [json.loads(line) for line in (home / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    # pretraining rows are packed full: every one of the 2 x 64 tokens is routed to 2 experts
    assert sum(pretrain[0][f"expert_tokens/0/{e}"] for e in range(8)) == 2 * 2 * 64
    config = json.loads((home / "sft" / "final" / "config.json").read_text())
    assert (config["architectures"], config["num_local_experts"]) == (["MixtralForCausalLM"], 8)
