"""`mistral-train plan` (mistral_train/plan.py): parameter counts against real models, model states per strategy,
activations against what autograd saves, the fits verdict, and the verb. DeepSpeed's estimators:
tests/oracle/test_plan_deepspeed.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.adapters import LoraConfig, apply_lora
from mistral_train.cli import main
from mistral_train.config import AdapterSpec, RunConfig, load_run_config
from mistral_train.errors import ConfigError
from mistral_train.plan import (ADAMW8BIT_BYTES, GIB, NF4_BYTES, RESERVE_GIB, Activations, PlanOptions, activation_bytes,
                                format_plan, linear_shapes, module_sizes, plan_run, run_weights, split_plan_options)
from mistral_train.quant import nf4_storage_bytes, quantize_model

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, sliding_window=None)


def _run(shape: dict, adapter: str = "none", **trainer) -> RunConfig:
    """A RunConfig for a fresh model of `shape` (bundled v1 vocabulary: 32000), bf16 weights and autocast."""
    cfg = RunConfig()
    cfg.model = dataclasses.replace(cfg.model, dtype="bfloat16", tokenizer=None,
                                    **{k: v for k, v in shape.items() if k != "vocab_size"})
    cfg.trainer = dataclasses.replace(cfg.trainer, precision="bf16", **trainer)
    cfg.adapter = AdapterSpec(kind=adapter)
    return cfg


@pytest.fixture
def eager_torchao(monkeypatch):
    """torchao compiles its AdamW step per parameter shape (~15 s on a CPU): the same function, eagerly."""
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)


def _own_params(model: torch.nn.Module, trainable: bool | None = None) -> dict[str, int]:
    """Parameter count per module name, each shared tensor once (named_parameters drops duplicates)."""
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        if trainable is None or p.requires_grad == trainable:
            module = name.rpartition(".")[0]
            sizes[module] = sizes.get(module, 0) + p.numel()
    return sizes


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"head_dim": 32, "num_key_value_heads": 1}])
def test_parameter_counts_equal_a_real_model(extra):
    cfg = MistralConfig(**{**SMALL, **extra})
    model = Mistral(cfg)
    assert module_sizes(cfg) == _own_params(model)
    assert sum(module_sizes(cfg).values()) == sum(p.numel() for p in model.parameters())


def test_mistral_7b_has_its_published_count():
    assert sum(module_sizes(MistralConfig(**MISTRAL_7B)).values()) == 7_241_732_096


@pytest.mark.parametrize("lora", [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj"),
    dict(target_modules="all-linear", modules_to_save=["lm_head"], use_dora=True),
    dict(target_modules=["o_proj"], modules_to_save=["embed_tokens"], tie=True),
])
def test_lora_counts_and_bytes_equal_apply_lora(lora):
    lora = dict(lora)
    cfg = MistralConfig(**{**SMALL, "tie_word_embeddings": lora.pop("tie", False)})
    model = Mistral(cfg).to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, **lora))
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    w = run_weights(cfg, AdapterSpec(kind="lora", r=4, **lora), weight_bytes=2)
    assert w.trainable == sum(p.numel() for p in trained)
    assert w.trainable_bytes == sum(p.numel() * p.element_size() for p in trained)  # adapters fp32, copies bf16
    assert w.frozen_bytes == sum(p.numel() * p.element_size() for p in frozen)


def test_lora_targets_that_match_nothing_name_the_key():
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        run_weights(MistralConfig(**SMALL), AdapterSpec(kind="lora", target_modules=["qproj"]), 2)


def test_nf4_bytes_per_parameter_match_a_quantized_model():
    cfg = MistralConfig(**{**SMALL, "hidden_size": 256, "intermediate_size": 512})  # multiples of the 64-block
    stored, params = nf4_storage_bytes(quantize_model(Mistral(cfg)))
    assert params == sum(a * b for a, b in linear_shapes(cfg).values())
    assert stored == pytest.approx(NF4_BYTES * params, rel=0.005)  # the rest: one shared code book
    w = run_weights(cfg, AdapterSpec(kind="qlora"), 2)
    assert w.nf4_bytes == NF4_BYTES * params and w.frozen_bytes == 2 * (sum(module_sizes(cfg).values()) - params)


def test_lora_and_qlora_lower_the_plan():
    rows = {kind: plan_run(_run(MISTRAL_7B, kind), PlanOptions(strategy="ddp")).rows[0] for kind in ("none", "lora", "qlora")}
    full, lora, qlora = rows["none"], rows["lora"], rows["qlora"]
    assert plan_run(_run(MISTRAL_7B, "lora")).weights.trainable == 41_943_040  # r=16 on every linear, as peft says
    assert lora.grads < full.grads / 50 and lora.optimizer_states < full.optimizer_states / 50
    assert full.weights < lora.weights < full.weights * 1.02  # the frozen base plus fp32 adapters
    assert qlora.weights < lora.weights / 3  # NF4 decoder linears: ~0.516 bytes instead of 2
    assert (qlora.grads, qlora.optimizer_states) == (lora.grads, lora.optimizer_states)
    # An adapted down_proj keeps the SwiGLU product that model/fused.py drops for a plain one (all-linear: a i more
    # per token and layer); without it, LoRA's activations are lower: no fp32 lm_head gradient in the loss.
    no_down = _run(MISTRAL_7B, "lora")
    no_down.adapter.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    assert plan_run(no_down, PlanOptions(strategy="ddp")).rows[0].activations < full.activations < lora.activations
    assert qlora.total < lora.total < full.total


@pytest.mark.parametrize("dtype, optimizer, per_param", [
    ("bfloat16", "adamw", 2 + 2 + 4),  # our loop: m, v in bf16
    ("float32", "adamw", 4 + 4 + 8),
    ("bfloat16", "adamw_mixed", 2 + 2 + 4 + 8),  # DeepSpeed's ZeRO-0 accounting: 16 bytes/param
    ("bfloat16", "adamw8bit", 2 + 2 + ADAMW8BIT_BYTES),
])
def test_model_states_per_parameter_on_one_replica(dtype, optimizer, per_param):
    cfg = _run(MISTRAL_7B)
    cfg.model.dtype = dtype
    plan = plan_run(cfg, PlanOptions(strategy="ddp", optimizer=optimizer))
    row, n = plan.rows[0], plan.weights.total
    assert (row.weights + row.grads + row.optimizer_states) / n == pytest.approx(per_param)


@pytest.mark.parametrize("bf16_update, optimizer", [
    ("auto", "adamw_kahan"), ("kahan", "adamw_kahan"), ("fp32_master", "adamw_mixed"),
    ("stochastic_rounding", "adamw_sr"), ("plain", "adamw"),
])
def test_plan_counts_the_bf16_update_our_optimizer_keeps(bf16_update, optimizer, eager_torchao):
    """The plan's optimizer states for a bf16 full fine-tune equal the bytes of the state build_optimizer's
    optimizer holds after one step (fp32 master: +4 B/param and fp32 moments; kahan: +2 B/param)."""
    from mistral_train.train.optim import build_optimizer

    cfg = _run(SMALL, bf16_update=bf16_update)
    plan = plan_run(cfg, PlanOptions(strategy="ddp"))
    row = plan.rows[0]
    assert row.optimizer == optimizer
    model = Mistral(plan.model).to(torch.bfloat16)  # the architecture the plan counted
    torch_optimizer = build_optimizer(model, cfg.trainer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch_optimizer.step()
    held = sum(t.numel() * t.element_size() for state in torch_optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.ndim > 0)  # the per-parameter buffers, not the step counters
    assert held == row.optimizer_states
    assert plan_run(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32")),
                    PlanOptions(strategy="ddp")).rows[0].optimizer == "adamw"  # fp32 weights need no remedy


def test_plan_counts_the_8bit_optimizer_a_recipe_names():
    cfg = _run(SMALL, "qlora", optimizer="adamw_8bit")
    assert plan_run(cfg, PlanOptions(strategy="ddp")).rows[0].optimizer == "adamw8bit"


def test_sharding_divides_model_states_and_zero3_beats_zero2():
    plans = {n: {r.strategy: r for r in plan_run(_run(MISTRAL_7B), PlanOptions(num_processes=n)).rows} for n in (1, 8)}
    one, eight = plans[1], plans[8]
    assert set(one) == {"ddp", "zero2_offload", "zero3_offload", "zero3_offload_params"}  # the rest shard nothing
    states = {s: r.weights + r.grads + r.optimizer_states for s, r in eight.items()}
    assert states["zero3"] < states["zero2"] < states["zero1"] < states["ddp"]
    assert states["zero3_offload_params"] < states["zero3_offload"] < states["zero3"]
    assert states["fsdp2"] < states["ddp"] / 4
    assert eight["zero3_offload"].host == one["zero3_offload"].host > 0  # the node holds all of it, whatever N


def test_deepspeed_refuses_an_optimizer_it_does_not_run():
    with pytest.raises(ConfigError, match="optimizer=adamw8bit with strategy=zero3"):
        plan_run(_run(SMALL), PlanOptions(strategy="zero3", optimizer="adamw8bit"))
    assert all(not r.strategy.startswith("zero") for r in plan_run(_run(SMALL), PlanOptions(optimizer="adamw")).rows)


def _acts(cfg: MistralConfig, batch: int, seq: int, **kw) -> Activations:
    args = dict(act_bytes=2, resid_bytes=2, checkpointing=False, loss_chunk=64, lm_head_trains=True, masked=False)
    return activation_bytes(cfg, batch, seq, **{**args, **kw})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_grow_linearly_with_batch_and_sequence(checkpointing):
    cfg = MistralConfig(**MISTRAL_7B)
    one = _acts(cfg, 1, 1024, checkpointing=checkpointing)
    for batch, seq in ((2, 1024), (1, 2048), (4, 512)):
        two = _acts(cfg, batch, seq, checkpointing=checkpointing)  # twice the tokens
        assert (two.layers, two.recompute, two.head - _acts(cfg, 0, 0).head) == pytest.approx(
            (2 * one.layers, 2 * one.recompute, 2 * (one.head - _acts(cfg, 0, 0).head)))
    totals = [_acts(cfg, b, 1024, checkpointing=checkpointing).total for b in (1, 2, 3)]
    assert totals[2] - totals[1] == pytest.approx(totals[1] - totals[0])  # affine: the loss buffers are fixed
    masked = [_acts(cfg, 1, t, checkpointing=checkpointing, masked=True).masks for t in (1024, 2048)]
    assert masked[1] == 4 * masked[0]  # an attention mask is (T, T)


def test_gradient_checkpointing_lowers_activations():
    cfg = MistralConfig(**MISTRAL_7B)
    full, ckpt = _acts(cfg, 1, 4096), _acts(cfg, 1, 4096, checkpointing=True)
    assert ckpt.total < full.total / 5
    assert ckpt.recompute == full.layers / cfg.num_hidden_layers  # one block's worth, rebuilt in the backward


def _saved_bytes(cfg: MistralConfig, dtype: torch.dtype, autocast: bool, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in a real forward with labels (parameters and shared storage once)."""
    torch.manual_seed(0)
    model = Mistral(cfg).to(dtype).train()
    model.set_gradient_checkpointing(checkpointing)
    ids = torch.randint(0, cfg.vocab_size, (2, 128))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(ids, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_saves(dtype, autocast, checkpointing):
    cfg = MistralConfig(**{**SMALL, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 256})
    r = 4 if dtype == torch.float32 else 2
    casts = sum(a * b for a, b in linear_shapes(cfg).values()) if autocast else 0  # lm_head's cast is not saved
    est = activation_bytes(cfg, 2, 128, act_bytes=2 if autocast else r, resid_bytes=r, checkpointing=checkpointing,
                           loss_chunk=64, lm_head_trains=True, masked=False, cast_params=casts)
    expected = est.layers + est.head + est.casts
    if checkpointing:  # the checkpoint holds RoPE's cos/sin as inputs, not saved tensors; casts live in autocast's cache
        expected -= 2 * 2 * 128 * cfg.head_dim * r + est.casts
    assert _saved_bytes(cfg, dtype, autocast, checkpointing) == pytest.approx(expected, rel=0.002)


def test_fits_verdict_at_the_boundary():
    cfg = _run(SMALL)
    row = plan_run(cfg, PlanOptions(strategy="ddp")).rows[0]
    edge = row.total / GIB + RESERVE_GIB
    assert plan_run(cfg, PlanOptions(strategy="ddp", device_gib=edge)).rows[0].fits
    assert not plan_run(cfg, PlanOptions(strategy="ddp", device_gib=edge * 0.999)).rows[0].fits
    seven = _run(MISTRAL_7B, batch_size=1, max_seq_len=4096)
    seven.model.gradient_checkpointing = True
    fits = {r.strategy: r.fits for r in plan_run(seven, PlanOptions(num_processes=8, device_gib=24)).rows}
    assert fits["ddp"] is False and fits["zero3"] is True
    assert "  NO" in format_plan(plan_run(seven, PlanOptions(strategy="ddp", device_gib=24)))


def test_model_path_shape_comes_from_its_config_json(tmp_path):
    cfg = MistralConfig(**{**SMALL, "vocab_size": 320})
    cfg.save(tmp_path)
    run = _run({"hidden_size": 8})  # the spec's shape is ignored when model.path is set
    run.model.path = str(tmp_path)
    assert plan_run(run).weights.total == sum(p.numel() for p in Mistral(cfg).parameters())
    run.model.path = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        plan_run(run)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_vocab_of_a_fresh_model_is_its_tokenizers(version):
    from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer

    path = bundled_tokenizer_path(version)
    run = _run(SMALL)
    for tokenizer in (f"bundled:{version}", str(path)):  # a known vocabulary, and a file that is read
        run.model.tokenizer = tokenizer
        assert plan_run(run).model.vocab_size == load_tokenizer(path).vocab_size
    run.model.tokenizer = None  # a fresh model without a tokenizer gets bundled v1
    assert plan_run(run).model.vocab_size == 32000


def test_split_plan_options():
    opts, rest = split_plan_options(["recipe=x", "num_processes=8", "device_gib=40.5", "strategy=zero3", "a.b=1"])
    assert (opts.num_processes, opts.device_gib, opts.strategy, opts.optimizer) == (8, 40.5, "zero3", "auto")
    assert rest == ["recipe=x", "a.b=1"]
    for bad in ("num_processes=0", "num_processes=two", "device_gib=0", "device_gib=-3", "strategy=zero4",
                "optimizer=sgd"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            split_plan_options([bad])


def test_plan_verb_prints_the_table(capsys):
    assert main(["plan", "recipe=tiny_sft", "num_processes=2", "device_gib=24"]) == 0
    out = capsys.readouterr().out
    assert "GiB per device" in out and "zero3_offload_params" in out and "fsdp2" in out
    total = sum(module_sizes(plan_run(load_run_config("tiny_sft")).model).values())
    assert f"model: {total:,} parameters" in out


def test_plan_verb_plans_a_recipe_that_requires_model_path(capsys):
    assert main(["plan", "recipe=mistral7b_full_sft", "num_processes=8", "strategy=zero3"]) == 0
    out = capsys.readouterr().out
    assert "7,241,732,096 parameters" in out and "zero3 " in out and "ddp " not in out


@pytest.mark.parametrize("argv, key", [(["plan", "num_processes=0"], "num_processes=0"),
                                       (["plan", "device_gib=abc"], "device_gib=abc"),
                                       (["plan", "trainer.batch_sise=2"], "trainer.batch_sise")])
def test_plan_verb_user_errors_are_one_line_exit_2(argv, key, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mistral-train: error:") and key in err and err.count("\n") == 1


@pytest.mark.parametrize("recipe, billions, gpu_gib", [("mistral_nemo_qlora_sft", 12.25, 24),
                                                       ("mistral_small_24b_qlora_sft", 23.57, 24)])
def test_mistral_recipes_plan_fits_the_gpu_their_header_names(recipe, billions, gpu_gib, tmp_path):
    """The recipe's model.* shape (the published config, Tekken's 131072 vocabulary) written as the folder's
    config.json, as `plan model.path=...` reads it: the parameter count is the model's size class, the single-GPU
    row fits the header's GPU, and the header quotes this plan's total."""
    cfg = load_run_config(recipe, [f"model.path={tmp_path}", "data.path=x.jsonl"])
    (tmp_path / "config.json").write_text(json.dumps(MistralConfig.from_spec(cfg.model, vocab_size=131072).to_hf_dict()))
    plan = plan_run(cfg, PlanOptions(device_gib=gpu_gib))
    assert sum(module_sizes(plan.model).values()) / 1e9 == pytest.approx(billions, abs=0.005)
    single = plan.rows[0]
    assert single.strategy == "ddp" and single.optimizer == "adamw8bit" and single.fits
    assert single.total / GIB + RESERVE_GIB <= gpu_gib
    header = Path(f"recipes/{recipe}.yaml").read_text().split("defaults:")[0]
    assert f"{single.total / GIB:.2f} GiB" in header and f"fits {gpu_gib} GiB" in header and f"device_gib={gpu_gib}" in header
