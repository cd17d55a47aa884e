"""NF4 against bitsandbytes (CPU) and transformers' 4-bit loading.

- our packed weights and quant state are byte-identical to `bitsandbytes.functional.quantize_4bit`
  (nf4, blocksize 64, double quant) and our dequantization equals `dequantize_4bit`;
- a tiny Mistral loaded with `quantize="nf4"` gives the logits of transformers loaded with
  `BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp32 compute)`, and 4-bit folders move
  both ways between the two.

transformers' Linear4bit layers get `support_avx512bf16_for_cpu = False`: on AVX512-BF16 CPUs an
eval forward otherwise runs bitsandbytes' bf16 gemv (STACK-NOTES trap 1), a different (lower)
precision than the fp32 compute we compare against.
"""

from __future__ import annotations

import pytest
import torch

from mistral_train import Mistral
from mistral_train.quant import NF4Linear, dequantize_nf4, quantize_nf4
from mistral_train.quant.state_dict import QUANT_STATE_KEY, quant_state_tensor

bnb = pytest.importorskip("bitsandbytes")
bnb_f = pytest.importorskip("bitsandbytes.functional")

NF4_SHAPE = dict(hidden_size=128, intermediate_size=256, vocab_size=128)
# Both sides compute in fp32 from byte-identical NF4 weights; what is left is the order of
# float additions in attention/matmul kernels (~1e-7 on O(1) logits, STACK-NOTES: eager vs sdpa 2e-7).
LOGITS_ATOL = 1e-5


def _weight(shape, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scale = (0.02, 1.0, 30.0)[seed % 3]  # small, unit and large magnitudes: absmax and offset vary
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _bnb_quantize(w, double_quant=True):
    return bnb_f.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 64), (256, 128), (64, 320), (64 * 260, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_is_byte_identical_to_bitsandbytes(shape, dtype, seed):
    """Packed codes, 8-bit absmax, nested absmax, offset, both code tables and the packed
    JSON quant state (64*260*64 has 260 blocks: two nested blocks, the second partial)."""
    w = _weight(shape, seed, dtype)
    packed, state = _bnb_quantize(w)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed), "packed 4-bit codes differ"
    assert q.absmax.dtype == state.absmax.dtype == torch.uint8 and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert q.offset == state.offset.item()
    assert torch.equal(q.quant_map, state.code) and torch.equal(q.nested_quant_map, state.state2.code)
    assert (q.blocksize, q.nested_blocksize, q.shape, q.dtype) == (state.blocksize, state.state2.blocksize, tuple(state.shape), state.dtype)
    assert torch.equal(quant_state_tensor(q), state.as_dict(packed=True)[QUANT_STATE_KEY])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_equals_bitsandbytes(out_dtype, double_quant):
    w = _weight((256, 192), 4, torch.float32)
    packed, state = _bnb_quantize(w, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    state.dtype = out_dtype
    assert torch.equal(dequantize_nf4(q, out_dtype), bnb_f.dequantize_4bit(packed, state))


def test_our_bnb_quant_state_drives_bitsandbytes_dequantize():
    """NF4Linear.bnb_quant_state() is what the CUDA path hands to bitsandbytes' kernel: on CPU
    the same object must decode to our weight exactly."""
    layer = NF4Linear(quantize_nf4(_weight((128, 256), 5, torch.float32)), compute_dtype=torch.float32)
    assert torch.equal(bnb_f.dequantize_4bit(layer.weight, layer.bnb_quant_state()), layer.dequantize())


@pytest.mark.parametrize("shape", [(32, 96), (33, 65), (5, 3)])
def test_odd_shapes_match_bitsandbytes_on_the_flattened_tensor(shape):
    """bitsandbytes quantizes an odd shape exactly as we do (blocks over the flattened tensor);
    its 1-D dequantize then equals ours. Its 2-D CPU dequantize is the trap-2 bug: see the test below."""
    w = _weight(shape, 6, torch.float32)
    q = quantize_nf4(w)
    for source in (w, w.reshape(-1)):
        packed, state = _bnb_quantize(source)
        assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
        assert torch.equal(q.nested_absmax, state.state2.absmax)
    packed, state = _bnb_quantize(w.reshape(-1))
    assert torch.equal(dequantize_nf4(q).reshape(-1), bnb_f.dequantize_4bit(packed, state).reshape(-1))


def test_bitsandbytes_2d_dequantize_of_an_odd_last_dim_is_wrong_and_ours_is_right():
    """STACK-NOTES trap 2, kept visible: bitsandbytes' CPU dequantize of a 2-D tensor whose last dim is
    not a multiple of 64 differs from its own 1-D result, which ours equals. If this fails because the
    two agree, bitsandbytes fixed the bug: update STACK-NOTES and this test. Ours never calls the kernel."""
    w = _weight((32, 96), 7, torch.float32)
    packed, state = _bnb_quantize(w)
    ours = dequantize_nf4(quantize_nf4(w))
    flat_packed, flat_state = _bnb_quantize(w.reshape(-1))
    assert torch.equal(bnb_f.dequantize_4bit(flat_packed, flat_state).reshape(w.shape), ours)
    assert not torch.equal(bnb_f.dequantize_4bit(packed, state), ours), "bitsandbytes trap 2 is fixed: update the notes"


# ---- whole models against transformers + bitsandbytes


def _bnb_config():
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )


def _hf_4bit(folder, **kw):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 14, f"transformers quantized {len(linears)} linears, expected 14"
    for m in linears:
        m.support_avx512bf16_for_cpu = False  # fp32 math, not the bf16 gemv (see module docstring)
    return model


@pytest.fixture
def dense_folder(tiny, hf_model, tmp_path):
    """A tiny transformers Mistral (order-one random fp32 weights) saved as an HF folder."""
    hf_model(tiny(**NF4_SHAPE), seed=3).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_nf4_model_matches_transformers_bitsandbytes(dense_folder, random_ids, max_abs_diff):
    ours = Mistral.from_pretrained(dense_folder, dtype=torch.float32, quantize="nf4").eval()
    theirs = _hf_4bit(dense_folder, quantization_config=_bnb_config())
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    for key, value in their_state.items():  # every tensor, quant state included, byte for byte
        assert key in ours_state and torch.equal(ours_state[key], value.cpu()), key
    assert set(ours_state) == set(their_state)
    ids = random_ids(2, 16, 128)
    diff = max_abs_diff(_logits(ours, ids), _logits(theirs, ids))
    print(f"NF4 logits vs transformers+bitsandbytes: max |diff| = {diff:.3g}")
    assert diff <= LOGITS_ATOL, f"max |logits diff| {diff:.3g}"


def test_prequantized_transformers_folder_loads_with_the_same_logits(dense_folder, tmp_path, random_ids, max_abs_diff):
    theirs = _hf_4bit(dense_folder, quantization_config=_bnb_config())
    theirs.save_pretrained(tmp_path / "bnb4")
    ours = Mistral.from_pretrained(tmp_path / "bnb4").eval()
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == 14
    assert ours.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32  # from bnb_4bit_compute_dtype
    ids = random_ids(2, 16, 128)
    assert max_abs_diff(_logits(ours, ids), _logits(theirs, ids)) <= LOGITS_ATOL


def test_transformers_loads_our_quantized_folder(dense_folder, tmp_path, random_ids, max_abs_diff):
    ours = Mistral.from_pretrained(dense_folder, dtype=torch.float32, quantize="nf4").eval()
    ours.save_pretrained(tmp_path / "ours4")
    theirs = _hf_4bit(tmp_path / "ours4")  # quantization_config comes from our config.json
    ids = random_ids(2, 16, 128)
    assert max_abs_diff(_logits(ours, ids), _logits(theirs, ids)) <= LOGITS_ATOL
