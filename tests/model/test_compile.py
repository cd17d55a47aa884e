"""Regional compilation: compiled blocks train like eager ones (losses and gradients within
fp32 rounding), share one graph across layers and sequence lengths, combine with checkpointing
and offloading, and see a changed LoRA `disabled` flag instead of baking it in.

Tolerance: inductor fuses and reorders fp32 arithmetic, so results differ from eager by
rounding only: |loss difference| <= 1e-5 and, per parameter, max |grad difference| <= 1e-5
times that parameter's max |grad|. Each compile of a tiny block takes seconds on 2 cores:
the tests share models and shapes to keep the count of compiles low.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mistral_train.adapters import LoraConfig, apply_lora, disable_adapters
from mistral_train.generate import generate
from mistral_train.quant import quantize_model

TOL = 1e-5
PACKED = [[6, 8], [14], [4, 4, 6]]  # documents of each packed row (T=14)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/model/conftest.py


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _train_step(model, ids, mask=None, positions=None):
    """Loss and gradients of one step, then an SGD update (so later steps start from moved weights)."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, position_ids=positions, labels=ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    return loss.detach(), grads


def _assert_close(got, expected, what: str) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert abs(float(loss) - float(ref_loss)) <= TOL, f"{what}: loss {float(loss)} vs eager {float(ref_loss)}"
    assert grads.keys() == ref_grads.keys(), f"{what}: different parameters got gradients"
    for name, ref in ref_grads.items():
        rel = float((grads[name] - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)
        assert rel <= TOL, f"{what}: `{name}` gradient differs by {rel:.3g} of its max"


def _batches(random_ids, padded_batch):
    """Three steps of three lengths: padded (T=16), packed documents (T=14), padded again (T=11).
    Each has a (B, 1, T, T) mask; an unpadded single-document batch would have a (1, 1, T, T)
    one, a broadcast that is its own graph (one more compile the first time it appears)."""
    padded_ids, mask = padded_batch([16, 9, 12], 128, pad_id=0, side="right", seed=1)
    packed_positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED])
    short_ids, short_mask = padded_batch([11, 5, 7], 128, pad_id=0, side="left", seed=3)
    return [("padded", padded_ids, mask, None), ("packed", random_ids(3, 14, 128, seed=2), None, packed_positions),
            ("shorter", short_ids, short_mask, None)]


def test_compiled_steps_match_eager_and_compile_once(tiny, our_model, random_ids, padded_batch):
    kwargs = tiny(num_key_value_heads=2, sliding_window=5, num_hidden_layers=3)  # window < T: a mask tensor
    eager = our_model(kwargs, seed=1).train()
    compiled = our_model(kwargs, seed=1).train()
    compiled.set_compile(True)  # dynamic shapes by default
    for name, ids, mask, positions in _batches(random_ids, padded_batch):
        _assert_close(_train_step(compiled, ids, mask, positions), _train_step(eager, ids, mask, positions), name)
    # One graph serves all three layers and all three lengths.
    assert _graphs() == 1, f"{_graphs()} graphs compiled for 3 layers x 3 steps of different lengths"


@pytest.mark.parametrize("policy", ["block", "attention"])
def test_checkpointing_and_offloading_through_compiled_blocks(policy, tiny, our_model, padded_batch):
    """"block" recomputes a compiled call; "attention" is traced as a checkpoint inside the graph;
    the offloading hooks (plain Python, so not traced) see what the compiled graph saves."""
    kwargs = tiny(num_key_value_heads=2, sliding_window=5)
    ids, mask = padded_batch([16, 9, 12], 128, pad_id=0, side="left", seed=4)
    eager = our_model(kwargs, seed=2).train()
    compiled = our_model(kwargs, seed=2).train()
    compiled.set_compile(True)
    for model in (eager, compiled):
        model.set_gradient_checkpointing(policy)
        model.set_activation_offloading(True, min_bytes=1024)
        model.activation_offload.copy_on_cpu = True  # a real round trip on this CPU-only machine
    _assert_close(_train_step(compiled, ids, mask), _train_step(eager, ids, mask), f"checkpointing {policy}")
    assert compiled.activation_offload.stats.offloaded_bytes > 0, "the compiled blocks' saved tensors were not offloaded"


def _lora(model):
    # init "none": B != 0, so the adapter changes the output and a baked-in flag would show.
    return apply_lora(model, LoraConfig(r=4, target_modules="all-linear", init="none")).train()


def test_disable_adapters_takes_effect_through_compiled_blocks(tiny, our_model, random_ids):
    """`LoRALinear.disabled` is read inside the compiled block: dynamo guards on it, so the
    DPO reference pass (adapters off) re-traces instead of reusing the adapted graph."""
    kwargs = tiny(num_hidden_layers=1)  # one layer: fewer variants (the first block's input needs no grad)
    eager, compiled = _lora(our_model(kwargs, seed=3)), _lora(our_model(kwargs, seed=3))
    compiled.set_compile(True)
    ids = random_ids(2, 12, 128, seed=5)
    _assert_close(_train_step(compiled, ids), _train_step(eager, ids), "LoRA")
    with torch.no_grad():  # the DPO reference pass: a new graph (no grad, adapters off)
        with disable_adapters(compiled):
            reference = compiled(ids, labels=ids)
        with disable_adapters(eager):
            expected_reference = eager(ids, labels=ids)
    # Adapters back on, training mode: the first graph again, which must still include them.
    adapted, expected_adapted = compiled(ids, labels=ids), eager(ids, labels=ids)
    assert abs(float(adapted) - float(reference)) > 1e-3, "the adapter should change the loss"
    assert abs(float(reference) - float(expected_reference)) <= TOL, "disable_adapters was ignored by the compiled blocks"
    assert abs(float(adapted) - float(expected_adapted)) <= TOL, "adapters stayed off after disable_adapters"


def test_qlora_compiled_step_matches_eager(tiny, our_model, random_ids):
    """NF4 bases (a custom autograd Function that dequantizes) trace into the block's graph."""
    kwargs = tiny(hidden_size=64, intermediate_size=128, num_hidden_layers=1)  # in_features multiples of 64

    def build():
        return _lora(quantize_model(our_model(kwargs, seed=4), compute_dtype=torch.float32))

    eager, compiled = build(), build()
    compiled.set_compile(True)
    ids = random_ids(2, 12, 128, seed=6)
    _assert_close(_train_step(compiled, ids), _train_step(eager, ids), "QLoRA")


def test_compile_keeps_parameter_names_and_generation_eager(tiny, our_model, random_ids):
    model = our_model(tiny(num_key_value_heads=2, sliding_window=4, eos_token_id=None), seed=6).eval()
    keys = list(model.state_dict())
    ids = random_ids(2, 5, 128, seed=7)
    expected = generate(model, ids, 10)
    model.set_compile(True)
    assert list(model.state_dict()) == keys, "compiling changed the state dict"
    assert torch.equal(generate(model, ids, 10), expected)
    assert _graphs() == 0, "generation (a KV cache) must not run the compiled blocks: it would recompile every step"
    model.set_compile(False)
    with torch.no_grad():
        model(ids)
    assert _graphs() == 0 and model.compile_options is None
    with pytest.raises(ValueError, match="compile mode"):
        model.set_compile(True, mode="fast")
