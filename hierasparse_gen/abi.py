"""ctypes signatures of the C entry points, keyed by a variant's ABI (recorded in the manifest).

A variant's ``abi`` field names the signature set of its entry points: ``SIGNATURES[(abi, suffix)]``
holds the argument types of symbol ``hsg_<variant name><suffix>``; every entry point returns a
cudaError_t (int). The runtime helpers (``hsg_device_count``, ``hsg_error_string``) are declared
by :func:`declare_runtime`.
"""

from __future__ import annotations

import ctypes as _c

_i64, _i32, _f32, _f64, _p = _c.c_longlong, _c.c_int, _c.c_float, _c.c_double, _c.c_void_p

#: (abi, symbol suffix) -> argument types; the last argument of a kernel entry point is the stream.
SIGNATURES = {
    ("decode", ""): [_p, _i64, _i64, _p, _p, _p, _p, _p, _i32, _i32, _i32, _f32, _i32,
                     _p, _p, _p, _i64, _i64, _p, _p],
    ("decode", "_smem_bytes"): [],
    ("decode", "_threads"): [],
    # flat decode with e4m3 tensors: K values, metadata, scales, then V's (a model-dtype tensor's scales: null)
    ("decode8", ""): [_p, _i64, _i64, _p, _p, _p, _p, _p, _p, _p, _i32, _i32, _i32, _f32, _i32,
                      _p, _p, _p, _i64, _i64, _p, _p],
    ("decode8", "_smem_bytes"): [],
    ("decode8", "_threads"): [],
    # (compress7: the fill entry points take the 2:4 choice's weights, K per channel, V per token, the append
    # entry point K's channel weights, V's token weights and the blocks' masses for re-tiering; null:
    # magnitudes, by count; _token_mass scores the prompt's keys by its last queries, given their log-sum-exp
    # or not, _mass_stats sums the scores per block and weighs V's tokens, _channel_weights weighs K's channels,
    # _select fills a second table by the same scores. compress6 had neither _mass_stats nor _channel_weights, its
    # _token_mass took no log-sum-exp and its _select one table, compress5 had no _token_mass, compress4's append
    # took V's window weights, compress3's K's only)
    ("compress7", "_k"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p, _p],
    ("compress7", "_v"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p, _p],
    ("compress7", "_fill_k"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _p, _i32, _i32, _p, _i32, _p, _p, _i32, _p,
                               _p],
    ("compress7", "_fill_v"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _p, _i32, _i32, _p, _i32, _p, _p, _i32, _p,
                               _p],
    ("compress7", "_select"): [_p, _i32, _i32, _i32, _i32, _i32, _i32, _p, _i32, _i32, _p, _p],
    ("compress7", "_score_k"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p],
    ("compress7", "_score_v"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p],
    # q_obs, its strides, k, its strides, batch, heads, group, window, length, scale, the queries' log-sum-exp
    # (or null), its strides, workspace, its bytes, mass
    ("compress7", "_token_mass"): [_p, _i64, _i64, _i64, _p, _i64, _i64, _i64, *[_i32] * 5, _f32, _p, _i64, _i64,
                                   _i64, _p, _i64, _p, _p],
    # masses, rows, length, window, block, block sums, seen masses, their row stride, V's weights, their row stride
    ("compress7", "_mass_stats"): [_p, *[_i32] * 4, _p, _p, _i64, _p, _i64, _p],
    # q_obs, its strides, batch, heads, group, window, out
    ("compress7", "_channel_weights"): [_p, _i64, _i64, _i64, *[_i32] * 4, _p, _p],
    # k, its strides, v, its strides, seqlens, ctrl, ctrl_width, batch, heads, max_blocks, block,
    # sink/window blocks, max_len; K then V pools (table, dense, vals, meta, n_dense, n_sparse, ratio); K's
    # channel weights, V's token weights [B, H, max_blocks * block], the blocks' masses [B, H, max_blocks] (each
    # or null)
    ("compress7", "_append"): [_p, _i64, _i64, _p, _i64, _i64, _p, _p, *[_i32] * 8,
                               *[_p, _p, _p, _p, _i32, _i32, _f64] * 2, _p, _p, _p, _p],
    # decode over the cache's block tables
    ("decode_table", ""): [_p, _i64, _i64, _p, _p, _i32, _p, _p, _i32, _i32, _p, _p, _p, _p, _i32, _i32,
                           _p, _i32, _i32, _f32, _i32, _p, _p, _p, _i64, _i64, _p, _p],
    ("decode_table", "_smem_bytes"): [],
    ("decode_table", "_threads"): [],
    # ... with e4m3 tensors: after n_sparse_v, per tensor its e4m3 pools (dense values, dense scales, 2:4 scales,
    # dense slots; null and 0 for a model-dtype tensor)
    ("decode_table8", ""): [_p, _i64, _i64, _p, _p, _i32, _p, _p, _i32, _i32, _p, _p, _p, _p, _i32, _i32,
                            *[_p, _p, _p, _i32] * 2, _p, _i32, _i32, _f32, _i32, _p, _p, _p, _i64, _i64, _p, _p],
    ("decode_table8", "_smem_bytes"): [],
    ("decode_table8", "_threads"): [],
    # q, its strides; K then V source (table, max_blocks, block, dense, n_dense, vals, meta,
    # n_sparse, tail, tail strides x3, tail_start); seqlens, qlens, max_len, batch, Hq, Hkv, Lq,
    # scale, out, its strides, lse, stream
    ("prefill", ""): [_p, _i64, _i64, _i64,
                      *[_p, _i32, _i32, _p, _i32, _p, _p, _i32, _p, _i64, _i64, _i64, _p] * 2,
                      _p, _p, _i32, _i32, _i32, _i32, _i32, _f32, _p, _i64, _i64, _i64, _p, _p],
    ("prefill", "_smem_bytes"): [],
    # sm_90a, all-2:4: q, its strides, K values, K meta, V values, V meta, capacity, batch, Hq, Hkv,
    # queries, scale, out, lse, stream
    ("prefill_wgmma", ""): [_p, _i64, _i64, _i64, _p, _p, _p, _p, _i32, _i32, _i32, _i32, _i32, _f32, _p, _p, _p],
    ("prefill_wgmma", "_smem_bytes"): [],
    # sm_90a, balanced (dense K): q, its strides, K, its strides, K's token count, V values, V meta, capacity, ...
    ("prefill_wgmma_balanced", ""): [_p, _i64, _i64, _i64, _p, _i64, _i64, _i64, _i32, _p, _p, _i32, _i32, _i32,
                                     _i32, _i32, _f32, _p, _p, _p],
    ("prefill_wgmma_balanced", "_smem_bytes"): [],
    # sm_90a over the cache's block tables: q, its strides, K table, V table, max_blocks; K then V pools (dense,
    # n_dense, values, meta, n_sparse); dense K rows and their strides (or null: K's table); seqlens, qlens (or both
    # null); batch, Hq, Hkv, queries, scale, out, lse, stream
    ("prefill_wgmma_table", ""): [_p, _i64, _i64, _i64, _p, _p, _i32, *[_p, _i32, _p, _p, _i32] * 2,
                                  _p, _i64, _i64, _i64, _p, _p, _i32, _i32, _i32, _i32, _f32, _p, _p, _p],
    ("prefill_wgmma_table", "_smem_bytes"): [],
}
# compress7f8: compress7 and the e4m3 packers (x, its strides, batch, heads, length, capacity, values, metadata
# (null: dense), scales)
SIGNATURES.update({("compress7f8", suffix): args for (abi, suffix), args in list(SIGNATURES.items())
                   if abi == "compress7"})
SIGNATURES.update({("compress7f8", suffix): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p, _p, _p]
                   for suffix in ("_k8", "_v8", "_kd8", "_vd8")})
# ... and the widening of 2:4 e4m3 into 16-bit 2:4 for prefill (values, metadata, scales, planes, capacity, out,
# stream)
SIGNATURES.update({("compress7f8", suffix): [_p, _p, _p, _i32, _i32, _p, _p] for suffix in ("_widen_k8", "_widen_v8")})
# ... the cache with e4m3 tensors: fill (compress7's fill arguments, then the e4m3 pools: dense values, dense
# scales, 2:4 scales, dense slots; then the weights) and the decode step (compress7's append arguments up to V's
# ratio, then per tensor its e4m3 pools, or nulls and 0 for a model-dtype tensor; then the weights and masses)
SIGNATURES.update({("compress7f8", f"_fill_{t}8"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _p, _i32, _i32, _p, _i32,
                                                     _p, _p, _i32, _p, _p, _p, _i32, _p, _p] for t in "kv"})
SIGNATURES[("compress7f8", "_append8")] = [*SIGNATURES[("compress7", "_append")][:-4], *[_p, _p, _p, _i32] * 2,
                                           _p, _p, _p, _p]

#: ABIs with host-side size queries answered at load time (no GPU needed)
SIZE_QUERIES = {"decode": ("_smem_bytes", "_threads"), "decode8": ("_smem_bytes", "_threads"),
                "decode_table": ("_smem_bytes", "_threads"), "decode_table8": ("_smem_bytes", "_threads")}

ABIS = frozenset(abi for abi, _ in SIGNATURES) | {"runtime"}


def declare(cdll, symbol: str, abi: str) -> None:
    """Give every entry point of a variant (``symbol`` + each suffix of its ABI) its ctypes signature."""
    for (name, suffix), argtypes in SIGNATURES.items():
        if name == abi:
            fn = getattr(cdll, symbol + suffix)
            fn.argtypes, fn.restype = argtypes, _i32


def declare_runtime(cdll) -> None:
    cdll.hsg_device_count.argtypes = [_c.POINTER(_i32)]
    cdll.hsg_device_count.restype = _i32
    cdll.hsg_error_string.argtypes = [_i32]
    cdll.hsg_error_string.restype = _c.c_char_p
