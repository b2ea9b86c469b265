"""2:4 compression of dense K or V into the packed kernel layout (``hierasparse::compress``)."""

from __future__ import annotations

import torch

from .. import format_fp8
from ..format import CHUNK, round_capacity
from ..policy import check_storage
from ..variants import COMPRESS_E4M3_ABI
from . import base, checks
from .base import DTYPES, PackedKV


def packed_shapes(kind: str, B: int, H: int, cap: int, D: int):
    if kind == "k":
        return (B, H, cap, D // 2), (B, H, cap, D // 16)
    return (B, H, cap // 2, D), (B, H, cap // 16, D)


def compress(lib, x: torch.Tensor, kind: str, capacity: int | None = None, storage: str = "model",
             sparse: bool = True) -> PackedKV:
    what = "k" if kind == "k" else "v"
    check_storage(storage, "storage")
    if not sparse and storage != "float8_e4m3":
        checks.fail(what, "sparse=False with the model dtype would store the tensor as it is",
                    "pass storage='float8_e4m3' for the dense e4m3 cache, or sparse=True")
    checks.check_cuda(x, what)
    checks.check_dtype(x, what)
    if x.dim() != 4:
        checks.fail(what, f"expected 4 dims [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}",
                    "reshape to [batch, kv_heads, tokens, head_dim]")
    B, H, L, D = x.shape
    if B < 1 or H < 1:
        checks.fail(what, f"empty batch or head dimension in shape {tuple(x.shape)}", "pass at least one")
    if x.stride(3) != 1:
        checks.fail(what, f"head_dim must be contiguous (stride 1), got strides {x.stride()}",
                    f"pass {what}.contiguous()")
    cap = round_capacity(L) if capacity is None else int(capacity)
    if cap % CHUNK or cap < L or cap < CHUNK:
        checks.fail("capacity", f"{cap} cannot hold {L} tokens in whole {CHUNK}-token chunks",
                    f"use a multiple of {CHUNK} that is at least {max(L, CHUNK)} (e.g. {round_capacity(L)})")
    if storage == "float8_e4m3":
        return _compress8(lib, x, kind, cap, sparse)
    vals, meta = torch.ops.hierasparse.compress(lib.key, x, cap, kind)
    return PackedKV(vals, meta, kind, L)


def _compress8(lib, x: torch.Tensor, kind: str, cap: int, sparse: bool) -> PackedKV:
    """e4m3: the library's packers (a spec with e4m3 tiers builds them), else format_fp8's torch oracle on x's
    device; the same bytes either way."""
    B, H, L, D = x.shape
    variant = compress_variant(lib, x)
    if variant.abi != COMPRESS_E4M3_ABI:
        if sparse:
            vals, meta, scales = (format_fp8.pack_k if kind == "k" else format_fp8.pack_v)(x, cap)
            return PackedKV(vals, meta, kind, L, scales)
        vals, scales = (format_fp8.pack_k_dense if kind == "k" else format_fp8.pack_v_dense)(x, cap)
        return PackedKV(vals, None, kind, L, scales)
    format_fp8.check_storable(x)
    x = checks.rows16(x)
    vshape = (B, H, cap, D) if not sparse else packed_shapes(kind, B, H, cap, D)[0]
    vals = base.alloc(vshape, torch.uint8, x.device)
    meta = base.alloc(packed_shapes(kind, B, H, cap, D)[1], torch.int16, x.device) if sparse else None
    scales = base.alloc((B, H, cap), torch.float16, x.device)
    base.launch(lib, f"{variant.symbol}_{kind}{'' if sparse else 'd'}8", x.device, x.data_ptr(), x.stride(0),
                x.stride(1), x.stride(2), B, H, L, cap, vals.data_ptr(), base.ptr(meta), scales.data_ptr())
    return PackedKV(vals, meta, kind, L, scales)


def compress_variant(lib, x: torch.Tensor):
    """The compression variant (its entry points also score, select, fill and append cache blocks)."""
    return lib.select("compress", head_dim=x.shape[-1], dtype=DTYPES[x.dtype], cc=base.device_cc(x.device))


def widen8(lib, vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    """16-bit values in ``dtype`` (same layout, same metadata) of 2:4 e4m3 bytes in the kernel layout: ``vals``
    ``[..., cap, D/2]`` (K) or ``[..., cap/2, D]`` (V), ``meta`` likewise, ``scales [..., cap]``; what
    format_fp8.model_dtype_k/v give, from the library's widening kernel where it has one (a spec with e4m3 tiers),
    else from those torch functions."""
    D = vals.shape[-1] * (2 if kind == "k" else 1)
    variant = lib.find("compress", head_dim=D, dtype=DTYPES[dtype], cc=base.device_cc(vals.device))
    if variant is None or variant.abi != COMPRESS_E4M3_ABI:
        return format_fp8.model_dtype_2to4(vals, meta, scales, kind, dtype)
    return torch.ops.hierasparse.widen8(lib.key, vals, meta, scales, kind, dtype)


@torch.library.custom_op("hierasparse::widen8", mutates_args=())
def _widen8_op(lib_key: str, vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, kind: str,
               dtype: torch.dtype) -> torch.Tensor:
    lib = base.library(lib_key)
    D = vals.shape[-1] * (2 if kind == "k" else 1)
    variant = lib.select("compress", head_dim=D, dtype=DTYPES[dtype], cc=base.device_cc(vals.device))
    vals, meta, scales = vals.contiguous(), meta.contiguous(), scales.contiguous()
    out = base.alloc(vals.shape, dtype, vals.device)
    cap = scales.shape[-1]
    base.launch(lib, f"{variant.symbol}_widen_{kind}8", vals.device, vals.data_ptr(), meta.data_ptr(),
                scales.data_ptr(), scales.numel() // cap, cap, out.data_ptr())
    return out


@_widen8_op.register_fake
def _(lib_key, vals, meta, scales, kind, dtype):
    return vals.new_empty(vals.shape, dtype=dtype)


# Dispatch happens inside the custom ops: it runs eagerly at launch time, so torch.compile
# sees only the shape checks above and an opaque op.

@torch.library.custom_op("hierasparse::compress", mutates_args=())
def _compress_op(lib_key: str, x: torch.Tensor, capacity: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    lib = base.library(lib_key)
    B, H, L, D = x.shape
    symbol = f"{compress_variant(lib, x).symbol}_{kind}"
    x = checks.rows16(x)
    vshape, mshape = packed_shapes(kind, B, H, capacity, D)
    vals = base.alloc(vshape, x.dtype, x.device)
    meta = base.alloc(mshape, torch.int16, x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        code = lib.function(symbol)(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), B, H, L,
                                    capacity, vals.data_ptr(), meta.data_ptr(), stream)
    lib.check(code, symbol)
    return vals, meta


@_compress_op.register_fake
def _(lib_key, x, capacity, kind):
    B, H, _, D = x.shape
    vshape, mshape = packed_shapes(kind, B, H, capacity, D)
    return x.new_empty(vshape), x.new_empty(mshape, dtype=torch.int16)
