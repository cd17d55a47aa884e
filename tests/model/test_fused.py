"""model/fused.py: each fused function's forward equals the unfused ops (bitwise where they run the same ops),
its gradients equal autograd's through the unfused ops (gradcheck in float64, then fp32 and bf16), it keeps
less for backward, and the model built on them trains as before: through checkpointing, LoRA and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mistral.modeling_mistral import MistralRMSNorm, apply_rotary_pos_emb

from mistral_train.adapters import LoraConfig, apply_lora
from mistral_train.adapters.lora import LoRALinear
from mistral_train.model import blocks, rope
from mistral_train.model.blocks import Block, RMSNorm
from mistral_train.model.compile import compile_blocks
from mistral_train.model.config import MistralConfig
from mistral_train.model.fused import rms_norm, rotate, silu_mul, silu_mul_linear
from mistral_train.model.rope import rope_cos_sin
from mistral_train.model.saved_bytes import SavedBytes


# ---- the unfused references: the ops autograd differentiates itself (blocks.py and rope.py before the fusion)
def unfused_rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def unfused_silu_mul(gate, up):
    return F.silu(gate) * up


def unfused_silu_mul_linear(gate, up, weight):
    return F.linear(F.silu(gate) * up, weight)


def unfused_rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.fixture
def unfused(monkeypatch):
    """Within the test, a call to `unfused()` sends blocks.py and rope.py back to the unfused ops."""

    def switch() -> None:
        monkeypatch.setattr(blocks, "rms_norm", unfused_rms_norm)
        monkeypatch.setattr(blocks, "silu_mul", unfused_silu_mul)
        monkeypatch.setattr(blocks, "silu_mul_linear", unfused_silu_mul_linear)
        monkeypatch.setattr(rope, "rotate", unfused_rotate)

    return switch


def _cases(dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs of each function (requiring grad) and its fused/unfused pair; order-one values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5) * 7, 8, 10_000.0, dtype)
    return {
        "rms_norm": (rms_norm, unfused_rms_norm, (r(2, 5, 16) * 3, r(16), 1e-6)),
        "silu_mul": (silu_mul, unfused_silu_mul, (r(2, 5, 12), r(2, 5, 12))),
        "silu_mul_linear": (silu_mul_linear, unfused_silu_mul_linear, (r(2, 5, 12), r(2, 5, 12), r(6, 12))),
        "rotate": (rotate, unfused_rotate, (r(2, 3, 5, 8), cos.unsqueeze(1), sin.unsqueeze(1))),
    }


def _grads(fn, args, upstream):
    out = fn(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out, torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("name", ["rms_norm", "silu_mul", "silu_mul_linear", "rotate"])
def test_gradcheck_float64(name):
    fused, _, args = _cases(torch.float64)[name]
    assert torch.autograd.gradcheck(fused, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["rms_norm", "silu_mul", "silu_mul_linear", "rotate"])
def test_forward_bitwise_and_gradients_equal_to_unfused(name, dtype):
    fused, reference, args = _cases(dtype)[name]
    out_ref = reference(*args)
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(9)).to(out_ref.dtype)
    expected, expected_grads = _grads(reference, args, upstream)
    out, grads = _grads(fused, args, upstream)
    assert out.dtype == expected.dtype and torch.equal(out, expected)  # the same ops in the same order
    assert len(grads) == len(expected_grads) > 0
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # a different order of roundings in bf16: within bf16's resolution of the gradient's scale
            torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1.6e-2 * want.float().abs().max().item())


def test_swiglu_and_rope_gradients_are_bitwise_autograds():
    """silu_mul runs autograd's own backward ops (mul, silu_backward); the rotation's transpose adds the same products."""
    for name in ("silu_mul", "rotate"):
        fused, reference, args = _cases(torch.float32, seed=4)[name]
        upstream = torch.randn(fused(*args).shape, generator=torch.Generator().manual_seed(2))
        for got, want in zip(_grads(fused, args, upstream)[1], _grads(reference, args, upstream)[1]):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_module_equals_transformers(dtype):
    x = (torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    ours, theirs = RMSNorm(32, 1e-5).to(dtype), MistralRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    assert torch.equal(ours(x), theirs(x))


def test_rotate_equals_transformers_apply_rotary_pos_emb():
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = rope_cos_sin(torch.arange(6).expand(2, 6) + 100, 16, 10_000.0, torch.float32)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope.apply_rope(q, cos, sin), hf_q) and torch.equal(rope.apply_rope(k, cos, sin), hf_k)


def test_silu_mul_linear_under_autocast_equals_unfused():
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 5, 12, generator=g).requires_grad_() for _ in range(2))
    weight = torch.randn(6, 12, generator=g).requires_grad_()
    results = []
    for fn in (silu_mul_linear, unfused_silu_mul_linear):
        with torch.autocast("cpu", torch.bfloat16):
            out = fn(gate, up, weight)
        out.float().square().sum().backward()
        results.append((out, gate.grad, up.grad, weight.grad))
        gate.grad = up.grad = weight.grad = None
    (out, *grads), (ref, *ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32  # the weight's gradient came back through the cast
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2 * want.abs().max().item())


def _saved(fn, *args) -> int:
    with SavedBytes() as saved:
        fn(*args)
    return saved.nbytes


def test_each_function_keeps_only_what_it_needs():
    x, w = torch.randn(4, 64, 32, requires_grad=True), torch.nn.Parameter(torch.ones(32))
    assert _saved(rms_norm, x, w, 1e-6) == x.nbytes + 4 * 4 * 64  # x and one fp32 rstd per row
    assert _saved(unfused_rms_norm, x, w, 1e-6) == 2 * x.nbytes + 4 * 4 * 64  # + the normalised x
    gate, up = torch.randn(4, 64, 96, requires_grad=True), torch.randn(4, 64, 96, requires_grad=True)
    down = torch.nn.Parameter(torch.randn(32, 96))
    assert _saved(silu_mul, gate, up) == 2 * gate.nbytes
    assert _saved(unfused_silu_mul, gate, up) == 3 * gate.nbytes  # + silu(gate)
    assert _saved(silu_mul_linear, gate, up, down) == 2 * gate.nbytes  # the weight is a Parameter: not counted
    assert _saved(unfused_silu_mul_linear, gate, up, down) == 4 * gate.nbytes  # + silu(gate) and the product
    q = torch.randn(4, 8, 64, 16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(64).expand(4, 64), 16, 10_000.0, torch.float32)
    assert _saved(rope.apply_rope, q, cos, sin) == cos.nbytes + sin.nbytes


def _block_and_inputs(tiny, seed: int = 0):
    config = MistralConfig(**tiny(num_key_value_heads=2, intermediate_size=96))
    torch.manual_seed(seed)
    block = Block(config, 0).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    cos, sin = rope_cos_sin(torch.arange(16).expand(2, 16), config.head_dim, config.rope_theta, torch.float32)
    x = torch.randn(2, 16, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    return block, x, blocks.AttentionInputs(cos, sin, None)


def test_fused_block_saves_strictly_less_than_unfused(tiny, unfused):
    block, x, inputs = _block_and_inputs(tiny)
    fused = _saved(block, x, inputs)
    unfused()
    plain = _saved(block, x, inputs)
    T, H, I = 2 * 16, block.mlp.gate_proj.in_features, block.mlp.gate_proj.out_features
    # Two norms drop their fp32 normalised input (4 H bytes a token); SwiGLU drops silu(gate) and the product.
    assert plain - fused == T * (2 * 4 * H + 2 * 4 * I)
    assert fused < plain


def test_a_lora_down_proj_keeps_the_product_the_plan_counts(tiny):
    """blocks.MLP fuses the down projection only for a plain nn.Linear; a LoRA down_proj keeps its input (the
    product, for lora_A's gradient) and its rank-r output: plan.down_proj_keeps_input counts the product."""
    block, x, inputs = _block_and_inputs(tiny)
    plain = _saved(block, x, inputs)
    block.mlp.down_proj = LoRALinear(block.mlp.down_proj, r=4, alpha=8)
    T, I = 2 * 16, block.mlp.gate_proj.out_features
    assert _saved(block, x, inputs) - plain == T * (I + 4) * 4


def test_model_gradients_equal_unfused_under_checkpointing(tiny, our_model, padded_batch, train_step, unfused):
    kwargs = tiny(num_key_value_heads=2, sliding_window=5, num_hidden_layers=2, intermediate_size=96)
    ids, mask = padded_batch([16, 9, 12], 128, pad_id=0, side="right", seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for policy in ("block", "mlp"):
        model = our_model(kwargs, seed=3).train()
        model.set_gradient_checkpointing(policy)
        results[policy] = train_step(model, ids, mask, labels)
    unfused()
    expected_loss, expected = train_step(our_model(kwargs, seed=3).train(), ids, mask, labels)
    for policy, (loss, grads) in results.items():
        assert torch.equal(loss, expected_loss), policy
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"{policy}: {name}")


def test_lora_on_the_mlp_linears_gets_the_unfused_gradients(tiny, our_model, random_ids, unfused):
    kwargs = tiny(num_hidden_layers=2, intermediate_size=96)
    ids = random_ids(2, 12, kwargs["vocab_size"], seed=5)
    config = LoraConfig(r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], init="none")

    def lora_grads():
        model = apply_lora(our_model(kwargs, seed=2).train(), config)
        loss = model(ids, labels=ids)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert any("down_proj.lora_A" in n for n in grads) and all(g is not None for g in grads.values())
        return loss.detach(), grads

    loss, grads = lora_grads()
    unfused()
    expected_loss, expected = lora_grads()
    assert torch.equal(loss, expected_loss) and grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_block_with_fused_functions_matches_eager(tiny, our_model, random_ids, fresh_dynamo):
    kwargs = tiny(num_hidden_layers=2, intermediate_size=96)
    ids = random_ids(2, 12, kwargs["vocab_size"], seed=6)
    eager = our_model(kwargs, seed=1).train()
    expected = eager(ids, labels=ids)
    expected.backward()
    compiled = compile_blocks(our_model(kwargs, seed=1).train())
    loss = compiled(ids, labels=ids)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, p in eager.named_parameters():
        torch.testing.assert_close(compiled.get_parameter(name).grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
