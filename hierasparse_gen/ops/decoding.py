"""Decode attention of one query token per sequence over packed 2:4 K and V (``hierasparse::decode``)."""

from __future__ import annotations

import torch

from ..format import CHUNK
from ..tiles import choose_splits, ctas_per_sm
from . import base, checks
from .base import DTYPES, PackedKV
from .checks import fail


def decode_outputs(variant, q: torch.Tensor, batch_heads: int, tokens: int, num_splits: int):
    """Split count (0: automatic, from the variant's tiles and the GPU) and the decode outputs:
    (num_splits, out, lse, o_part, lse_part); the partials are None for a single split."""
    B, Hq, D = q.shape
    if num_splits == 0:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = choose_splits(batch_heads, tokens // variant.tiles.get("chunk_tokens", CHUNK),
                                   variant.tiles.get("warps", 4), base.sm_count(index),
                                   ctas_per_sm(variant.arch, variant.smem_bytes, variant.threads))
    out = base.alloc((B, Hq, D), q.dtype, q.device)
    lse = base.alloc((B, Hq), torch.float32, q.device)
    if num_splits == 1:
        return num_splits, out, lse, None, None
    return (num_splits, out, lse, base.alloc((B, Hq, num_splits, D), torch.float32, q.device),
            base.alloc((B, Hq, num_splits), torch.float32, q.device))


def check_decode_query(q) -> None:
    checks.check_cuda(q, "q")
    checks.check_dtype(q, "q")
    if q.dim() != 3:
        fail("q", f"expected 3 dims [batch, q_heads, head_dim], got shape {tuple(q.shape)}",
             "pass one query token per sequence as [batch, q_heads, head_dim]")


def decode(lib, q, k: PackedKV, v: PackedKV, seqlens=None, *, scale: float | None = None,
           num_splits: int | None = None, check_seqlens: bool = True):
    check_decode_query(q)
    k = checks.check_packed(k, "k", "k")
    v = checks.check_packed(v, "v", "v")
    B, Hq, D = q.shape
    Bk, Hkv = k.values.shape[:2]
    if (Bk, Hkv) != tuple(v.values.shape[:2]) or k.capacity != v.capacity or k.head_dim != v.head_dim:
        fail("k, v", f"K (batch {Bk}, kv_heads {Hkv}, capacity {k.capacity}, head_dim {k.head_dim}) and "
             f"V (batch {v.values.shape[0]}, kv_heads {v.values.shape[1]}, capacity {v.capacity}, "
             f"head_dim {v.head_dim}) do not match", "compress K and V of the same cache")
    if Bk != B:
        fail("q", f"batch {B} but the cache has batch {Bk}", "pass one query per cached sequence")
    if D != k.head_dim:
        fail("q", f"head_dim {D} but the cache has head_dim {k.head_dim}", "use the same head_dim")
    if Hq % Hkv:
        fail("q", f"{Hq} query heads are not a multiple of the {Hkv} KV heads", "pass num_kv_heads * group query heads")
    for t, name in ((k, "k"), (v, "v")):
        want = torch.uint8 if t.storage == "float8_e4m3" else q.dtype
        if t.values.dtype != want:
            fail("q" if t.scales is None else name, f"dtype {q.dtype} but {name.upper()} holds {t.values.dtype}"
                 + ("" if t.scales is None else " values with e4m3 scales"),
                 "use one dtype for Q, K and V" if t.scales is None else
                 f"pack {name.upper()} with lib.compress_{name}(x, storage='float8_e4m3')")
        if t.scales is not None:
            checks.check_cuda(t.scales, f"{name}.scales")
            if t.scales.dtype != torch.float16 or tuple(t.scales.shape) != (Bk, Hkv, t.capacity) or \
                    not t.scales.is_contiguous():
                fail(f"{name}.scales", f"{t.scales.dtype} {tuple(t.scales.shape)}",
                     f"pass the contiguous float16 [{Bk}, {Hkv}, {t.capacity}] scales compress_{name} returned")
    if q.stride(2) != 1 or q.stride(0) % 2 or q.stride(1) % 2:
        fail("q", f"strides {q.stride()} not supported (head_dim must be contiguous, other strides even)",
             "pass q.contiguous()")
    checks.check_same_device(q, "keep Q and the cache on one GPU", k=k.values, v=v.values)
    if seqlens is None:
        seqlens = torch.full((B,), min(k.length, v.length), dtype=torch.int32, device=q.device)
    else:
        checks.check_cuda(seqlens, "seqlens")
        if seqlens.dtype != torch.int32 or seqlens.shape != (B,):
            fail("seqlens", f"expected int32 of shape ({B},), got {seqlens.dtype} {tuple(seqlens.shape)}",
                 "pass torch.tensor(lengths, dtype=torch.int32, device='cuda')")
        if seqlens.device != q.device:
            fail("seqlens", f"on {seqlens.device} but q is on {q.device}", "move it to q's device")
        seqlens = seqlens.contiguous()
        capturing = torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
        if check_seqlens and not capturing:
            lo, hi = int(seqlens.min()), int(seqlens.max())
            if lo < 0 or hi > k.capacity:
                fail("seqlens", f"values in [{lo}, {hi}] exceed the cache capacity {k.capacity}",
                     f"pass lengths between 0 and {k.capacity}")
    checks.check_num_splits(num_splits)
    return torch.ops.hierasparse.decode(lib.key, q, k.values, k.meta, v.values, v.meta, seqlens,
                                        base.softmax_scale(scale, D), int(num_splits or 0), k.scales, v.scales)


def flat_tier(k_meta, v_meta, k_scales, v_scales) -> tuple[str, ...]:
    """The registry's tier key of flat tensors: 2:4 (with metadata) or dense, and which carry e4m3 scales."""
    if k_scales is None and v_scales is None:
        return ("sparse24", "sparse24")
    tiers = tuple("dense" if m is None else "sparse24" for m in (k_meta, v_meta))
    return (*tiers, *("model" if s is None else "float8_e4m3" for s in (k_scales, v_scales)))


@torch.library.custom_op("hierasparse::decode", mutates_args=())
def _decode_op(lib_key: str, q: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor | None,
               v_vals: torch.Tensor, v_meta: torch.Tensor | None, seqlens: torch.Tensor, scale: float,
               num_splits: int, k_scales: torch.Tensor | None = None,
               v_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    lib = base.library(lib_key)
    B, Hq, D = q.shape
    Hkv, cap = k_vals.shape[1], k_vals.shape[2]
    tier = flat_tier(k_meta, v_meta, k_scales, v_scales)
    variant = lib.select("decode", head_dim=D, dtype=DTYPES[q.dtype], cc=base.device_cc(q.device),
                         group=Hq // Hkv, tier=tier)
    checks.check_pointers(q, k_vals, k_meta, v_vals, v_meta)
    for s, name in ((k_scales, "k.scales"), (v_scales, "v.scales")):
        if s is not None:
            checks.check_aligned(s, name, 16)
    num_splits, out, lse, o_part, lse_part = decode_outputs(variant, q, B * Hkv, cap, num_splits)
    packed = [k_vals.data_ptr(), base.ptr(k_meta), v_vals.data_ptr(), base.ptr(v_meta)]
    if len(tier) > 2:  # the decode8 ABI: each tensor's scales after its metadata (null: model dtype)
        packed = packed[:2] + [base.ptr(k_scales)] + packed[2:] + [base.ptr(v_scales)]
    base.launch(lib, variant.symbol, q.device, q.data_ptr(), q.stride(0), q.stride(1), *packed,
                seqlens.data_ptr(), B, Hkv, cap, scale, num_splits, base.ptr(o_part), base.ptr(lse_part),
                out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr())
    return out, lse


@_decode_op.register_fake
def _(lib_key, q, k_vals, k_meta, v_vals, v_meta, seqlens, scale, num_splits, k_scales=None, v_scales=None):
    B, Hq, D = q.shape
    return q.new_empty((B, Hq, D)), q.new_empty((B, Hq), dtype=torch.float32)
