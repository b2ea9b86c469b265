"""Causal prefill over packed or dense K and packed V, and the one rule that picks its kernel family.

Two families take prefill: the warp-level ``mma_sp`` kernel (any sm_80+ arch; every call shape:
chunks, per-sequence lengths, tails) and the sm_90a ``wgmma`` kernels (Hopper; whole prompts).
:func:`choose_kernel` decides between them for every prefill entry point (this module's
:func:`prefill` and :func:`~hierasparse_gen.ops.cache_kernels.prefill_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import format_fp8
from ..errors import CudaError, DispatchError
from ..policy import KERNELS, check_kernel
from . import base, checks
from .base import DTYPES, PackedKV
from .packing import widen8
from .checks import fail

#: prefill's ``kernel=`` choices (see choose_kernel)
_CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported


def choose_kernel(lib, kernel: str, refusals: list[str], **want) -> str:
    """The kernel family of a prefill call: "wgmma" or "mma_sp".

    ``kernel="auto"`` (the rule, here only): the sm_90a wgmma kernel when the library has one for
    the call (``lib.select("prefill", family="wgmma", **want)`` finds it: head_dim, dtype, GQA
    group, tiers, an sm_90 device) and the call is one it takes (``refusals``, the caller's reasons
    why it does not, is empty: a whole prompt, no per-sequence lengths or tails); else the
    warp-level mma_sp kernel, which takes every call. ``"wgmma"`` or ``"mma_sp"`` force a family;
    a forced wgmma that cannot run raises DispatchError with every reason (no silent fallback);
    the mma_sp kernel is selected, with its own reasons, when the op launches.
    """
    check_kernel(kernel)
    if kernel == "mma_sp":
        return "mma_sp"
    if kernel == "auto":
        return "wgmma" if not refusals and lib.find("prefill", family="wgmma", **want) else "mma_sp"
    try:
        lib.select("prefill", family="wgmma", **want)
        missing = ""
    except DispatchError as e:
        missing = f"\n{e}"
    if refusals or missing:
        why = "".join(f"\n  this call: {r}" for r in refusals)
        raise DispatchError(f"prefill with kernel='wgmma' cannot run:{why}{missing}\nFix: pass kernel='auto' (the "
                            f"sm_90a kernel where it can run, else the warp-level one) or kernel='mma_sp'")
    return "wgmma"


@dataclass(frozen=True)
class Source:
    """Where the warp-level prefill kernel reads K or V (see templates/prefill.cu.j2): a block table over
    dense and 2:4 pools (no table: the identity over a flat tensor), and dense tail rows."""
    table: torch.Tensor | None = None       # [B, Hkv, max_blocks] int32
    block: int = 32
    dense: torch.Tensor | None = None       # [B, Hkv, n_dense, block, D]
    vals: torch.Tensor | None = None
    meta: torch.Tensor | None = None
    n_sparse: int = 0
    tail: torch.Tensor | None = None        # [B, Hkv, rows, D], last dim contiguous
    tail_start: torch.Tensor | None = None  # [B] int32: token of tail row 0 (None: 0)


def prefill_outputs(q: torch.Tensor, alloc):
    """out [B, Hq, Lq, D] in q's dtype and lse [B, Hq, Lq] fp32 of every prefill op (alloc: base.alloc or fake)."""
    B, Hq, Lq, D = q.shape
    return alloc((B, Hq, Lq, D), q.dtype, q.device), alloc((B, Hq, Lq), torch.float32, q.device)


def prefill(lib, q: torch.Tensor, k, v: PackedKV, seqlens=None, *, qlens=None, scale: float | None = None,
            kernel: str = "auto"):
    """Causal attention of a chunk of queries ``q [B, Hq, Lq, D]`` over 2:4 V and K that is
    2:4 (a PackedKV: all-2:4) or dense (``[B, Hkv, L, D]``, or a dense e4m3 PackedKV: balanced). e4m3 K and
    V are read in q's dtype (:func:`as_model_dtype`): the 16-bit kernels run on the values the cache holds.

    Sequence b has ``seqlens[b]`` keys and ``qlens[b]`` queries (default: Lq; rows past it,
    right padding, get zeros and lse -inf), its last ``qlens[b]`` positions (bottom-right
    causal alignment): a chunk at offset o attends to all tokens before it and causally to
    itself. ``kernel``: see :func:`choose_kernel` (the sm_90a kernels take whole prompts: no
    seqlens or qlens, as many queries as keys). Returns (out ``[B, Hq, Lq, D]``, lse ``[B, Hq, Lq]``
    fp32, natural log).
    """
    v = checks.check_packed(v, "v", "v")
    if isinstance(k, PackedKV):
        k = checks.check_packed(k, "k", "k")
    if v.storage != "model" or (isinstance(k, PackedKV) and k.storage != "model"):
        checks.check_cuda(q, "q")
        checks.check_dtype(q, "q")
        v = as_model_dtype(lib, v, q.dtype)  # first: a dense e4m3 V is refused before anything runs
        k = as_model_dtype(lib, k, q.dtype)
    B, Hkv = v.values.shape[:2]
    if isinstance(k, PackedKV):
        if tuple(k.values.shape[:2]) != (B, Hkv) or k.capacity != v.capacity or k.values.dtype != v.values.dtype:
            fail("k, v", "K and V do not match each other", "compress K and V of the same cache")
        tier, length, D = ("sparse24", "sparse24"), min(k.length, v.length), k.head_dim
        ksrc = Source(vals=k.values, meta=k.meta, n_sparse=k.capacity // 32)
    else:
        checks.check_cuda(k, "k")
        checks.check_dtype(k, "k")
        if k.dim() != 4 or tuple(k.shape[:2]) != (B, Hkv) or k.shape[3] != v.head_dim or k.dtype != v.values.dtype:
            fail("k", f"dense K of shape {tuple(k.shape)} and dtype {k.dtype} does not match V "
                 f"({B} sequences, {Hkv} KV heads, head_dim {v.head_dim}, {v.values.dtype})",
                 "pass K as [batch, kv_heads, tokens, head_dim] of V's dtype, or lib.compress_k(k)")
        tier, length, D = ("dense", "sparse24"), min(k.shape[2], v.length), v.head_dim
        ksrc = Source(tail=k)
    checks.check_queries(q, B, Hkv, D, v.values.dtype)
    checks.check_same_device(q, "keep Q, K and V on one GPU", k=k.values if isinstance(k, PackedKV) else k,
                             v=v.values)
    refusals = [r for r, no in (("seqlens given (the sm_90a kernels take whole prompts)", seqlens is not None),
                                ("qlens given (the sm_90a kernels take whole prompts)", qlens is not None),
                                (f"{q.shape[2]} queries over {length} keys: a chunk, not a whole prompt",
                                 q.shape[2] != length)) if no]
    family = choose_kernel(lib, kernel, refusals, head_dim=D, dtype=DTYPES[q.dtype], cc=base.device_cc(q.device),
                           group=q.shape[1] // Hkv, tier=tier)
    if family == "wgmma":
        if tier[0] == "dense":  # the prompt's rows only (past them the tensor map reads zeros)
            return torch.ops.hierasparse.prefill_wgmma_balanced(lib.key, q, k[:, :, :length], v.values, v.meta,
                                                         v.capacity, base.softmax_scale(scale, D))
        return torch.ops.hierasparse.prefill_wgmma(lib.key, q, k.values, k.meta, v.values, v.meta, k.capacity,
                                                  base.softmax_scale(scale, D))
    vsrc = Source(vals=v.values, meta=v.meta, n_sparse=v.capacity // 32)
    fix = "pass torch.tensor(lengths, dtype=torch.int32, device=q.device)"
    seqlens = checks.check_lengths(seqlens, "seqlens", B, q.device, fix)
    if seqlens is None:
        seqlens = torch.full((B,), length, dtype=torch.int32, device=q.device)
    return prefill_mma_sp(lib, q, tier, None, ksrc, vsrc, seqlens,
                          checks.check_lengths(qlens, "qlens", B, q.device, fix), length,
                          base.softmax_scale(scale, D))


def as_model_dtype(lib, t, dtype):
    """What the 16-bit prefill kernels read of an e4m3 PackedKV (others pass through): 2:4 e4m3 becomes 2:4 in
    ``dtype`` with the same metadata (packing.widen8: each kept value times its token's scale, rounded once; one
    pass of the library's kernel), dense e4m3 K becomes dense rows ``[B, H, length, D]`` (the balanced kernels).
    Transient: the 16-bit bytes of those tensors, made in O(L) against prefill's O(L^2)."""
    if not isinstance(t, PackedKV) or t.storage == "model":
        return t
    if t.sparse:
        return PackedKV(widen8(lib, t.values, t.meta, t.scales, t.kind, dtype), t.meta, t.kind, t.length)
    if t.kind == "k":
        return format_fp8.unpack_k_dense(t.values, t.scales, dtype)[:, :, :t.length]
    fail("v", "dense e4m3 V has no prefill kernel (prefill reads 2:4 V)",
         "compress V with sparse=True (2:4 e4m3), or attend over format_fp8.unpack_v_dense(v.values, v.scales, "
         "dtype) with a dense attention")


def _wgmma_variant(lib, q: torch.Tensor, Hkv: int, tier: tuple[str, str]):
    B, Hq, L, D = q.shape
    return lib.select("prefill", family="wgmma", head_dim=D, dtype=DTYPES[q.dtype], cc=base.device_cc(q.device),
                      group=Hq // Hkv, tier=tier)


@torch.library.custom_op("hierasparse::prefill_wgmma", mutates_args=())
def _prefill_wgmma_op(lib_key: str, q: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                      v_vals: torch.Tensor, v_meta: torch.Tensor, capacity: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sm_90a prefill of a whole prompt over all-2:4 K and V."""
    lib = base.library(lib_key)
    B, Hq, L, D = q.shape
    Hkv = k_vals.shape[1]
    variant = _wgmma_variant(lib, q, Hkv, ("sparse24", "sparse24"))
    q = checks.rows16_strided(q)
    for t, name in ((k_vals, "k.values"), (k_meta, "k.meta"), (v_vals, "v.values"), (v_meta, "v.meta")):
        checks.check_aligned(t, name, 16)
    out, lse = prefill_outputs(q, base.alloc)
    base.launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3], k_vals.data_ptr(), k_meta.data_ptr(),
                v_vals.data_ptr(), v_meta.data_ptr(), capacity, B, Hq, Hkv, L, scale, out.data_ptr(), lse.data_ptr())
    return out, lse


@_prefill_wgmma_op.register_fake
def _(lib_key, q, k_vals, k_meta, v_vals, v_meta, capacity, scale):
    return prefill_outputs(q, base.fake_alloc(q))


@torch.library.custom_op("hierasparse::prefill_wgmma_balanced", mutates_args=())
def _prefill_wgmma_balanced_op(lib_key: str, q: torch.Tensor, k: torch.Tensor, v_vals: torch.Tensor,
                               v_meta: torch.Tensor, capacity: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sm_90a balanced prefill: dense K rows ([B, Hkv, >= Lq, D], read through a TMA tensor map) and 2:4 V."""
    lib = base.library(lib_key)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    variant = _wgmma_variant(lib, q, Hkv, ("dense", "sparse24"))
    q, k = checks.rows16_strided(q), checks.rows16_strided(k)
    for t, name in ((v_vals, "v.values"), (v_meta, "v.meta")):
        checks.check_aligned(t, name, 16)
    out, lse = prefill_outputs(q, base.alloc)
    try:
        base.launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3],
                    k.shape[2], v_vals.data_ptr(), v_meta.data_ptr(), capacity, B, Hq, Hkv, L, scale,
                    out.data_ptr(), lse.data_ptr())
    except CudaError as e:
        if e.code != _CUDA_ERROR_NOT_SUPPORTED:
            raise
        raise CudaError(f"{e}: the CUDA driver offers no cuTensorMapEncodeTiled (TMA tensor maps, CUDA 12 drivers "
                        f"and newer), which the sm_90a balanced kernel needs. Fix: update the driver, or pass "
                        f"seqlens (or kernel='mma_sp') to run the warp-level balanced kernel", e.code) from None
    return out, lse


@_prefill_wgmma_balanced_op.register_fake
def _(lib_key, q, k, v_vals, v_meta, capacity, scale):
    return prefill_outputs(q, base.fake_alloc(q))


def prefill_mma_sp(lib, q, tier, block_size, k: Source, v: Source, seqlens, qlens, max_len: int, scale: float):
    """The warp-level prefill kernel over two sources (flat tensors, or the cache's block tables)."""
    return torch.ops.hierasparse.prefill(
        lib.key, q, tier[0], tier[1], block_size or 0,
        k.table, k.block, k.dense, k.vals, k.meta, k.n_sparse, k.tail, k.tail_start,
        v.table, v.block, v.dense, v.vals, v.meta, v.n_sparse, v.tail, v.tail_start,
        seqlens, qlens, max_len, scale)


def _source_args(table, block, dense, vals, meta, n_sparse, tail, tail_start) -> list:
    ptr = base.ptr
    return [ptr(table), 0 if table is None else table.shape[2], block,
            ptr(dense), 0 if dense is None else dense.shape[2], ptr(vals), ptr(meta), n_sparse,
            ptr(tail), *(tail.stride()[:3] if tail is not None else (0, 0, 0)), ptr(tail_start)]


@torch.library.custom_op("hierasparse::prefill", mutates_args=())
def _prefill_op(lib_key: str, q: torch.Tensor, k_tier: str, v_tier: str, block_size: int,
                k_table: torch.Tensor | None, k_block: int, k_dense: torch.Tensor | None, k_vals: torch.Tensor | None,
                k_meta: torch.Tensor | None, k_n_sparse: int, k_tail: torch.Tensor | None,
                k_tail_start: torch.Tensor | None,
                v_table: torch.Tensor | None, v_block: int, v_dense: torch.Tensor | None, v_vals: torch.Tensor | None,
                v_meta: torch.Tensor | None, v_n_sparse: int, v_tail: torch.Tensor | None,
                v_tail_start: torch.Tensor | None,
                seqlens: torch.Tensor, qlens: torch.Tensor | None, max_len: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = base.library(lib_key)
    B, Hq, Lq, D = q.shape
    Hkv = next(t for t in (k_table, k_vals, k_tail) if t is not None).shape[1]
    variant = lib.select("prefill", family="mma_sp", head_dim=D, dtype=DTYPES[q.dtype], cc=base.device_cc(q.device),
                         group=Hq // Hkv, tier=(k_tier, v_tier), block_size=block_size or None)
    checks.check_aligned(q, "q", 4)
    # tails are caller tensors: copy them once if their rows are not 16-byte aligned
    k_tail = None if k_tail is None else checks.rows16(k_tail)
    v_tail = None if v_tail is None else checks.rows16(v_tail)
    for t, name in ((k_vals, "k.values"), (k_meta, "k.meta"), (v_vals, "v.values"), (v_meta, "v.meta"),
                    (k_dense, "k dense pool"), (v_dense, "v dense pool")):
        if t is not None:
            checks.check_aligned(t, name, 16)
    out, lse = prefill_outputs(q, base.alloc)
    base.launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3],
                *_source_args(k_table, k_block, k_dense, k_vals, k_meta, k_n_sparse, k_tail, k_tail_start),
                *_source_args(v_table, v_block, v_dense, v_vals, v_meta, v_n_sparse, v_tail, v_tail_start),
                seqlens.data_ptr(), base.ptr(qlens), max_len, B, Hq, Hkv, Lq, scale,
                out.data_ptr(), *out.stride()[:3], lse.data_ptr())
    return out, lse


@_prefill_op.register_fake
def _(lib_key, q, k_tier, v_tier, block_size, k_table, k_block, k_dense, k_vals, k_meta, k_n_sparse, k_tail,
      k_tail_start, v_table, v_block, v_dense, v_vals, v_meta, v_n_sparse, v_tail, v_tail_start, seqlens, qlens,
      max_len, scale):
    return prefill_outputs(q, base.fake_alloc(q))
