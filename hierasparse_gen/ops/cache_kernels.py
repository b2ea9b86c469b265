"""The kernels over a HieraCache's block tables ("table": per block, dense or 2:4, K and V apart):
scoring, selecting and filling blocks at prefill, the decode-step append, decode attention
(``hierasparse::decode_table``) and prefill (the warp-level kernel or, on Hopper, the sm_90a
table kernel ``hierasparse::prefill_wgmma_table``). :class:`~hierasparse_gen.cache.HieraCache`
checks the arguments and calls these."""

from __future__ import annotations

import torch

from ..variants import COMPRESS_E4M3_ABI
from . import base, checks
from .base import DTYPES
from .checks import fail
from .decoding import decode_outputs
from .packing import compress_variant
from .prefilling import Source, choose_kernel, prefill_mma_sp, prefill_outputs

#: the tier pair of the cache's block tables, as variants and the manifest name it
TABLE = ("mixed", "mixed")


def check_e4m3_build(lib, head_dim: int, dtype: torch.dtype, k_storage: str, v_storage: str) -> None:
    """A cache with e4m3 tensors needs the library's e4m3 packers and its e4m3 block-table decode: refuse one that
    lacks them before anything is allocated."""
    if lib is None:
        return
    name = DTYPES.get(dtype, str(dtype).replace("torch.", ""))
    tier = f"{{k: mixed, v: mixed, k_storage: {k_storage}, v_storage: {v_storage}}}"
    compress = [v for v in lib.variants if v.kind == "compress" and v.head_dim == head_dim and v.dtype == name]
    decode = [v for v in lib.variants if v.kind == "decode" and v.head_dim == head_dim and v.dtype == name and
              v.tier == (*TABLE, k_storage, v_storage)]
    if not compress or any(v.abi != COMPRESS_E4M3_ABI for v in compress) or not decode:
        fail("HieraCache", f"key_storage {k_storage!r} and value_storage {v_storage!r} need the e4m3 packers and an "
             f"e4m3 block-table decode kernel for head_dim {head_dim}, {name}, and library "
             f"{lib.spec_name!r} lacks {'the decode kernel' if not decode else 'the e4m3 packers'}",
             f"add the tier {tier} to the spec (docs/specs.md), rebuild, and load that library")


def score_blocks(lib, x: torch.Tensor, kind: str, block_size: int) -> torch.Tensor:
    """2:4 prune loss of every whole block of ``x [B, H, L, D]``: float32 ``[B, H, L // block]``."""
    checks.check_cuda(x, kind)
    checks.check_dtype(x, kind)
    x = checks.rows16(x)
    B, H, L, D = x.shape
    loss = base.alloc((B, H, L // block_size), torch.float32, x.device)
    if L >= block_size:
        base.launch(lib, f"{compress_variant(lib, x).symbol}_score_{kind}", x.device, x.data_ptr(), x.stride(0),
                    x.stride(1), x.stride(2), B, H, L, block_size, loss.data_ptr())
    return loss


def token_mass(lib, q_obs: torch.Tensor, k: torch.Tensor, scale: float | None,
               lse: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mass per key ``[B, Hkv, L]`` (float32) of each sequence's last W queries ``q_obs [B, Hq, W,
    D]`` over its keys ``k [B, Hkv, L, D]``, causal (query i at position L - W + i), summed over the W queries and
    each KV head's group: selection.token_mass of every sequence, on the tensor cores (templates/cache/mass.cuh,
    float32 sums in a fixed order: the same bits every call). ``lse [B, Hq, W]`` (float32): those queries' natural
    log-sum-exp over the same keys and scale, as a causal attention over the prompt returns it; given, the kernel
    skips the pass that computes it."""
    B, Hq, W, D = q_obs.shape
    Hkv, L = k.shape[1], k.shape[2]
    if q_obs.dtype != k.dtype or k.shape[0] != B or Hq % Hkv or not 1 <= W <= L or q_obs.shape[3] != k.shape[3]:
        fail("token_mass", f"q_obs {tuple(q_obs.shape)} {q_obs.dtype} does not fit k {tuple(k.shape)} {k.dtype}",
             "pass each sequence's last W <= L queries [B, Hkv * group, W, D] in K's dtype")
    checks.check_cuda(k, "k")
    if lse is not None:
        if lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq, W) or lse.device != k.device:
            fail("token_mass", f"lse {tuple(lse.shape)} {lse.dtype} on {lse.device} does not fit q_obs "
                 f"{tuple(q_obs.shape)}", f"pass the queries' log-sum-exp as float32 [{B}, {Hq}, {W}] on {k.device}")
    q_obs, k = checks.rows16(q_obs), checks.rows16(k)
    rows, ranges = Hq // Hkv * W, -(-L // 64)  # (a bound: the kernel's ranges are 128 or 256 keys)
    workspace = torch.empty(0 if lse is not None else B * Hkv * rows * (ranges * 8 + 4), dtype=torch.uint8,
                            device=k.device)
    mass = base.alloc((B, Hkv, L), torch.float32, k.device)
    lse_args = (None, 0, 0, 0) if lse is None else (lse.data_ptr(), *lse.stride())
    base.launch(lib, f"{compress_variant(lib, k).symbol}_token_mass", k.device, q_obs.data_ptr(), *q_obs.stride()[:3], k.data_ptr(),
                *k.stride()[:3], B, Hkv, Hq // Hkv, W, L, base.softmax_scale(scale, D), *lse_args,
                workspace.data_ptr() if workspace.numel() else None, workspace.numel(), mass.data_ptr())
    return mass


def mass_stats(lib, x: torch.Tensor, tokens: torch.Tensor, W: int, block: int, *, seen: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """selection.mass_stats of the masses ``tokens [B, H, n]`` (float32, contiguous, as token_mass returns them) in
    one launch: block sums ``[B, H, n // block]``, and where given, written into ``seen [B, H, >= n // block]`` (the
    mass per query that sees each block) and ``weights [B, H, >= n]`` (V's token weights), each with unit strides
    but along its last dimension. ``x``: the keys (they name the variant). Returns the three (None for one not
    given)."""
    checks.check_cuda(tokens, "tokens")
    B, H, n = tokens.shape
    if tokens.dtype != torch.float32 or not tokens.is_contiguous() or not 1 <= W or not 32 <= block <= 2048 or \
            block % 32:
        fail("mass_stats", f"tokens {tuple(tokens.shape)} {tokens.dtype}, window {W}, block {block}",
             "pass token_mass's output (contiguous float32), a window of at least 1 and a block a multiple of 32 "
             "up to 2048")
    for name, t, size in (("seen", seen, n // block), ("weights", weights, n)):
        if t is not None and (t.dtype != torch.float32 or t.dim() != 3 or tuple(t.shape[:2]) != (B, H) or
                              t.shape[2] < size or t.stride(2) != 1 or t.stride(0) != H * t.stride(1) or
                              t.device != tokens.device):
            fail("mass_stats", f"{name} {tuple(t.shape)} {t.dtype} with strides {t.stride()}",
                 f"pass float32 [{B}, {H}, >= {size}] rows of one stride on {tokens.device}")
    sums = base.alloc((B, H, n // block), torch.float32, tokens.device)
    base.launch(lib, f"{compress_variant(lib, x).symbol}_mass_stats", tokens.device, tokens.data_ptr(), B * H, n, W,
                block, sums.data_ptr(), *((None, 0) if seen is None else (seen.data_ptr(), seen.stride(1))),
                *((None, 0) if weights is None else (weights.data_ptr(), weights.stride(1))))
    return sums, seen, weights


def channel_weights(lib, q_obs: torch.Tensor, heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """selection.channel_weights on the GPU: K's channel weights E|q_c| ``[B, Hkv, D]`` (float32) over each sequence's
    window queries ``q_obs [B, Hq, W, D]`` (a view of the prompt's rows; channel stride 1) of each KV head's group,
    into ``out`` when given (contiguous)."""
    checks.check_cuda(q_obs, "q_obs")
    B, Hq, W, D = q_obs.shape
    if Hq % heads or q_obs.stride(3) != 1 or q_obs.dtype not in (torch.float16, torch.bfloat16):
        fail("channel_weights", f"q_obs {tuple(q_obs.shape)} {q_obs.dtype} with strides {q_obs.stride()}",
             f"pass the window's queries [B, a multiple of {heads} heads, W, D] in fp16 or bf16, channel stride 1")
    if out is None:
        out = base.alloc((B, heads, D), torch.float32, q_obs.device)
    elif tuple(out.shape) != (B, heads, D) or out.dtype != torch.float32 or not out.is_contiguous() or \
            out.device != q_obs.device:
        fail("channel_weights", f"out {tuple(out.shape)} {out.dtype}", f"pass a contiguous float32 [{B}, {heads}, {D}]")
    base.launch(lib, f"{compress_variant(lib, q_obs).symbol}_channel_weights", q_obs.device, q_obs.data_ptr(),
                *q_obs.stride()[:3], B, heads, Hq // heads, W, out.data_ptr())
    return out


# The select kernel keeps a row's eligible blocks' keys in shared memory (templates/cache/select.cuh): 4 bytes a
# block beside at most 2 KB of its own, within the 48 KB a launch gets without opting in.
SELECT_MAX_ELIGIBLE = (48 * 1024 - 2048) // 4


def select_blocks(lib, x: torch.Tensor, loss: torch.Tensor | None, first: int, n_elig: int, n_sparse: int,
                  blocks: int, table: torch.Tensor, n_sparse2: int = 0, table2: torch.Tensor | None = None) -> None:
    """Per (batch, head) of ``table [B, H, max_blocks]``: the ``n_sparse`` eligible blocks of least
    loss become 2:4, the rest dense, sink and window after them (see select_kernel); and of ``table2`` (same shape)
    by the same losses with ``n_sparse2`` (one launch for K and V when one score chooses both)."""
    rows = table.shape[0] * table.shape[1]
    if n_elig > SELECT_MAX_ELIGIBLE:
        fail("select_blocks", f"{n_elig} eligible blocks, more than the {SELECT_MAX_ELIGIBLE} one selection takes",
             "select over fewer blocks (a shorter prompt or larger blocks)")
    if table2 is not None and (table2.shape != table.shape or not table2.is_contiguous() or
                               table2.device != table.device):
        fail("select_blocks", f"table2 {tuple(table2.shape)} on {table2.device}",
             f"pass a contiguous table of {tuple(table.shape)} on {table.device}")
    base.launch(lib, f"{compress_variant(lib, x).symbol}_select", table.device,
                None if loss is None else loss.data_ptr(), rows, first + n_elig if loss is None else loss.shape[2],
                first, n_elig, n_sparse, blocks, table.data_ptr(), table.shape[2], n_sparse2,
                None if table2 is None else table2.data_ptr())


def fill_blocks(lib, x: torch.Tensor, kind: str, table: torch.Tensor, block: int, dense: torch.Tensor,
                vals: torch.Tensor, meta: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Write the blocks of ``x [B, H, L, D]`` into a cache's pools where ``table [B, H, max_blocks]``
    says: dense slot (copied) or 2:4 slot (compressed; K by |k| * ``weight [B, H, D]``, V by |v| * ``weight
    [B, H, ceil(L / block) * block]`` (per token) when given). Runs on the current stream."""
    B, H, L, D = x.shape
    x = checks.rows16(x)
    for t in (table, dense, vals, meta):
        if not t.is_contiguous():
            fail("fill_blocks", "the table and pools must be contiguous", "pass the cache's own tensors")
    want = (B, H, D) if kind == "k" else (B, H, -(-L // block) * block)
    if weight is not None and (weight.dtype != torch.float32 or not weight.is_contiguous() or
                               tuple(weight.shape) != want or weight.device != x.device):
        fail("fill_blocks", f"weight {tuple(weight.shape)} {weight.dtype} on {weight.device}",
             f"pass contiguous float32 {list(want)} on {x.device} for {kind.upper()}")
    base.launch(lib, f"{compress_variant(lib, x).symbol}_fill_{kind}", x.device, x.data_ptr(), x.stride(0),
                x.stride(1), x.stride(2), B, H, L, table.data_ptr(), table.shape[2], block, dense.data_ptr(),
                dense.shape[2], vals.data_ptr(), meta.data_ptr(), vals.shape[2], base.ptr(weight))


def fill_blocks8(lib, x: torch.Tensor, kind: str, t, block: int, table: torch.Tensor, rows: slice,
                 weight: torch.Tensor | None) -> None:
    """:func:`fill_blocks` into an e4m3 tensor ``t`` of a HieraCache (its ``rows`` of sequences): table entries
    ``>= DENSE8`` pack into its e4m3 dense pool, ``< 0`` into its e4m3 2:4 pool (the 2:4 choice as the model-dtype
    one, weighted by ``weight`` when given), the rest are copied to its model-dtype dense pool."""
    B, H, L, D = x.shape
    x = checks.rows16(x)
    variant = compress_variant(lib, x)
    if variant.abi != COMPRESS_E4M3_ABI:
        fail("fill_blocks8", f"the library's {variant.name} has no e4m3 packers", "build a spec with an e4m3 tier")
    pools = (t.dense[rows], t.sparse_vals[rows], t.sparse_meta[rows], t.dense8[rows], t.dense8_scales[rows],
             t.sparse_scales[rows])
    if not all(p.is_contiguous() for p in (table, *pools)):
        fail("fill_blocks8", "the table and pools must be contiguous", "pass the cache's own tensors")
    base.launch(lib, f"{variant.symbol}_fill_{kind}8", x.device, x.data_ptr(), x.stride(0), x.stride(1), x.stride(2),
                B, H, L, table.data_ptr(), table.shape[2], block, pools[0].data_ptr(), pools[0].shape[2],
                pools[1].data_ptr(), pools[2].data_ptr(), pools[1].shape[2], pools[3].data_ptr(),
                pools[4].data_ptr(), pools[5].data_ptr(), pools[3].shape[2], base.ptr(weight))


# --- decode step: append -------------------------------------------------------------------

def append_cache(lib, cache, k: torch.Tensor, v: torch.Tensor) -> None:
    """One decode step into a HieraCache (its append checks the arguments): the append kernel
    pair, through a custom op so that torch.compile keeps it in the graph."""
    kt, vt = cache.k, cache.v
    if kt.e4m3 or vt.e4m3:
        base.eager_or_op(_cache_append8_impl, torch.ops.hierasparse.cache_append8)(
            lib.key, k, v, cache.seqlens, cache.ctrl, kt.table, kt.dense, kt.sparse_vals, kt.sparse_meta,
            vt.table, vt.dense, vt.sparse_vals, vt.sparse_meta, *_pools8(kt), *_pools8(vt), cache.block,
            cache.sink_blocks, cache.window_blocks, cache.max_seq_len, kt.ratio, vt.ratio, cache.key_weight,
            cache.value_weight, cache.block_mass)
        return
    base.eager_or_op(_cache_append_impl, torch.ops.hierasparse.cache_append)(
        lib.key, k, v, cache.seqlens, cache.ctrl, kt.table, kt.dense, kt.sparse_vals, kt.sparse_meta,
        vt.table, vt.dense, vt.sparse_vals, vt.sparse_meta, cache.block, cache.sink_blocks, cache.window_blocks,
        cache.max_seq_len, kt.ratio, vt.ratio, cache.key_weight, cache.value_weight, cache.block_mass)


def _cache_append_impl(lib_key: str, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, ctrl: torch.Tensor,
                       k_table: torch.Tensor, k_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                       v_table: torch.Tensor, v_dense: torch.Tensor, v_vals: torch.Tensor, v_meta: torch.Tensor,
                       block: int, sink_blocks: int, window_blocks: int, max_len: int,
                       k_ratio: float, v_ratio: float, k_weight: torch.Tensor | None, v_weight: torch.Tensor,
                       block_mass: torch.Tensor) -> None:
    _launch_append("_append", (), lib_key, k, v, seqlens, ctrl, k_table, k_dense, k_vals, k_meta, v_table, v_dense,
                   v_vals, v_meta, block, sink_blocks, window_blocks, max_len, k_ratio, v_ratio, k_weight, v_weight,
                   block_mass)


def _launch_append(suffix: str, pools8: tuple, lib_key, k, v, seqlens, ctrl, k_table, k_dense, k_vals, k_meta,
                   v_table, v_dense, v_vals, v_meta, block, sink_blocks, window_blocks, max_len, k_ratio, v_ratio,
                   k_weight, v_weight, block_mass) -> None:
    """The append entry point ``suffix`` ("_append", or "_append8" with the e4m3 pools' arguments ``pools8``)."""
    lib = base.library(lib_key)
    B, H, D = k.shape
    checks.check_aligned(k, "k", 16)
    checks.check_aligned(v, "v", 16)
    base.launch(lib, f"{compress_variant(lib, k).symbol}{suffix}", k.device, k.data_ptr(), k.stride(0), k.stride(1),
                v.data_ptr(), v.stride(0), v.stride(1), seqlens.data_ptr(), ctrl.data_ptr(), ctrl.shape[1], B, H,
                k_table.shape[2], block, sink_blocks, window_blocks, max_len,
                k_table.data_ptr(), k_dense.data_ptr(), k_vals.data_ptr(), k_meta.data_ptr(), k_dense.shape[2],
                k_vals.shape[2], k_ratio, v_table.data_ptr(), v_dense.data_ptr(), v_vals.data_ptr(),
                v_meta.data_ptr(), v_dense.shape[2], v_vals.shape[2], v_ratio, *pools8, base.ptr(k_weight),
                v_weight.data_ptr(), block_mass.data_ptr())


_cache_append_op = torch.library.custom_op(
    "hierasparse::cache_append", _cache_append_impl,
    mutates_args=("seqlens", "ctrl", "k_table", "k_dense", "k_vals", "k_meta", "v_table", "v_dense", "v_vals",
                  "v_meta"))


@_cache_append_op.register_fake
def _(lib_key, k, v, seqlens, ctrl, k_table, k_dense, k_vals, k_meta, v_table, v_dense, v_vals, v_meta,
      block, sink_blocks, window_blocks, max_len, k_ratio, v_ratio, k_weight, v_weight, block_mass):
    return None


def _pools8(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tensor's e4m3 pools (dense values, dense scales, 2:4 scales); empty tensors for a model-dtype one."""
    if t.e4m3:
        return t.dense8, t.dense8_scales, t.sparse_scales
    empty = t.table.new_empty(0, dtype=torch.uint8)
    return empty, empty, empty


def _ptrs8(dense8: torch.Tensor, dense8_scales: torch.Tensor, sparse_scales: torch.Tensor) -> tuple:
    """The C arguments of one tensor's e4m3 pools: three pointers and the dense slots (nulls and 0: none)."""
    if dense8.numel() == 0:
        return None, None, None, 0
    return dense8.data_ptr(), dense8_scales.data_ptr(), sparse_scales.data_ptr(), dense8.shape[2]


def _cache_append8_impl(lib_key: str, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, ctrl: torch.Tensor,
                        k_table: torch.Tensor, k_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                        v_table: torch.Tensor, v_dense: torch.Tensor, v_vals: torch.Tensor, v_meta: torch.Tensor,
                        k_dense8: torch.Tensor, k_dense8_scales: torch.Tensor, k_sparse_scales: torch.Tensor,
                        v_dense8: torch.Tensor, v_dense8_scales: torch.Tensor, v_sparse_scales: torch.Tensor,
                        block: int, sink_blocks: int, window_blocks: int, max_len: int,
                        k_ratio: float, v_ratio: float, k_weight: torch.Tensor | None, v_weight: torch.Tensor,
                        block_mass: torch.Tensor) -> None:
    _launch_append("_append8", (*_ptrs8(k_dense8, k_dense8_scales, k_sparse_scales),
                                *_ptrs8(v_dense8, v_dense8_scales, v_sparse_scales)),
                   lib_key, k, v, seqlens, ctrl, k_table, k_dense, k_vals, k_meta, v_table, v_dense, v_vals, v_meta,
                   block, sink_blocks, window_blocks, max_len, k_ratio, v_ratio, k_weight, v_weight, block_mass)


_cache_append8_op = torch.library.custom_op(
    "hierasparse::cache_append8", _cache_append8_impl,
    mutates_args=("seqlens", "ctrl", "k_table", "k_dense", "k_vals", "k_meta", "v_table", "v_dense", "v_vals",
                  "v_meta", "k_dense8", "k_dense8_scales", "k_sparse_scales", "v_dense8", "v_dense8_scales",
                  "v_sparse_scales"))


@_cache_append8_op.register_fake
def _(*args):
    return None


# --- decode attention ----------------------------------------------------------------------

def decode_cache(lib, q: torch.Tensor, cache, *, scale: float | None = None, num_splits: int | None = None):
    """Decode attention over a :class:`~hierasparse_gen.cache.HieraCache`'s block tables."""
    checks.check_cuda(q, "q")
    checks.check_dtype(q, "q")
    if q.dim() != 3 or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim or q.shape[1] % cache.heads:
        fail("q", f"shape {tuple(q.shape)} does not fit the cache (batch {cache.batch}, {cache.heads} KV heads, "
             f"head_dim {cache.head_dim})", f"pass [{cache.batch}, num_kv_heads * group, {cache.head_dim}]")
    if q.dtype != cache.dtype:
        fail("q", f"dtype {q.dtype} but the cache holds {cache.dtype}", "use one dtype for Q and the cache")
    if q.device != cache.device:
        fail("q", f"on {q.device} but the cache is on {cache.device}", "keep Q and the cache on one GPU")
    if q.stride(2) != 1 or q.stride(0) % 2 or q.stride(1) % 2:
        fail("q", f"strides {q.stride()} not supported", "pass q.contiguous()")
    checks.check_num_splits(num_splits)
    k, v = cache.k, cache.v
    if k.e4m3 or v.e4m3:
        return base.eager_or_op(_decode_table8_impl, torch.ops.hierasparse.decode_table8)(
            lib.key, q, k.table, v.table, k.dense, v.dense, k.sparse_vals, k.sparse_meta, v.sparse_vals,
            v.sparse_meta, *_pools8(k), *_pools8(v), cache.seqlens, cache.block, k.storage, v.storage,
            base.softmax_scale(scale, q.shape[2]), int(num_splits or 0))
    return base.eager_or_op(_decode_table_impl, torch.ops.hierasparse.decode_table)(
        lib.key, q, k.table, v.table, k.dense, v.dense, k.sparse_vals, k.sparse_meta, v.sparse_vals,
        v.sparse_meta, cache.seqlens, cache.block, base.softmax_scale(scale, q.shape[2]), int(num_splits or 0))


def _decode_table_impl(lib_key: str, q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                       k_dense: torch.Tensor, v_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                       v_vals: torch.Tensor, v_meta: torch.Tensor, seqlens: torch.Tensor, block_size: int,
                       scale: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_decode_table(TABLE, (), lib_key, q, k_table, v_table, k_dense, v_dense, k_vals, k_meta, v_vals,
                                v_meta, seqlens, block_size, scale, num_splits)


def _launch_decode_table(tier: tuple, pools8: tuple, lib_key, q, k_table, v_table, k_dense, v_dense, k_vals, k_meta,
                         v_vals, v_meta, seqlens, block_size, scale, num_splits):
    """The block-table decode variant of ``tier`` (with e4m3 tensors, their pools' arguments ``pools8``)."""
    lib = base.library(lib_key)
    B, Hq, D = q.shape
    Hkv, max_blocks = k_table.shape[1], k_table.shape[2]
    variant = lib.select("decode", head_dim=D, dtype=DTYPES[q.dtype], cc=base.device_cc(q.device),
                         group=Hq // Hkv, tier=tier, block_size=block_size)
    checks.check_aligned(q, "q", 4)
    num_splits, out, lse, o_part, lse_part = decode_outputs(variant, q, B * Hkv, max_blocks * block_size, num_splits)
    base.launch(lib, variant.symbol, q.device, q.data_ptr(), q.stride(0), q.stride(1), k_table.data_ptr(),
                v_table.data_ptr(), max_blocks, k_dense.data_ptr(), v_dense.data_ptr(), k_dense.shape[2],
                v_dense.shape[2], k_vals.data_ptr(), k_meta.data_ptr(), v_vals.data_ptr(), v_meta.data_ptr(),
                k_vals.shape[2], v_vals.shape[2], *pools8, seqlens.data_ptr(), B, Hkv, scale, num_splits,
                base.ptr(o_part), base.ptr(lse_part), out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr())
    return out, lse


_decode_table_op = torch.library.custom_op("hierasparse::decode_table", _decode_table_impl, mutates_args=())


@_decode_table_op.register_fake
def _(lib_key, q, k_table, v_table, k_dense, v_dense, k_vals, k_meta, v_vals, v_meta, seqlens, block_size,
      scale, num_splits):
    B, Hq, D = q.shape
    return q.new_empty((B, Hq, D)), q.new_empty((B, Hq), dtype=torch.float32)


def _decode_table8_impl(lib_key: str, q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                        k_dense: torch.Tensor, v_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                        v_vals: torch.Tensor, v_meta: torch.Tensor, k_dense8: torch.Tensor,
                        k_dense8_scales: torch.Tensor, k_sparse_scales: torch.Tensor, v_dense8: torch.Tensor,
                        v_dense8_scales: torch.Tensor, v_sparse_scales: torch.Tensor, seqlens: torch.Tensor,
                        block_size: int, k_storage: str, v_storage: str, scale: float,
                        num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_decode_table((*TABLE, k_storage, v_storage),
                                (*_ptrs8(k_dense8, k_dense8_scales, k_sparse_scales),
                                 *_ptrs8(v_dense8, v_dense8_scales, v_sparse_scales)),
                                lib_key, q, k_table, v_table, k_dense, v_dense, k_vals, k_meta, v_vals, v_meta,
                                seqlens, block_size, scale, num_splits)


_decode_table8_op = torch.library.custom_op("hierasparse::decode_table8", _decode_table8_impl, mutates_args=())


@_decode_table8_op.register_fake
def _(lib_key, q, *args):
    B, Hq, D = q.shape
    return q.new_empty((B, Hq, D)), q.new_empty((B, Hq), dtype=torch.float32)


# --- prefill -------------------------------------------------------------------------------

def table_prefill_family(lib, q: torch.Tensor, cache, kernel: str, *, k_tail: bool, v_tail: bool,
                         whole: bool) -> str:
    """The kernel family of a prefill over the cache (see choose_kernel): what the sm_90a table kernel
    does not take, and the call's shape."""
    refusals = [r for r, no in (
        ("dense V rows (attend_then_compress) are not read by the sm_90a table kernel", v_tail),
        ("dense K rows of a chunk (balanced, not a whole prompt into an empty cache)", k_tail and not whole)) if no]
    return choose_kernel(lib, kernel, refusals, head_dim=cache.head_dim, dtype=DTYPES[q.dtype],
                         cc=base.device_cc(q.device), group=q.shape[1] // cache.k.table.shape[1], tier=TABLE,
                         block_size=cache.block)


def prefill_cache(lib, q: torch.Tensor, cache, seqlens: torch.Tensor, qlens: torch.Tensor, *,
                  k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
                  tail_start: torch.Tensor | None = None, scale: float | None = None, kernel: str = "auto",
                  whole: bool = False):
    """Causal attention of a query chunk (sequence b: the last ``qlens[b]`` of its ``seqlens[b]``
    tokens) over a HieraCache's block tables; keys from ``tail_start[b]`` on come from the dense
    ``k_tail``/``v_tail`` rows instead, when given. ``whole`` (every sequence holds exactly the
    chunk's tokens: a prompt into an empty cache) lets the sm_90a table kernel skip the
    per-sequence lengths and take a dense ``k_tail`` (which then starts at token 0) as all of K.
    ``kernel``: see :func:`~hierasparse_gen.ops.prefilling.choose_kernel` (the sm_90a table kernel
    takes no V tail, and a K tail only for a whole prompt). Used by :meth:`HieraCache.prefill`,
    which checks the arguments."""
    ks, vs = cache.k, cache.v
    D = cache.head_dim
    family = table_prefill_family(lib, q, cache, kernel, k_tail=k_tail is not None, v_tail=v_tail is not None,
                                  whole=whole)
    if family == "wgmma":
        k_rows = None if k_tail is None else k_tail[:, :, :q.shape[2]]
        return torch.ops.hierasparse.prefill_wgmma_table(lib.key, q, ks.table, vs.table, ks.dense, ks.sparse_vals,
                                                        ks.sparse_meta, vs.dense, vs.sparse_vals, vs.sparse_meta,
                                                        k_rows, None if whole else seqlens,
                                                        None if whole else qlens, base.softmax_scale(scale, D))
    ksrc = Source(ks.table, cache.block, ks.dense, ks.sparse_vals, ks.sparse_meta, ks.sparse_vals.shape[2],
                  k_tail, tail_start if k_tail is not None else None)
    vsrc = Source(vs.table, cache.block, vs.dense, vs.sparse_vals, vs.sparse_meta, vs.sparse_vals.shape[2],
                  v_tail, tail_start if v_tail is not None else None)
    return prefill_mma_sp(lib, q, TABLE, cache.block, ksrc, vsrc, seqlens, qlens, cache.max_seq_len,
                          base.softmax_scale(scale, cache.head_dim))


@torch.library.custom_op("hierasparse::prefill_wgmma_table", mutates_args=())
def _prefill_wgmma_table_op(lib_key: str, q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                            k_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                            v_dense: torch.Tensor, v_vals: torch.Tensor, v_meta: torch.Tensor,
                            k_rows: torch.Tensor | None, seqlens: torch.Tensor | None, qlens: torch.Tensor | None,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = base.library(lib_key)
    B, Hq, L, D = q.shape
    Hkv = k_table.shape[1]
    variant = lib.select("prefill", family="wgmma", head_dim=D, dtype=DTYPES[q.dtype], cc=base.device_cc(q.device),
                         group=Hq // Hkv, tier=TABLE)
    q = checks.rows16_strided(q)
    k_rows = None if k_rows is None else checks.rows16_strided(k_rows)
    for t, name in ((k_dense, "k dense pool"), (k_vals, "k 2:4 pool"), (k_meta, "k metadata pool"),
                    (v_dense, "v dense pool"), (v_vals, "v 2:4 pool"), (v_meta, "v metadata pool")):
        checks.check_aligned(t, name, 16)
    out, lse = prefill_outputs(q, base.alloc)
    base.launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3], k_table.data_ptr(), v_table.data_ptr(),
                k_table.shape[2], k_dense.data_ptr(), k_dense.shape[2], k_vals.data_ptr(), k_meta.data_ptr(),
                k_vals.shape[2], v_dense.data_ptr(), v_dense.shape[2], v_vals.data_ptr(), v_meta.data_ptr(),
                v_vals.shape[2], base.ptr(k_rows), *(k_rows.stride()[:3] if k_rows is not None else (0, 0, 0)),
                base.ptr(seqlens), base.ptr(qlens), B, Hq, Hkv, L, scale, out.data_ptr(), lse.data_ptr())
    return out, lse


@_prefill_wgmma_table_op.register_fake
def _(lib_key, q, k_table, v_table, k_dense, k_vals, k_meta, v_dense, v_vals, v_meta, k_rows, seqlens, qlens, scale):
    return prefill_outputs(q, base.fake_alloc(q))
