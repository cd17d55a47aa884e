"""Mixtral against transformers' MixtralForCausalLM: logits, the load-balancing loss, the training loss the loop
optimises and every parameter's gradient (fp32, 1e-5), with padding and without; router jitter only in training;
both on-disk layouts of the expert weights load, and what we save loads in transformers with equal logits.

Our config is read from the dict transformers writes, so the `mixtral` entry of model/model_types.py decides the
variant. Weights are order-one random (tests/conftest.py::randomize_), copied with a strict load_state_dict: the
in-memory names (mlp.gate.weight, mlp.experts.gate_up_proj / down_proj) are transformers'. The training loss goes
through train/loop.py's backward_window, the one place every objective's step passes, so the test proves the loop
adds router_aux_loss_coef * aux itself, without output_router_logits.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_train import Mistral, MistralConfig
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.model.moe import load_balancing_loss
from mistral_train.train.loop import backward_window
from mistral_train.train.steps import language_model
from tests.conftest import randomize_, tiny_kwargs

TOL = 1e-5
COEF = 0.3  # large, so a missing or mis-scaled aux term shows in every router gradient


def _pair(seed: int = 0, **overrides):
    """(ours, transformers' MixtralForCausalLM) with the same weights: 4 experts, top-2, hidden 32, 2 layers."""
    kwargs = tiny_kwargs(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=COEF) | overrides
    hf_config = transformers.MixtralConfig(**kwargs)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = randomize_(transformers.MixtralForCausalLM(hf_config), seed=seed)
    ours = Mistral(MistralConfig.from_hf_dict(json.loads(hf_config.to_json_string()), source="mixtral"))
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def _batch(padded: bool, padded_batch, random_ids):
    """Right padding: a pad row predicts only ignored labels (a fully masked query row is undefined in both)."""
    if padded:
        ids, mask = padded_batch([9, 5, 7], 128, pad_id=0, side="right", seed=2)
    else:
        ids, mask = random_ids(3, 9, 128, seed=1), None
    labels = ids.clone() if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids, mask, labels


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_logits_aux_loss_and_every_gradient_equal_mixtral(padded, padded_batch, random_ids, max_abs_diff):
    ours, hf = _pair()
    assert ours.config.mlp_kind == "moe" and ours.config.router_aux_loss_coef == COEF
    ids, mask, labels = _batch(padded, padded_batch, random_ids)
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    ours.eval(), hf.eval()
    with torch.no_grad():
        logits_diff = max_abs_diff(ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits, real)
    assert logits_diff <= TOL

    ours.train(), hf.train()  # no dropout, no jitter: training forwards compute what eval ones do
    out = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()  # transformers: mean CE + coef * aux
    batch = {"input_ids": ids, "labels": labels} | ({"attention_mask": mask} if mask is not None else {})
    loss, _, stats = backward_window(ours, language_model(), [batch], contextlib.nullcontext)
    assert abs(stats["router_aux_loss"] - float(out.aux_loss.detach())) <= TOL  # logged as a metric
    assert abs(loss + COEF * stats["router_aux_loss"] - float(out.loss.detach())) <= TOL
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert (p.grad - hf_grads[name].grad).abs().max() <= TOL, name

    # not vacuous: padding changes the aux loss, and leaving the aux term out changes the router's gradient
    if padded:
        counted_all = load_balancing_loss([r.detach() for r in out.router_logits], 4, 2, keep=None)
        assert abs(float(counted_all) - float(out.aux_loss.detach())) > 1e-3
    router = "model.layers.0.mlp.gate.weight"
    ours.zero_grad()
    ours(ids, attention_mask=mask, labels=labels).backward()  # CE alone (the recorded aux left untaken)
    assert (dict(ours.named_parameters())[router].grad - hf_grads[router].grad).abs().max() > 1e-3


def test_aux_loss_equals_transformers_function_with_a_mask():
    """The loss function alone, on random router logits of 3 layers with a mask: transformers' own function."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    gen = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(12, 5, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [0, 1, 1, 1, 1, 1]])
    for keep in (None, mask):
        expected = load_balancing_loss_func(logits, 5, 2, keep)
        assert abs(float(load_balancing_loss(list(logits), 5, 2, keep)) - float(expected)) <= 1e-6


def test_jitter_only_in_training(random_ids):
    ours, hf = _pair(router_jitter_noise=0.2)
    plain, _ = _pair(router_jitter_noise=0.0)
    ids = random_ids(2, 8, 128, seed=3)
    ours.eval(), hf.eval(), plain.eval()
    with torch.no_grad():
        assert (ours(ids) - plain(ids)).abs().max() == 0  # eval: no noise
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() <= TOL
        ours.train(), hf.train()
        torch.manual_seed(7)
        noisy = ours(ids)
        torch.manual_seed(7)  # the same draws, in the same order: transformers' noise exactly
        assert (noisy - hf(input_ids=ids).logits).abs().max() <= TOL
        assert (noisy - plain(ids)).abs().max() > 1e-3  # training: the noise is there


def _hf_logits(folder, ids):
    model = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_both_expert_layouts_load_with_equal_logits(tmp_path, random_ids):
    _, hf = _pair(seed=1)
    hf.eval()
    ids = random_ids(2, 8, 128, seed=4)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    per_expert = tmp_path / "per_expert"
    hf.save_pretrained(per_expert)  # transformers 5.25 writes block_sparse_moe.experts.N.w1/w2/w3
    with safe_open(str(per_expert / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((per_expert / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
    assert (_hf_logits(fused, ids) - expected).abs().max() <= TOL  # transformers reads the fused file too
    for folder in (per_expert, fused):
        ours = Mistral.from_pretrained(folder).eval()
        with torch.no_grad():
            assert (ours(ids) - expected).abs().max() <= TOL, folder.name


def test_saved_folder_is_what_transformers_writes_and_loads_with_equal_logits(tmp_path, random_ids):
    ours, hf = _pair(seed=2)
    ours.eval()
    ids = random_ids(2, 8, 128, seed=5)
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "theirs")
    keys = {}
    for name in ("ours", "theirs"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert keys["ours"] == keys["theirs"]
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["router_aux_loss_coef"]) == (4, 2, COEF)
    with torch.no_grad():
        assert (_hf_logits(tmp_path / "ours", ids) - ours(ids)).abs().max() <= TOL
