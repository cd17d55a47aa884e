"""The CUDA attention paths of packed rows, checked on CPU (model/attention_backends.py).

flash-attn cannot be installed here, so its varlen kernel is replaced by `emulated_flash_varlen`, an
exact emulation written from flash-attn's own docstring (flash_attn_interface.py): documents given
by cu_seqlens never see each other, causal, and with window_size=(left, right) "query at position
i will only attend to keys between [i - left, i + right] inclusive"; GQA query head h reads KV head
h // (n_heads // n_kv_heads). FlexAttention's forward runs on CPU (its backward does not). Both
must equal attention.attend with the dense mask of attention.build_attention_mask, which
tests/oracle/test_model_parity.py holds equal to transformers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mistral_train.model import attention_backends as backends
from mistral_train.model.attention import attend, build_attention_mask, documents_from_positions
from tests.conftest import make_pair, tiny_kwargs

TOL = 1e-5
DOCS = [[5, 11, 8], [24], [7, 1, 16]]  # document lengths of each packed row (T = 24); a 1-token document too
N_HEADS, N_KV, HEAD_DIM = 8, 2, 16


def packed_positions(docs: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])


def emulated_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, causal=False, window_size=(-1, -1)):
    """flash_attn_varlen_func's semantics on CPU, document by document: (total, h, D) in and out."""
    assert dropout_p == 0.0 and softmax_scale is None
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    lengths = cu_seqlens_q.diff()
    assert int(lengths.max()) == max_seqlen_q == max_seqlen_k
    left, right = window_size
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed = torch.ones(end - start, end - start, dtype=torch.bool)
        if causal:  # equal q/k lengths: the bottom-right and top-left alignments agree
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (h, L, D)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, enable_gqa=qd.shape[0] != kd.shape[0])
        out[start:end] = o.transpose(0, 1)
    return out


def qkv(B: int, T: int, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N_HEADS, T, HEAD_DIM, generator=gen)
    k = torch.randn(B, N_KV, T, HEAD_DIM, generator=gen)
    v = torch.randn(B, N_KV, T, HEAD_DIM, generator=gen)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def dense_reference(q, k, v, positions, window):
    """The current CPU path: SDPA with the dense (B, 1, T, T) mask."""
    T = positions.shape[1]
    documents = documents_from_positions(positions)
    index = torch.arange(T)
    return attend(q, k, v, build_attention_mask(index, index, window, None, documents, documents))


def test_varlen_arguments_by_hand():
    positions = packed_positions(DOCS)
    args = backends.varlen_arguments(positions, sliding_window=4)
    # Row starts are document starts: 0, 5, 16 | 24 | 48, 55, 56, then B*T = 72.
    assert args.cu_seqlens.tolist() == [0, 5, 16, 24, 48, 55, 56, 72]
    assert args.cu_seqlens.dtype == torch.int32
    assert args.max_seqlen == 24
    assert args.window == (3, 0)  # key j seen by query i iff i - 3 <= j <= i: four keys, as window 4 means
    assert backends.varlen_arguments(positions).window == (-1, 0)
    assert args.documents.tolist()[0] == [0] * 5 + [1] * 11 + [2] * 8
    assert args.documents.tolist()[2] == [4] * 7 + [5] + [6] * 16


def test_varlen_arguments_same_from_document_ids():
    """Per-row document ids (restarting at 0 each row) give the same arguments as the positions."""
    positions = packed_positions(DOCS)
    from_positions = backends.varlen_arguments(positions, 6)
    from_documents = backends.varlen_arguments(sliding_window=6, documents=documents_from_positions(positions))
    assert torch.equal(from_positions.cu_seqlens, from_documents.cu_seqlens)
    assert torch.equal(from_positions.documents, from_documents.documents)
    assert from_positions.max_seqlen == from_documents.max_seqlen


def test_varlen_arguments_of_unpacked_rows_and_errors():
    args = backends.varlen_arguments(torch.arange(10)[None].expand(2, 10), sliding_window=3)
    assert args.cu_seqlens.tolist() == [0, 10, 20] and args.max_seqlen == 10 and args.window == (2, 0)
    with pytest.raises(ValueError, match="exactly one of"):
        backends.varlen_arguments(sliding_window=3)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        backends.varlen_arguments(torch.arange(4)[None], sliding_window=0)


def test_emulation_window_one_returns_values():
    """Hand check of the emulation: window (0, 0) lets each query see only itself, so out = v (GQA-repeated)."""
    q, k, v = (x[0].transpose(0, 1) for x in qkv(1, 9))  # (T, h, D)
    out = emulated_flash_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32),
                                torch.tensor([0, 4, 9], dtype=torch.int32), 5, 5, causal=True, window_size=(0, 0))
    assert torch.allclose(out, v.repeat_interleave(N_HEADS // N_KV, dim=1), atol=1e-6)


@pytest.mark.parametrize("window", [None, 4, 100])
def test_flash_varlen_path_equals_dense_mask(window, monkeypatch):
    """flash_varlen_attention (our reshapes, cu_seqlens, window) through the emulated kernel, forward and backward."""
    monkeypatch.setattr(backends, "flash_varlen_kernel", lambda: emulated_flash_varlen)
    positions = packed_positions(DOCS)
    q, k, v = qkv(len(DOCS), 24, seed=1, requires_grad=True)
    packed = backends.packed_attention("flash_attn", positions, documents_from_positions(positions), window)
    got = attend(q, k, v, packed)  # attend() hands a PackedAttention its own tensors
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected = dense_reference(q, k, v, positions, window)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    assert (got - expected).abs().max() <= TOL
    for name, g, e in zip("qkv", grads, expected_grads):
        assert (g - e).abs().max() <= TOL, f"d{name} differs"


@pytest.mark.parametrize("window", [None, 4])
def test_flex_path_equals_dense_mask(window):
    positions = packed_positions(DOCS)
    q, k, v = qkv(len(DOCS), 24, seed=2)
    packed = backends.packed_attention("flex", positions, None, window)
    assert packed.block_mask is not None
    got = attend(q, k, v, packed)
    assert (got - dense_reference(q, k, v, positions, window)).abs().max() <= TOL


def test_flex_mask_mod_reads_the_varlen_documents_and_window():
    """The block mask's mask_mod evaluated on every (q, kv) pair is the dense mask, bit for bit."""
    positions = packed_positions(DOCS)
    args = backends.varlen_arguments(positions, 5)
    mask_mod = backends.document_mask_mod(args)
    B, T = positions.shape
    b, qi, ki = torch.meshgrid(torch.arange(B), torch.arange(T), torch.arange(T), indexing="ij")
    grid = mask_mod(b, None, qi, ki)
    documents = documents_from_positions(positions)
    dense = build_attention_mask(torch.arange(T), torch.arange(T), 5, None, documents, documents)[:, 0]
    assert torch.equal(grid, dense)


def test_flex_backward_is_cuda_only():
    """Why the CPU keeps SDPA for training: FlexAttention has no CPU backward (torch 2.13). If this starts
    failing, torch gained one: reconsider choose_backend's CPU answer."""
    positions = packed_positions(DOCS)
    q, k, v = qkv(len(DOCS), 24, requires_grad=True)
    packed = backends.packed_attention("flex", positions, None, None)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        attend(q, k, v, packed).sum().backward()


CUDA = torch.device("cuda")  # a device object needs no GPU; choose_backend only reads its type


@pytest.fixture
def installed(monkeypatch):
    """installed(flash=..., flex=...): what choose_backend sees as importable; the once-only log reset."""
    monkeypatch.setattr(backends, "_said", set())

    def set_(flash: bool, flex: bool = True) -> None:
        monkeypatch.setattr(backends, "flash_attn_available", lambda: flash)
        monkeypatch.setattr(backends, "flex_attention_available", lambda: flex)

    return set_


def test_choose_backend_cpu_is_sdpa(installed):
    installed(flash=True)
    assert backends.choose_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_choose_backend_flash_attn_for_half_precision(installed, dtype):
    installed(flash=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the preferred path says nothing
        assert backends.choose_backend(CUDA, dtype) == "flash_attn"
        assert backends.choose_backend(CUDA, dtype, dropout_p=0.1) == "flash_attn"


def test_choose_backend_flex_without_flash_attn_said_once(installed):
    installed(flash=False)
    with pytest.warns(UserWarning, match="FlexAttention with a block mask: flash-attn is not installed"):
        assert backends.choose_backend(CUDA, torch.bfloat16) == "flex"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second forward is silent
        assert backends.choose_backend(CUDA, torch.bfloat16) == "flex"


def test_choose_backend_flex_for_fp32_even_with_flash_attn(installed):
    installed(flash=True)
    with pytest.warns(UserWarning, match="flash-attn takes fp16/bf16, attention runs in torch.float32"):
        assert backends.choose_backend(CUDA, torch.float32) == "flex"


def test_choose_backend_dense_only_when_nothing_else_can(installed):
    installed(flash=False, flex=False)
    with pytest.warns(UserWarning, match="no FlexAttention"):
        assert backends.choose_backend(CUDA, torch.bfloat16) == "sdpa"
    installed(flash=False, flex=True)
    with pytest.warns(UserWarning, match="FlexAttention has no dropout"):
        assert backends.choose_backend(CUDA, torch.bfloat16, dropout_p=0.1) == "sdpa"


def test_packed_attention_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="'flash_attn' or 'flex', got 'sdpa'"):
        backends.packed_attention("sdpa", packed_positions(DOCS), None, None)


@pytest.mark.parametrize("backend", ["flash_attn", "flex"])
@pytest.mark.parametrize("window", [None, 5])
def test_model_logits_equal_transformers_through_backend(backend, window, monkeypatch):
    """The whole model with packed rows through each CUDA path (forced on CPU) equals transformers,
    and never builds the dense mask."""
    kwargs = tiny_kwargs(hidden_size=64, num_attention_heads=N_HEADS, num_key_value_heads=N_KV, sliding_window=window)
    ours, hf = make_pair(kwargs)
    monkeypatch.setattr(backends, "choose_backend", lambda device, dtype, dropout_p=0.0: backend)
    monkeypatch.setattr(backends, "flash_varlen_kernel", lambda: emulated_flash_varlen)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("the dense mask was built for packed rows")

    monkeypatch.setattr("mistral_train.model.mistral.build_attention_mask", no_dense_mask)
    positions = packed_positions(DOCS)
    ids = torch.randint(3, kwargs["vocab_size"], positions.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=positions, use_cache=False).logits
        got = ours(ids, position_ids=positions)
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("recompute", [None, "attention"])
def test_model_gradients_through_flash_path_equal_dense(recompute, monkeypatch):
    """Training through the varlen path (emulated kernel) gives the dense path's loss and gradients, also
    when the attention part is recomputed in backward (blocks.py hands the PackedAttention to checkpoint)."""
    kwargs = tiny_kwargs(hidden_size=64, num_attention_heads=N_HEADS, num_key_value_heads=N_KV, sliding_window=6)
    model, _ = make_pair(kwargs)
    model.train()
    if recompute:
        model.set_gradient_checkpointing(recompute)
    positions = packed_positions(DOCS)
    ids = torch.randint(3, kwargs["vocab_size"], positions.shape, generator=torch.Generator().manual_seed(4))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, position_ids=positions, labels=ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    dense_loss, dense_grads = loss_and_grads()
    monkeypatch.setattr(backends, "choose_backend", lambda device, dtype, dropout_p=0.0: "flash_attn")
    calls = []
    monkeypatch.setattr(backends, "flash_varlen_kernel", lambda: calls.append(1) or emulated_flash_varlen)
    loss, grads = loss_and_grads()
    layers = kwargs["num_hidden_layers"]
    assert len(calls) == (2 * layers if recompute else layers)  # recomputed attention calls the kernel again
    assert abs(loss - dense_loss) <= TOL
    for name, g in grads.items():
        assert (g - dense_grads[name]).abs().max() <= TOL * max(1.0, dense_grads[name].abs().max()), name
