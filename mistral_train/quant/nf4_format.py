"""NF4 weights in bitsandbytes' exact format, in plain torch.

The layout (bitsandbytes `quantize_4bit(w, quant_type="nf4", blocksize=64,
compress_statistics=True)`, byte for byte):

- the weight is flattened and cut into blocks of 64 values; each block is scaled by its
  absolute maximum and every value is mapped to the nearest of the 16 NF4 levels;
- two 4-bit codes go in one uint8, the first value of each pair in the high nibble; an odd
  count is padded with the code of 0.0. Stored as `(ceil(numel / 2), 1)`;
- double quantization: the per-block absmax (fp32) minus its mean (`offset`) is quantized
  to 8 bits with bitsandbytes' signed dynamic map, in blocks of 256 with their own fp32
  absmax (`nested_absmax`).

Blocks run over the flattened tensor, so a last dimension that is not a multiple of 64 is
handled like any other (bitsandbytes' CPU dequantize kernel gets that case wrong; we never
call it). bitsandbytes itself is only a test oracle and an optional CUDA fast path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# The 16 NF4 levels (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], as fp32 literals.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# The dtypes bitsandbytes quantizes, spelled as its packed quant state spells them.
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@lru_cache(maxsize=8)
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 lookup table, (16,) fp32, sorted ascending (index = 4-bit code).

    One shared tensor per device (read-only by convention): every quantized layer points at
    it instead of holding its own copy.
    """
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@lru_cache(maxsize=8)
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map, (256,) fp32 sorted ascending; shared per device."""
    values = [0.0, 1.0]
    for i in range(7):  # 7 exponent steps of the signed 8-bit dynamic type: 2**i means each
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (i - 6)) * means  # fp32 product, like bitsandbytes
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """A weight quantized to NF4 with bitsandbytes' quant state.

    Attributes:
        packed: (ceil(numel / 2), 1) uint8, two codes per byte, first value in the high nibble.
        absmax: (n_blocks,) block scales: uint8 codes when double-quantized, else fp32.
        shape: the original weight shape, e.g. (out_features, in_features).
        dtype: dtype of the weight that was quantized (bitsandbytes' `QuantState.dtype`).
        quant_map: (16,) fp32 NF4 levels (stored for the format; dequantization uses NF4_LEVELS).
        nested_absmax: (ceil(n_blocks / 256),) fp32 scales of the 8-bit absmax codes.
        nested_quant_map: (256,) fp32 dynamic map that decodes `absmax`.
        offset: mean of the fp32 absmax, added back after decoding (a float32 value).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_map: torch.Tensor
    blocksize: int = BLOCKSIZE
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None
    offset: Optional[float] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quantized(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the state by bitsandbytes' name ("absmax", ...), without the packed data."""
        out = {"absmax": self.absmax, "quant_map": self.quant_map}
        if self.double_quantized:
            out.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_quant_map)
        return out

    def to(self, device: torch.device | str) -> "NF4Weight":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return replace(self, packed=self.packed.to(device), **moved)

    def block_absmax(self) -> torch.Tensor:
        """Per-block fp32 scales, (n_blocks,): the 8-bit codes decoded when double-quantized."""
        if not self.double_quantized:
            return self.absmax.float()
        decoded = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_blocksize)
        return decoded + self.offset  # the float itself, not a new tensor: lets torch.compile share one graph over layers

    def storage_bytes(self) -> int:
        """Bytes held by the packed codes and the quant state tensors."""
        return sum(t.numel() * t.element_size() for t in (self.packed, *self.tensors().values()))


_LUT_SIZE = 65536


@lru_cache(maxsize=4)
def _code_lut(code_values: tuple[float, ...]) -> torch.Tensor:
    """(65536,) int64: the code index for each of 65536 evenly spaced points of [-1, 1].

    bitsandbytes' CPU kernel quantizes through this table instead of an exact nearest-code
    search, so a value close to a midpoint can land on the farther code; byte-exact output
    needs the same table: entry i holds how many code midpoints lie strictly below
    -1 + 2i / 65535 (every step in fp32).
    """
    code = torch.tensor(code_values, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    steps = 2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)
    points = -1.0 + steps / torch.full_like(steps, _LUT_SIZE - 1)  # tensor / tensor: an IEEE division
    return torch.searchsorted(midpoints, points, right=False)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU blockwise 8-bit quantization (used for the nested absmax).

    Args:
        x: (n,) float values. code: (256,) sorted map. blocksize: values per block.
    Returns:
        (codes (n,) uint8, absmax (ceil(n / blocksize),) fp32).
    """
    n = x.numel()
    blocks = torch.nn.functional.pad(x.float().reshape(-1), (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)  # padding zeros never raise an absolute maximum
    inverse = 1.0 / absmax  # the kernel multiplies by the reciprocal, in fp32
    normed = (blocks * inverse[:, None]).clamp(-1.0, 1.0)
    # The kernel's rounding sequence, step by step: ((v + 1) * 0.5) * 65535 + 0.5, truncated.
    position = (((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    lut = _code_lut(tuple(code.detach().float().cpu().tolist())).to(x.device)
    index = lut[position.clamp(0, _LUT_SIZE - 1)]
    index = torch.where((absmax == 0)[:, None], torch.zeros_like(index), index)  # an all-zero block: codes 0
    return index.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: (n,) uint8 -> (n,) fp32."""
    n = q.numel()
    values = torch.nn.functional.pad(code.float()[q.reshape(-1).long()], (0, -n % blocksize))
    return (values.view(-1, blocksize) * absmax.float()[:, None]).reshape(-1)[:n]


_CHUNK_VALUES = 1 << 22
_CODE_OF_ZERO = NF4_LEVELS.index(0.0)


def _nf4_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> (codes (n,) uint8 in 0..15, absmax (ceil(n / blocksize),) fp32), as bitsandbytes."""
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # bitsandbytes multiplies full blocks by the reciprocal but divides the short last block,
    # and clamps that block's stored absmax (not the full blocks') away from 0: byte-exact needs both.
    full = n // blocksize
    scaled = (blocks[:full] * (1.0 / absmax[:full].clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if n % blocksize:
        absmax[full] = absmax[full].clamp(min=1e-38)
        scaled = torch.cat([scaled, (flat[full * blocksize :] / absmax[full]).clamp(-1, 1)])
    levels = nf4_code(flat.device)
    codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True)  # nearest level, ties go down
    return codes.to(torch.uint8), absmax


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True, name: str = "weight"
) -> NF4Weight:
    """Quantize a float tensor to NF4, byte-identical to bitsandbytes' `quantize_4bit`.

    Args:
        weight: any shape, fp32/bf16/fp16 (e.g. (out_features, in_features)).
        blocksize: values per absmax block (64 is what QLoRA and transformers use).
        double_quant: 8-bit quantize the absmax too (`bnb_4bit_use_double_quant`).
        name: used in error messages (the module or key being quantized).
    """
    if weight.dtype not in DTYPE_NAMES:
        raise ValueError(f"{name}: NF4 quantizes fp32/bf16/fp16 weights, got {weight.dtype} of shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor of shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} holds NaN or inf; refusing to quantize it")
    # Blocks are independent: quantize in chunks of whole blocks to bound the temporaries.
    chunk = blocksize * max(1, _CHUNK_VALUES // blocksize)
    parts = [_nf4_codes(flat[i : i + chunk], blocksize) for i in range(0, flat.numel(), chunk)]
    codes = torch.cat([c for c, _ in parts])
    absmax = torch.cat([a for _, a in parts])
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=_CODE_OF_ZERO)  # odd count: pad with 0.0
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    levels = nf4_code(flat.device)
    state = NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype, levels, blocksize)
    if not double_quant:
        return state
    offset = absmax.mean()
    codes8, nested = quantize_blockwise_8bit(absmax - offset, dynamic_map(flat.device), NESTED_BLOCKSIZE)
    return replace(
        state, absmax=codes8, nested_absmax=nested, nested_quant_map=dynamic_map(flat.device), offset=float(offset)
    )


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an NF4Weight to a tensor of `q.shape` in `dtype` (products in fp32, one rounding)."""
    packed = q.packed.reshape(-1)
    pairs = _byte_table(packed.device).index_select(0, packed.int())  # (n_bytes, 2): high nibble first
    values, tail = pairs.reshape(-1), -q.numel % q.blocksize
    if tail or values.numel() != q.numel:  # a last block cut short (or an odd count): pad to whole blocks
        values = torch.nn.functional.pad(values[: q.numel], (0, tail))
    # values is a fresh tensor (index_select's or pad's), so the scaling runs in place: one pass fewer per call
    # on a path every NF4 matmul takes twice a step (forward and backward)
    values = values.view(-1, q.blocksize).mul_(q.block_absmax()[:, None])
    return values.reshape(-1)[: q.numel].view(q.shape).to(dtype)


@lru_cache(maxsize=8)
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two NF4 levels a packed byte holds, high nibble first."""
    byte = torch.arange(256, device=device)
    return nf4_code(device)[torch.stack([byte >> 4, byte & 0x0F], dim=1)]
