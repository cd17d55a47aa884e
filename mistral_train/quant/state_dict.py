"""bitsandbytes' on-disk layout of one 4-bit weight, in and out.

transformers saves a `Linear4bit` as six entries under its `weight` key:

    <module>.weight                                  (ceil(numel/2), 1) uint8 packed codes
    <module>.weight.absmax                           (n_blocks,) uint8 (fp32 without double quant)
    <module>.weight.quant_map                        (16,) fp32 NF4 levels
    <module>.weight.nested_absmax                    (ceil(n_blocks/256),) fp32   [double quant]
    <module>.weight.nested_quant_map                 (256,) fp32 dynamic map      [double quant]
    <module>.weight.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON dict (shape, dtype, offset...)

We read and write exactly this, so our quantized folders load in transformers and theirs in ours.
"""

from __future__ import annotations

import json

import torch

from mistral_train.quant.nf4_format import DTYPE_NAMES, NESTED_BLOCKSIZE, NF4Weight, dynamic_map, nf4_code

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
# Suffixes after `<module>.weight.` that belong to the quant state (nested ones optional).
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY)


def quant_state_tensor(q: NF4Weight) -> torch.Tensor:
    """The JSON metadata stored as `weight.quant_state.bitsandbytes__nf4`, as (n_bytes,) uint8.

    Key order and `json.dumps` spacing follow bitsandbytes' `QuantState.as_dict(packed=True)`,
    so the bytes are identical to what bitsandbytes writes.
    """
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": DTYPE_NAMES[q.dtype], "shape": list(q.shape)}
    if q.double_quantized:
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset)
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def to_state_dict(q: NF4Weight, key: str = "weight") -> dict[str, torch.Tensor]:
    """bitsandbytes' entries for one 4-bit weight: `key`, `key.absmax`, ... (fresh tensors for
    the shared code tables, so safetensors never sees two keys on one storage)."""
    out = {key: q.packed, f"{key}.absmax": q.absmax, f"{key}.quant_map": q.quant_map.clone()}
    if q.double_quantized:
        out[f"{key}.nested_absmax"] = q.nested_absmax
        out[f"{key}.nested_quant_map"] = q.nested_quant_map.clone()
    out[f"{key}.{QUANT_STATE_KEY}"] = quant_state_tensor(q)
    return out


def from_state_dict(parts: dict[str, torch.Tensor], key: str = "weight") -> NF4Weight:
    """Rebuild an NF4Weight from bitsandbytes' entries (`key`, `key.absmax`, ... as above).

    Raises:
        ValueError naming `key`: a missing entry, a quant type other than NF4, or tensor sizes
        that do not fit the stored shape.
    """
    meta = _read_meta(parts, key)

    def need(suffix: str) -> torch.Tensor:
        name = f"{key}.{suffix}" if suffix else key
        if name not in parts:
            raise ValueError(f"`{key}`: the 4-bit checkpoint lacks `{name}` (found {sorted(parts)})")
        return parts[name]

    nested = "nested_offset" in meta
    packed = need("")
    quant_map = need("quant_map").float()
    q = NF4Weight(
        packed=(packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1, 1),
        absmax=need("absmax"),
        shape=tuple(int(d) for d in meta["shape"]),
        dtype={v: k for k, v in DTYPE_NAMES.items()}[meta["dtype"]],
        quant_map=quant_map,
        blocksize=int(meta["blocksize"]),
        nested_absmax=need("nested_absmax").float() if nested else None,
        nested_quant_map=need("nested_quant_map").float() if nested else None,
        offset=float(meta["nested_offset"]) if nested else None,
        nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
    )
    check(q, key)
    # Standard tables become the shared per-device ones: 1 KiB saved per layer, same values.
    q.quant_map = nf4_code(quant_map.device)
    if nested and torch.equal(q.nested_quant_map, dynamic_map(q.nested_quant_map.device)):
        q.nested_quant_map = dynamic_map(q.nested_quant_map.device)
    return q


def _read_meta(parts: dict[str, torch.Tensor], key: str) -> dict:
    meta_key = next((k for k in parts if k.startswith(f"{key}.quant_state.")), None)
    if meta_key is None:
        raise ValueError(f"`{key}`: no `{key}.{QUANT_STATE_KEY}` entry (found {sorted(parts)})")
    if not meta_key.endswith("__nf4"):
        raise ValueError(f"`{meta_key}`: only NF4 4-bit weights are supported (this is {meta_key.rsplit('__', 1)[-1]!r})")
    try:
        meta = json.loads(bytes(parts[meta_key].to(torch.uint8).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"`{meta_key}`: unreadable quant_state metadata ({e})") from e
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"`{meta_key}`: quant_type {meta.get('quant_type')!r} is not supported (only 'nf4')")
    if meta.get("dtype") not in DTYPE_NAMES.values():
        raise ValueError(f"`{meta_key}`: dtype {meta.get('dtype')!r} is not one of {sorted(DTYPE_NAMES.values())}")
    for field in ("shape", "blocksize"):
        if field not in meta:
            raise ValueError(f"`{meta_key}`: metadata lacks `{field}` (has {sorted(meta)})")
    return meta


def check(q: NF4Weight, key: str) -> None:
    """Sizes of every tensor against the stored shape; errors name `key` and the shapes."""
    n_blocks = -(-q.numel // q.blocksize)
    expect = {"packed": (q.packed.numel(), -(-q.numel // 2)), "absmax": (q.absmax.numel(), n_blocks)}
    expect["quant_map"] = (q.quant_map.numel(), 16)
    if q.double_quantized:
        expect["nested_absmax"] = (q.nested_absmax.numel(), -(-n_blocks // q.nested_blocksize))
        expect["nested_quant_map"] = (q.nested_quant_map.numel(), 256)
        if q.absmax.dtype != torch.uint8:
            raise ValueError(f"`{key}`: double-quantized absmax must be uint8, got {q.absmax.dtype}")
    for what, (got, want) in expect.items():
        if got != want:
            raise ValueError(
                f"`{key}`: {what} has {got} values; weight shape {q.shape} with blocksize {q.blocksize} needs {want}"
            )
    if not torch.allclose(q.quant_map.float().cpu(), nf4_code(), atol=1e-6):
        raise ValueError(f"`{key}`: quant_map is not the NF4 table (an FP4 or custom 4-bit type?)")
