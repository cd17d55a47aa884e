"""Activation offloading: the saved tensors' round trip is exact, small tensors and parameters
stay put, a tensor saved by several ops is copied once, and training gradients do not change.

On a CPU-only machine offloading moves nothing; `copy_on_cpu` makes it copy anyway, so the
whole round trip runs here. The CUDA test (pinned memory, events) runs only where CUDA is.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistral_train.model.offload import OffloadActivations, OffloadStats, _Offloaded


def _kwargs(tiny):
    return tiny(num_key_value_heads=2, sliding_window=5, num_hidden_layers=3)


def test_pack_and_unpack_round_trip_a_copy():
    hooks = OffloadActivations(min_bytes=64, copy_on_cpu=True)
    t = torch.randn(4, 6, 8).transpose(1, 2)  # non-contiguous: strides must survive
    packed = hooks._pack(t)
    assert isinstance(packed, _Offloaded)
    assert packed.cpu.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), "nothing was copied"
    restored = hooks._unpack(packed)
    assert torch.equal(restored, t) and restored.stride() == t.stride() and restored.dtype == t.dtype
    assert hooks.stats.offloaded_bytes == t.numel() * 4


def test_small_tensors_parameters_and_cpu_tensors_stay_put():
    stats = OffloadStats()
    small, big, weight = torch.randn(3), torch.randn(64, 64), nn.Parameter(torch.randn(64, 64))
    hooks = OffloadActivations(min_bytes=1024, stats=stats, copy_on_cpu=True)
    assert hooks._pack(small) is small, "a tensor under min_bytes was moved"
    assert hooks._pack(weight) is weight and hooks._pack(weight.t())._base is weight, "a parameter was moved"
    assert OffloadActivations(min_bytes=0)._pack(big) is big, "without copy_on_cpu a CPU tensor must stay put"
    assert stats.offloaded_bytes == 0 and stats.kept_bytes == 3 * 4 + 2 * 64 * 64 * 4


def test_a_tensor_saved_by_several_ops_is_copied_once():
    x = torch.randn(8, 32, requires_grad=True)
    w1, w2, w3 = (torch.randn(32, 32, requires_grad=True) for _ in range(3))
    stats = OffloadStats()
    with OffloadActivations(min_bytes=0, stats=stats, copy_on_cpu=True):
        h = torch.tanh(x)  # saved by tanh (its output) and by three matmuls (as input)
        out = (h @ w1).sum() + (h @ w2).sum() + (h @ w3).sum()
    assert stats.shared_bytes >= 2 * h.numel() * 4, f"h was copied more than once: {stats}"
    out.backward()
    expected = [t.grad.clone() for t in (x, w1, w2, w3)]
    for t in (x, w1, w2, w3):
        t.grad = None
    h = torch.tanh(x)
    ((h @ w1).sum() + (h @ w2).sum() + (h @ w3).sum()).backward()
    for got, want in zip(expected, (x.grad, w1.grad, w2.grad, w3.grad)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("policy", ["none", "attention", "block"])
def test_training_gradients_are_unchanged(policy, tiny, our_model, padded_batch, train_step):
    ids, mask = padded_batch([16, 9, 12], 128, pad_id=0, side="right", seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    reference = our_model(_kwargs(tiny), seed=2).train()
    reference.set_gradient_checkpointing(policy)
    expected_loss, expected = train_step(reference, ids, mask, labels)

    model = our_model(_kwargs(tiny), seed=2).train()
    model.set_gradient_checkpointing(policy)
    model.set_activation_offloading(True, min_bytes=1024)
    model.activation_offload.copy_on_cpu = True
    loss, grads = train_step(model, ids, mask, labels)
    stats = model.activation_offload.stats
    assert stats.offloaded_bytes > 0, f"nothing was offloaded: {stats}"
    if policy != "block":  # a recomputed block keeps only its input, which is large
        assert stats.kept_bytes > 0, f"parameters and small tensors must stay put: {stats}"
    assert torch.equal(loss, expected_loss)
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), f"{name}: gradient changed by offloading"


def test_offloading_is_off_outside_training(tiny, our_model, random_ids):
    model = our_model(_kwargs(tiny)).eval()
    model.set_activation_offloading(True, min_bytes=0)
    model.activation_offload.copy_on_cpu = True
    ids = random_ids(2, 8, 128)
    model(ids, labels=ids).backward()  # eval mode: no context, nothing counted
    with torch.no_grad():
        model.train()(ids)
    assert model.activation_offload.stats == OffloadStats()
    model.set_activation_offloading(False)
    assert model.activation_offload is None
    with pytest.raises(ValueError, match="min_bytes"):
        model.set_activation_offloading(True, min_bytes=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host memory and streams")
def test_cuda_activations_go_to_pinned_cpu_memory(tiny, our_model, random_ids, train_step):
    model = our_model(_kwargs(tiny), seed=4).cuda().train()
    ids = random_ids(2, 16, 128).cuda()
    _, expected = train_step(model, ids, None, ids)
    model.set_activation_offloading(True, min_bytes=1024)
    seen = []
    original = OffloadActivations._pack

    def spy(self, t):
        packed = original(self, t)
        if isinstance(packed, _Offloaded):
            seen.append(packed.cpu.is_pinned() and packed.cpu.device.type == "cpu")
        return packed

    OffloadActivations._pack = spy
    try:
        _, grads = train_step(model, ids, None, ids)
    finally:
        OffloadActivations._pack = original
    assert seen and all(seen), "offloaded tensors must sit in pinned CPU memory"
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
