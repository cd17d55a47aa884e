"""NF4 at model scale without a reference library: the swap, quantized loading (layer by
layer), saving in bitsandbytes' format, dequantizing back, and QLoRA gradients."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mistral_train import Mistral, MistralConfig
from mistral_train.quant import NF4Linear, dequantize_model, nf4_storage_bytes, quantize_model
from mistral_train.quant.state_dict import STATE_SUFFIXES

NF4_SHAPE = dict(hidden_size=128, intermediate_size=256, vocab_size=128)  # every linear dim a multiple of 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_model(tiny, our_model, **overrides) -> Mistral:
    return our_model(tiny(**NF4_SHAPE, **overrides), seed=1)


def test_quantize_model_swaps_decoder_linears_and_keeps_heads(tiny, our_model):
    model = quantize_model(_tiny_model(tiny, our_model), compute_dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(names) == 2 * len(LINEARS) and all(n.rsplit(".", 1)[-1] in LINEARS for n in names)
    assert type(model.lm_head) is nn.Linear
    assert not any(p.dtype == torch.uint8 for p in model.parameters())
    assert model.config.extra["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    classifier = quantize_model(Mistral(MistralConfig(**tiny(**NF4_SHAPE)), task="sequence_classification"))
    assert type(classifier.score) is nn.Linear and isinstance(classifier.model.layers[0].mlp.up_proj, NF4Linear)


def test_storage_is_at_most_057_bytes_per_parameter(tiny, our_model):
    model = quantize_model(_tiny_model(tiny, our_model))
    nbytes, params = nf4_storage_bytes(model)
    assert params == 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 256)  # q, o; k, v; gate, up, down
    per_param = nbytes / params
    print(f"NF4 storage: {nbytes} bytes for {params} weights = {per_param:.4f} bytes/param")
    assert per_param <= 0.57
    per_layer = max(m.storage_bytes() / (m.in_features * m.out_features) for m in model.modules() if isinstance(m, NF4Linear))
    assert per_layer <= 0.66  # even a 64x128 k_proj carrying its own 1 KiB code tables


def test_state_dict_uses_bitsandbytes_keys_and_round_trips(tiny, our_model, random_ids):
    model = quantize_model(_tiny_model(tiny, our_model), compute_dtype=torch.float32).eval()
    state = model.state_dict()
    prefix = "model.layers.0.self_attn.q_proj.weight"
    assert {k for k in state if k.startswith(prefix)} == {prefix} | {f"{prefix}.{s}" for s in STATE_SUFFIXES}
    meta = json.loads(bytes(state[f"{prefix}.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [128, 128] and meta["blocksize"] == 64 and meta["nested_blocksize"] == 256
    twin = quantize_model(Mistral(MistralConfig(**tiny(**NF4_SHAPE))), compute_dtype=torch.float32).eval()
    twin.load_state_dict(state)  # strict
    ids = random_ids(2, 9, 128)
    assert torch.equal(twin(ids), model(ids))
    del state[f"{prefix}.absmax"]
    with pytest.raises(RuntimeError, match=r"q_proj\.weight\.absmax"):
        twin.load_state_dict(state)


def test_load_pretrained_quantizes_layer_by_layer(tiny, our_model, random_ids, tmp_path, monkeypatch):
    """from_pretrained(quantize="nf4") equals quantize_model after a float load, and while it
    reads no decoder linear ever holds a float weight: each is meta until replaced by NF4."""
    from mistral_train.quant import loading

    dense = _tiny_model(tiny, our_model)
    dense.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards
    float_weights_seen = []
    original = loading.NF4Loading._quantize

    def spy(self, name, tensor, file):
        linears = [m for m in self.model.modules() if type(m) is nn.Linear and m is not getattr(self.model, "lm_head", None)]
        float_weights_seen.append(sum(not m.weight.is_meta for m in linears))
        return original(self, name, tensor, file)

    monkeypatch.setattr(loading.NF4Loading, "_quantize", spy)
    model = Mistral.from_pretrained(tmp_path, dtype=torch.float32, quantize="nf4").eval()
    assert len(float_weights_seen) == 2 * len(LINEARS) and max(float_weights_seen) == 0
    reference = quantize_model(Mistral.from_pretrained(tmp_path), compute_dtype=torch.float32).eval()
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(reference.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    ids = random_ids(2, 12, 128)
    assert torch.equal(model(ids), reference(ids))


def test_quantized_folder_saves_and_reloads_as_nf4(tiny, our_model, random_ids, tmp_path):
    model = quantize_model(_tiny_model(tiny, our_model), compute_dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    again = Mistral.from_pretrained(tmp_path).eval()  # a 4-bit folder loads as NF4 by itself
    assert sum(isinstance(m, NF4Linear) for m in again.modules()) == 2 * len(LINEARS)
    assert again.model.layers[1].mlp.down_proj.compute_dtype == torch.float32
    ids = random_ids(2, 12, 128)
    assert torch.equal(again(ids), model(ids))


def test_quantized_loading_errors_name_the_problem(tiny, our_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_model(tiny, our_model)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"quantize='int4'"):
        Mistral.from_pretrained(tmp_path / "dense", quantize="int4")
    quantize_model(model).save_pretrained(tmp_path / "q")
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight.nested_absmax"]
    save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.up_proj\.weight.*incomplete"):
        Mistral.from_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type.*fp4"):
        Mistral.from_pretrained(tmp_path / "q")


def test_dequantize_model_gives_a_plain_model_with_the_same_logits(tiny, our_model, random_ids, tmp_path):
    model = quantize_model(_tiny_model(tiny, our_model), compute_dtype=torch.float32).eval()
    ids = random_ids(2, 12, 128)
    expected = model(ids)
    dense = dequantize_model(model)
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    assert "quantization_config" not in dense.config.extra
    assert torch.equal(dense(ids), expected)


def test_qlora_adapters_get_the_gradients_of_a_dense_twin_after_an_eval_forward(tiny, our_model, random_ids):
    """Trap 1 at model scale, with the real LoRA layers wrapping NF4Linear: after an eval forward
    without grad, every adapter's gradient equals the one it gets over the dequantized dense model."""
    import copy

    from mistral_train.adapters import LoraConfig, apply_lora

    quantized = quantize_model(_tiny_model(tiny, our_model), compute_dtype=torch.float32)
    dense = dequantize_model(copy.deepcopy(quantized))
    ids = random_ids(2, 10, 128)
    grads = []
    for model in (quantized, dense):
        torch.manual_seed(2)  # the same adapter init on both
        model = apply_lora(model, LoraConfig(r=4, target_modules=list(LINEARS), init="none"))
        model.eval()
        with torch.no_grad():
            model(ids)
        model.train()
        model(ids, labels=ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    assert len(grads[0]) == 2 * 2 * len(LINEARS) and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(b.grad is None for b in quantized.buffers())


def test_gradient_checkpointing_gives_the_same_gradients(tiny, our_model, random_ids):
    """Recomputing blocks in backward re-runs the dequantizing Function: same gradients."""
    model = quantize_model(_tiny_model(tiny, our_model), compute_dtype=torch.float32).train()
    ids = random_ids(2, 10, 128)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        model(ids, labels=ids).backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)
