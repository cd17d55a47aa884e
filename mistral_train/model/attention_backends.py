"""Packed rows on CUDA: flash-attn's variable-length kernel, else FlexAttention; never a dense (B, 1, T, T) mask.

What each backend receives comes from one function, `varlen_arguments`: the documents of the
packed rows as flash-attn's cu_seqlens/max_seqlen/window and, for FlexAttention, the same
document ids and window read by the block mask's `mask_mod`. The CPU keeps SDPA with a dense
mask: FlexAttention has no backward on CPU (torch 2.13 raises NotImplementedError), and
flash-attn is CUDA only. The arguments are checked on CPU against the dense-mask result
(tests/model/test_attention_backends.py: an exact emulation of the varlen kernel, and
FlexAttention's CPU forward).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mistral_train.model.attention import documents_from_positions

BACKENDS = ("flash_attn", "flex", "sdpa")  # "sdpa": the dense-mask path of attention.attend
_HALF = (torch.float16, torch.bfloat16)  # flash-attn's kernels take nothing else
_said: set[str] = set()


def _say_once(message: str) -> None:
    """Warn once per process: the backend choice runs every forward."""
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=3)


@dataclass(frozen=True)
class VarlenArguments:
    """Packed rows as flash-attn's varlen kernel and FlexAttention's block mask read them."""

    documents: torch.Tensor  # (B, T) int32 id of each token's document, unique over the whole batch
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 start of each document in the flattened B*T tokens, then B*T
    max_seqlen: int  # the longest document
    window: tuple[int, int]  # flash-attn's (left, right): key j is seen by query i when i - left <= j <= i + right


def varlen_arguments(
    position_ids: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
    documents: Optional[torch.Tensor] = None,
) -> VarlenArguments:
    """Documents, cu_seqlens, max_seqlen and window of packed rows; the one source for both CUDA backends.

    Args:
        position_ids: (B, T) positions restarting at each document (attention.documents_from_positions);
            or give `documents` instead.
        sliding_window: a query at i sees keys j with i - window < j <= i (transformers' rule, as
            attention.build_attention_mask), i.e. flash-attn's window (window - 1, 0); None: (-1, 0).
        documents: (B, T) document id of each token; a document is a contiguous span (packing writes
            them so), and a new row always starts a new one.
    Returns:
        VarlenArguments.
    """
    if (position_ids is None) == (documents is None):
        raise ValueError("varlen_arguments takes exactly one of `position_ids` and `documents`")
    if documents is None:
        documents = documents_from_positions(position_ids)
        if documents is None:  # one document per row
            documents = torch.zeros_like(position_ids)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    B, T = documents.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=documents.device)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]  # column 0: every row starts a document
    flat = starts.reshape(-1)
    ids = (flat.cumsum(0) - 1).to(torch.int32)  # (B*T,) global document id
    begin = flat.nonzero().squeeze(1)
    cu_seqlens = torch.cat((begin, begin.new_tensor([B * T]))).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())  # one host sync per forward and window: flash-attn needs an int
    left = -1 if sliding_window is None else sliding_window - 1  # j > i - w  <=>  j >= i - (w - 1)
    return VarlenArguments(ids.view(B, T), cu_seqlens, max_seqlen, (left, 0))


def document_mask_mod(arguments: VarlenArguments) -> Callable:
    """FlexAttention's mask_mod for `arguments`: same document, causal, within the window."""
    documents, left = arguments.documents, arguments.window[0]

    def mask_mod(b, h, q, kv):
        allowed = (documents[b, q] == documents[b, kv]) & (kv <= q)
        return allowed if left < 0 else allowed & (q - kv <= left)

    return mask_mod


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """`import flash_attn` works (once per process; tests monkeypatch this name)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError as error:  # installed but built for another torch/CUDA: say so, then go on without it
        _say_once(f"flash-attn is installed but does not import ({error}): packed rows on CUDA use FlexAttention; "
                  f"reinstall flash-attn for torch {torch.__version__} / CUDA {torch.version.cuda}")
        return False
    return True


def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def choose_backend(device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0) -> str:
    """The backend for packed (or windowed) rows without padding or cache: one of BACKENDS.

    CUDA: flash-attn varlen when it is installed and attention runs in fp16/bf16, else FlexAttention.
    CPU (and other devices): "sdpa" with the dense mask. FlexAttention's CPU forward is faster
    (105 vs 160 ms at B=4, T=512, 8/2 heads, compiled, measured once, docs/benchmarks.md) but it
    has no CPU backward and compiles for ~30 s, so training stays on SDPA.

    Args:
        dtype: the activations' dtype; under CUDA autocast the autocast dtype is what attention sees.
        dropout_p: the model's attention dropout (FlexAttention has none).
    """
    if device.type != "cuda":
        return "sdpa"
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    if flash_attn_available() and dtype in _HALF:
        return "flash_attn"
    why = "flash-attn is not installed" if dtype in _HALF else f"flash-attn takes fp16/bf16, attention runs in {dtype}"
    if not flex_attention_available():
        _say_once(f"packed rows on CUDA use SDPA with a dense (B, 1, T, T) mask: {why} and this torch has no "
                  f"FlexAttention (torch >= 2.5); install flash-attn for the varlen kernel")
        return "sdpa"
    if dropout_p > 0:
        _say_once(f"packed rows on CUDA use SDPA with a dense (B, 1, T, T) mask: {why} and FlexAttention has no "
                  f"dropout (attention_dropout={dropout_p}); install flash-attn or set attention_dropout to 0")
        return "sdpa"
    _say_once(f"packed rows on CUDA use FlexAttention with a block mask: {why}")
    return "flex"


@dataclass
class PackedAttention:
    """Stands in AttentionInputs.mask for packed rows on CUDA; attention.attend calls `attend` with it."""

    backend: str  # "flash_attn" or "flex"
    arguments: VarlenArguments
    block_mask: Optional[object] = None  # FlexAttention's BlockMask, built once per forward and window

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        """(B, n_heads, T, D), (B, n_kv_heads, T, D) x2 -> (B, n_heads, T, D)."""
        if self.backend == "flash_attn":
            return flash_varlen_attention(q, k, v, self.arguments, dropout_p)
        if dropout_p > 0:
            raise ValueError("FlexAttention has no dropout: choose_backend should have picked SDPA")
        return flex_document_attention(q, k, v, self.block_mask)


def packed_attention(backend: str, position_ids: torch.Tensor, documents: Optional[torch.Tensor],
                     sliding_window: Optional[int]) -> PackedAttention:
    """What one forward passes to every layer of one window for `backend` ("flash_attn" or "flex").

    Args:
        position_ids: (B, T); documents: (B, T) from documents_from_positions, or None (one per row).
    """
    arguments = varlen_arguments(position_ids, sliding_window) if documents is None else \
        varlen_arguments(sliding_window=sliding_window, documents=documents)
    if backend == "flash_attn":
        return PackedAttention(backend, arguments)
    if backend != "flex":
        raise ValueError(f"packed attention backend must be 'flash_attn' or 'flex', got {backend!r}")
    B, T = arguments.documents.shape
    return PackedAttention(backend, arguments, _block_mask(arguments, B, T))


def _block_mask(arguments: VarlenArguments, B: int, T: int):
    from torch.nn.attention.flex_attention import create_block_mask

    device = arguments.documents.device
    # Compiled on CUDA so the (B, T, T) boolean grid is never materialized; eager elsewhere (tests).
    build = _compiled("create_block_mask", create_block_mask) if device.type == "cuda" else create_block_mask
    return build(document_mask_mod(arguments), B, None, T, T, device=device)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention with a document block mask; GQA without repeating K/V."""
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        return _compiled("flex_attention", flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # off CUDA only tests call this: the unfused forward is what they check
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    """torch.compile'd once per process: FlexAttention is only fused (and memory-lean) when compiled."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def flash_varlen_kernel() -> Callable:
    """flash_attn_varlen_func (choose_backend checked that it imports); a name of its own so tests can
    put the CPU emulation in its place."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arguments: VarlenArguments,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """flash-attn's varlen kernel over the flattened rows: (B, H, T, D) in, (B, H, T, D) out."""
    B, H, T, D = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, D) -> (B*T, h, D), the kernel's layout
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

    cu, longest = arguments.cu_seqlens, arguments.max_seqlen
    out = flash_varlen_kernel()(flat(q), flat(k), flat(v), cu, cu, longest, longest, dropout_p=dropout_p,
                                causal=True, window_size=arguments.window)
    return out.view(B, T, H, D).transpose(1, 2)
