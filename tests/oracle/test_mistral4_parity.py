"""Mistral Small 4 against transformers' Mistral4ForCausalLM (model_type mistral4): logits, the training loss and
every parameter's gradient (fp32, 1e-5), plain, left-padded and packed; folders both ways; cached greedy decoding.

Our config is read from the dict transformers writes, so the `mistral4` entry of model/model_types.py decides the
variant: latent attention (model/latent_attention.py), a dense first layer, then shared + routed experts with
group-limited top-k and routed scaling (model/routed_experts.py), YaRN with its softmax mscale, and the llama-4
query scale. Prompts are longer than original_max_position_embeddings (8), so YaRN's interpolated frequencies and
the query scale (which steps at 8, 16, ...) both act. Weights are order-one random (tests/conftest.py::randomize_),
copied with a strict load_state_dict: transformers' in-memory names are ours, and its files use the same names.
(transformers' `mistral_large4` is another architecture: sparse DSA attention, NoPE layers, shared KV; not this.)
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from mistral_train import Mistral, MistralConfig
from mistral_train.generate import generate
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.model.model_types import MISTRAL4_FIELDS
from tests.conftest import randomize_

TOL = 1e-5
ORIGINAL = 8  # original_max_position_embeddings: every test sequence is longer

# Two shapes that between them reach every branch transformers has: low-rank queries, interleaved rotary, a dense
# first layer, 4 groups of 2 experts with 2 kept, renormalised and scaled weights, mscale = mscale_all_dim; then one
# q_proj, half-split rotary, no dense layer, one group, raw weights, mscale != mscale_all_dim (attention factor != 1).
SHAPES = {
    "low_rank_q": dict(num_hidden_layers=3, q_lora_rank=20, rope_interleave=True, first_k_dense_replace=1, n_group=4,
                       topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1,
                       rope_parameters={"mscale": 1.0, "mscale_all_dim": 1.0}),
    "q_proj": dict(num_hidden_layers=2, q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0, n_group=1,
                   topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=2,
                   rope_parameters={"mscale": 1.3, "mscale_all_dim": 0.7}),
}


def mistral4_kwargs(shape: str = "low_rank_q", **overrides) -> dict:
    """A tiny Mistral4Config's arguments: hidden 32, 4 heads, 8 experts top-3, latent rank 12, rope 8 + nope 8."""
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
                  num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, kv_lora_rank=12,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    kwargs |= {k: v for k, v in SHAPES[shape].items() if k != "rope_parameters"}
    kwargs["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "original_max_position_embeddings": ORIGINAL,
                                 "llama_4_scaling_beta": 0.3, **SHAPES[shape]["rope_parameters"]}
    return kwargs | overrides


def _pair(shape: str = "low_rank_q", seed: int = 0, **overrides):
    """(ours, transformers' Mistral4ForCausalLM) with the same weights."""
    hf_config = transformers.Mistral4Config(**mistral4_kwargs(shape, **overrides))
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = randomize_(transformers.Mistral4ForCausalLM(hf_config), seed=seed)
    ours = Mistral(MistralConfig.from_hf_dict(json.loads(hf_config.to_json_string()), source="mistral4"))
    ours.load_state_dict(hf.state_dict())  # strict: every name and shape is transformers'
    return ours, hf


def _batch(kind: str, padded_batch, random_ids):
    """(ids, attention_mask, position_ids, labels, where to compare) for a plain, left-padded or packed batch."""
    if kind == "plain":
        ids = random_ids(2, 21, 96, seed=1)
        return ids, None, None, ids.clone(), torch.ones(ids.shape, dtype=torch.bool)
    if kind == "left_padded":
        ids, mask = padded_batch([21, 13, 17], 96, pad_id=0, side="left", seed=2)
        # a row's first real token has only padding before it: the pad query predicting it is undefined in both
        first = torch.nn.functional.pad(mask[:, :-1], (1, 0)) == 0
        return ids, mask, None, ids.masked_fill((mask == 0) | first, IGNORE_INDEX), mask.bool()
    # packed: two documents per row, positions restarting at 0, no attention mask (transformers' convention; it
    # finds the documents only without a cache, hence use_cache=False on its side)
    ids = random_ids(2, 24, 96, seed=3)
    positions = torch.cat([torch.arange(14), torch.arange(10)])[None].expand(2, -1).contiguous()
    labels = ids.clone()
    labels[:, 13] = IGNORE_INDEX  # the last token of the first document predicts nothing across the boundary
    return ids, None, positions, labels, torch.ones(ids.shape, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["plain", "left_padded", "packed"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_loss_and_every_gradient_equal_mistral4(shape, kind, padded_batch, random_ids, max_abs_diff):
    ours, hf = _pair(shape)
    config = ours.config
    assert (config.attention_kind, config.mlp_kind, config.query_scaling) == ("latent", "shared_moe", "llama4")
    assert config.head_dim == 16 and config.rotary_dim == 8 and config.num_local_experts == 8
    ids, mask, positions, labels, real = _batch(kind, padded_batch, random_ids)
    ours.eval(), hf.eval()
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask, position_ids=positions)
        hf_logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    assert max_abs_diff(ours_logits, hf_logits, real) <= TOL

    ours.train(), hf.train()  # no dropout: training forwards compute what eval ones do
    out = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, use_cache=False)
    out.loss.backward()
    loss = ours(ids, attention_mask=mask, position_ids=positions, labels=labels)
    loss.backward()
    assert abs(float(loss.detach()) - float(out.loss.detach())) <= TOL
    assert getattr(ours, "router_aux_loss", None) is None  # transformers' Mistral4 has no load-balancing loss
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and hf_grads[name].grad is not None, name
        assert (p.grad - hf_grads[name].grad).abs().max() <= TOL, name
    if kind == "packed":  # not vacuous: without the document boundary the second documents' logits differ
        with torch.no_grad():
            joined = ours(ids)
        assert max_abs_diff(joined[:, 14:], hf_logits[:, 14:]) > 1e-3


def test_router_is_group_limited_and_scaled():
    """The routed experts of every token lie in its topk_group best groups (not vacuous: some token's global top-3
    reaches a dropped group), and the weights sum to routed_scaling_factor when renormalised."""
    from mistral_train.model.routed_experts import group_limited_route

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 3
    routing = group_limited_route(logits, 3, n_group=4, topk_group=2, norm_topk_prob=True, scaling=2.5)
    probs = logits.softmax(-1)
    group_score = probs.view(64, 4, 2).sum(-1)  # a group of 2: its two best are both
    kept = group_score.topk(2, dim=-1).indices
    assert bool((routing.experts[:, :, None] // 2 == kept[:, None, :]).any(-1).all())
    assert torch.allclose(routing.weights.sum(-1), torch.full((64,), 2.5))
    unlimited = probs.topk(3, dim=-1).indices
    assert bool(((unlimited[:, :, None] // 2 == kept[:, None, :]).any(-1)).all(-1).logical_not().any())


def test_our_save_loads_in_transformers_with_equal_logits(tmp_path, random_ids, max_abs_diff):
    ours, hf = _pair("low_rank_q", seed=4)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mistral4" and saved["architectures"] == ["Mistral4ForCausalLM"]
    theirs_dict = json.loads(hf.config.to_json_string())
    for key in ("n_routed_experts", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                "v_head_dim", "rope_interleave", "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group",
                "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "num_experts_per_tok", "head_dim"):
        assert saved[key] == theirs_dict[key], key
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(hf.state_dict())  # transformers' own names, fused experts as it writes them
    # transformers 5.25 maps mistral4 in AutoConfig and AutoModelForPreTraining, not in AutoModelForCausalLM: the class
    assert type(transformers.AutoConfig.from_pretrained(tmp_path)) is transformers.Mistral4Config
    loaded = transformers.Mistral4ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids = random_ids(2, 19, 96, seed=5)
    with torch.no_grad():
        assert max_abs_diff(loaded(input_ids=ids).logits, ours.eval()(ids)) <= TOL


def test_transformers_save_loads_in_ours_with_equal_logits(tmp_path, random_ids, max_abs_diff):
    _, hf = _pair("q_proj", seed=6)
    hf.save_pretrained(tmp_path)
    ours = Mistral.from_pretrained(tmp_path)
    assert ours.config.q_lora_rank is None and ours.config.rope_interleave is False
    ids = random_ids(2, 19, 96, seed=7)
    with torch.no_grad():
        assert max_abs_diff(ours(ids), hf.eval()(input_ids=ids).logits) <= TOL
    ours.save_pretrained(tmp_path / "again")  # and back: transformers reads the same class and model again
    again = transformers.Mistral4ForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="sdpa")
    with torch.no_grad():
        assert max_abs_diff(again(input_ids=ids).logits, hf(input_ids=ids).logits) <= TOL


def test_cached_greedy_decoding_equals_full_forwards_and_transformers(padded_batch):
    ours, hf = _pair("low_rank_q", seed=8)
    ours.eval(), hf.eval()
    ids, mask = padded_batch([11, 7], 96, pad_id=0, side="left", seed=9)
    new = 10  # to 21 tokens: past the original context of 8 and the query scale's step at 16
    ours_ids = generate(ours, ids, new, attention_mask=mask, stop_at_eos=False)
    hf_ids = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(ours_ids, hf_ids)
    # full forwards, one greedy token at a time, with no cache: the same continuation
    full, keep = ids.clone(), mask.clone()
    for _ in range(new):
        positions = (keep.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = ours(full, attention_mask=keep, position_ids=positions)[:, -1]
        full = torch.cat([full, logits.argmax(-1, keepdim=True)], dim=1)
        keep = torch.cat([keep, torch.ones_like(keep[:, :1])], dim=1)
    assert torch.equal(ours_ids, full)
    assert len(set(ours_ids[0, -new:].tolist())) > 1  # not a degenerate repeat of one token


def test_a_config_json_that_leaves_keys_out_reads_as_mistral4configs_defaults():
    """Keys a file leaves out take Mistral4Config's own defaults (its YaRN over 8192 positions, 128 experts, ...),
    not MistralConfig's: each latent/expert/rotary value equals what transformers builds from the same file."""
    given = {"model_type": "mistral4", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 32}  # its num_key_value_heads defaults to 32, not the heads
    theirs = json.loads(transformers.Mistral4Config(**{k: v for k, v in given.items() if k != "model_type"}).to_json_string())
    ours = MistralConfig.from_hf_dict(given, source="defaults").to_hf_dict()
    # every key both write (transformers adds attention_bias false, pretraining_tp and the derived qk_head_dim)
    compared = [k for k in theirs if k in ours and k not in ("architectures", "transformers_version", "dtype")]
    assert {"n_routed_experts", "rope_parameters", "head_dim", "pad_token_id", *MISTRAL4_FIELDS} <= set(compared)
    # Mistral4Config adds these two rope keys itself when it builds its default dict; neither changes the maths
    ours["rope_parameters"] = {"partial_rotary_factor": 0.5, "max_position_embeddings": 1048576} | ours["rope_parameters"]
    theirs["rope_parameters"].pop("type", None)  # its default dict spells the kind twice (type and rope_type)
    for key in compared:
        assert ours.get(key) == theirs[key], key


def test_sequence_classification_head_loads_in_mistral4_for_sequence_classification(tmp_path, padded_batch):
    """The score head on latent attention + experts: our folder loads as Mistral4ForSequenceClassification with
    equal logits (last non-pad token pooled)."""
    ours_lm, _ = _pair("low_rank_q", seed=10)
    ours = Mistral(ours_lm.config, task="sequence_classification")
    ours.load_state_dict(ours_lm.state_dict(), strict=False)  # backbone; score stays freshly initialised
    with torch.no_grad():
        ours.score.weight.normal_(0, 0.3)
    ours.save_pretrained(tmp_path)
    theirs = transformers.Mistral4ForSequenceClassification.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids, mask = padded_batch([12, 9], 96, pad_id=0, side="right", seed=11)
    with torch.no_grad():
        diff = (ours.eval()(ids, attention_mask=mask) - theirs.eval()(input_ids=ids, attention_mask=mask).logits).abs()
    assert float(diff.max()) <= TOL


def test_vision_language_folder_with_a_mistral4_text_model(tmp_path, random_ids, max_abs_diff):
    """A Mistral3ForConditionalGeneration whose text_config is a Mistral4Config (a vision-language Small 4 folder as
    transformers builds it): its language model loads with transformers' text logits, and our save loads back there
    with the same logits (the vision tower carried)."""
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=56, patch_size=14)
    config = transformers.Mistral3Config(text_config=transformers.Mistral4Config(**mistral4_kwargs()), vision_config=vision)
    config._attn_implementation = "sdpa"
    torch.manual_seed(12)
    hf = randomize_(transformers.Mistral3ForConditionalGeneration(config), seed=12).eval()
    hf.save_pretrained(tmp_path)
    ours = Mistral.from_pretrained(tmp_path).eval()
    assert ours.config.model_type == "mistral4" and ours.config.attention_kind == "latent"
    ids = random_ids(2, 19, 96, seed=13)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert max_abs_diff(ours(ids), expected) <= TOL
        ours.save_pretrained(tmp_path / "again")
        back = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "again", attn_implementation="sdpa")
        assert max_abs_diff(back.eval()(input_ids=ids).logits, expected) <= TOL
