"""Latent attention (model/latent_attention.py) on its own: the KV cache holds the compressed latent, the interleaved
rotary and the softmax scale against hand formulas, and the mistral4 config errors (one line naming the key).
Parity with transformers' Mistral4 is tests/oracle/test_mistral4_parity.py's."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.errors import FolderError
from mistral_train.generate import generate
from mistral_train.model.kv_cache import KVCache
from mistral_train.model.latent_attention import apply_interleaved_rope, softmax_scale
from mistral_train.model.rope import apply_rope, rope_cos_sin


def mistral4_dict(**overrides) -> dict:
    """A tiny config.json of model_type mistral4, as transformers writes one (rank 12, rope 8 + nope 8, 8 experts)."""
    d = {"model_type": "mistral4", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "kv_lora_rank": 12,
         "q_lora_rank": 20, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 12, "first_k_dense_replace": 1,
         "max_position_embeddings": 128, "pad_token_id": 0,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                             "mscale_all_dim": 0.7, "original_max_position_embeddings": 8, "llama_4_scaling_beta": 0.1,
                             "partial_rotary_factor": 0.5}}
    return d | overrides


def _model(seed: int = 0) -> Mistral:
    torch.manual_seed(seed)
    model = Mistral(MistralConfig.from_hf_dict(mistral4_dict(), source="test"))
    with torch.no_grad():  # order-one weights, so the latent and the logits are far from zero
        for p in model.parameters():
            p.normal_(0, p.shape[-1] ** -0.5) if p.dim() > 1 else p.normal_(1, 0.2)
    return model.eval()


def test_cache_holds_the_latent_not_the_expanded_keys_and_values():
    model = _model()
    config = model.config
    cache = KVCache.for_model(config, batch_size=2, max_length=20, dtype=torch.float32, device="cpu")
    per_token = (cache.k[0, 0, :, 0].numel() + cache.v[0, 0, :, 0].numel())  # one layer, one row, one token
    assert per_token == config.kv_lora_rank + config.qk_rope_head_dim == 20
    expanded = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    assert per_token < expanded == 112  # what a cache of expanded keys and values would hold
    assert not cache.rolling and cache.capacity == 20

    # what the cache holds after a prefill is each layer's normed latent and rotated shared key of those tokens
    latents = {}
    hooks = [block.self_attn.kv_a_layernorm.register_forward_hook(
        lambda module, args, out, i=i: latents.__setitem__(i, out)) for i, block in enumerate(model.model.layers)]
    ids = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, cache=cache, cache_index=torch.arange(11))
    for hook in hooks:
        hook.remove()
    for layer in range(config.num_hidden_layers):
        assert torch.equal(cache.k[layer, :, 0, :11], latents[layer]), layer
        assert cache.v[layer, :, 0, :11].abs().sum() > 0 and cache.k[layer, :, 0, 11:].abs().sum() == 0


def test_cached_generation_equals_full_forwards_past_the_original_context():
    model = _model(seed=2)
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    out = generate(model, ids, 12, stop_at_eos=False)  # to 21 tokens, past original 8 and the query scale's steps
    full = ids
    for _ in range(12):
        with torch.no_grad():
            full = torch.cat([full, model(full)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, full)


def test_interleaved_rotary_is_the_half_split_rotary_of_the_deinterleaved_pairs():
    """Hand formula: rotating pairs (x[2i], x[2i+1]) by angle i is the half-split rotary of (evens, odds)."""
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(4))
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, 5) * 3, 8, 100.0, torch.float32)
    deinterleaved = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    assert torch.allclose(apply_interleaved_rope(x, cos, sin), apply_rope(deinterleaved, cos, sin), atol=1e-6)
    # and not the half-split rotary of x itself (the layouts differ)
    assert not torch.allclose(apply_interleaved_rope(x, cos, sin), apply_rope(x, cos, sin), atol=1e-3)


def test_softmax_scale_folds_yarns_mscale_all_dim_in_twice():
    config = MistralConfig.from_hf_dict(mistral4_dict(), source="test")
    mscale = 0.1 * 0.7 * math.log(4.0) + 1  # YaRN's mscale(factor 4, mscale_all_dim 0.7)
    assert softmax_scale(config) == pytest.approx(16 ** -0.5 * mscale * mscale, rel=1e-12)


@pytest.mark.parametrize("overrides, key", [
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"n_group": 3}, "n_group"),
    ({"n_group": 8}, "n_group"),  # groups of one expert: transformers scores each group by its two best
    ({"topk_group": 5}, "topk_group"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1,
                          "original_max_position_embeddings": 8}}, "rope_type"),
    ({"rope_parameters": dict(mistral4_dict()["rope_parameters"], partial_rotary_factor=1.0)}, "partial_rotary_factor"),
])
def test_mistral4_fields_we_do_not_compute_are_refused_by_name(overrides, key):
    with pytest.raises(FolderError, match=rf"^test: .*`(rope_parameters\.)?{key}`"):
        MistralConfig.from_hf_dict(mistral4_dict(**overrides), source="test")


def test_num_key_value_heads_left_out_is_mistral4configs_32_and_null_is_the_heads():
    """As transformers reads them: a missing key is its default 32 (refused with 4 heads), a null one the heads'."""
    given = mistral4_dict()
    del given["num_key_value_heads"]
    with pytest.raises(FolderError, match=r"^test: .*`num_key_value_heads` \(32\)"):
        MistralConfig.from_hf_dict(given, source="test")
    assert MistralConfig.from_hf_dict(mistral4_dict(num_key_value_heads=None), source="test").num_key_value_heads == 4


def test_latent_model_is_not_written_as_another_class():
    config = MistralConfig.from_hf_dict(mistral4_dict(), source="test")
    assert config.to_hf_dict("MistralForCausalLM")["n_routed_experts"] == 8
    with pytest.raises(ValueError, match="`mlp_kind` and `query_scaling` and `attention_kind` cannot be written as model_type 'mixtral'"):
        dataclasses.replace(config, model_type="mixtral").to_hf_dict()


def test_static_latent_cache_step_equals_the_ordinary_step(max_abs_diff):
    """The single-token path of a static cache (what generate(compile=True) compiles), run eagerly, gives the
    ordinary cache's logits: the latent cache's unequal k/v widths go through both paths."""
    model = _model(seed=5)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    logits = {}
    for static in (False, True):
        cache = KVCache.for_model(model.config, 2, 7, torch.float32, "cpu", static=static)
        with torch.no_grad():
            steps = [model(ids[:, i : i + 1], cache=cache, cache_index=torch.tensor([i]))[:, -1] for i in range(7)]
        logits[static] = torch.stack(steps)
    with torch.no_grad():
        full = model(ids).transpose(0, 1)  # (T, B, V), as the steps are stacked
    assert max_abs_diff(logits[True], logits[False]) <= 1e-5 and max_abs_diff(logits[False], full) <= 1e-5


@pytest.mark.parametrize("policy", ["block", "attention", "mlp"])
def test_recomputed_latent_blocks_give_the_same_gradients(policy):
    """Activation checkpointing re-runs latent attention and the shared+routed experts in backward: same grads."""
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(7))
    grads = {}
    for recompute in (None, policy):
        model = _model(seed=8).train()
        if recompute:
            model.set_gradient_checkpointing(recompute)
        model(ids, labels=ids).backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads[None].items():
        assert torch.allclose(grads[policy][name], grad, atol=1e-6), name
    assert grads[None]["model.layers.1.self_attn.kv_b_proj.weight"].abs().sum() > 0
