"""Torch operations over a loaded library: input checks, dispatch and custom ops.

Each kernel entry point is wrapped as a ``torch.library.custom_op`` with a fake (meta)
implementation, so ``torch.compile`` can trace through it; it launches on the current CUDA
stream and allocates nothing on the host side, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .format import CHUNK, round_capacity
from .registry import CudaError
from .tiles import ctas_per_sm

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported
_LIBRARIES: dict = {}

#: When True, outputs are filled with NaN (values) / 0x7FFF (metadata) before each launch,
#: so an element a kernel fails to write cannot pass a test.
POISON = False


def register_library(lib) -> None:
    _LIBRARIES[lib.key] = lib


@dataclass(frozen=True)
class PackedKV:
    """One packed 2:4 tensor of the cache (K or V): values + metadata in the kernel layout."""
    values: torch.Tensor
    meta: torch.Tensor
    kind: str          # "k" or "v"
    length: int        # tokens compressed (the rest of the capacity holds zeros)

    @property
    def capacity(self) -> int:
        return self.meta.shape[2] * (1 if self.kind == "k" else 16)

    @property
    def head_dim(self) -> int:
        return self.values.shape[3] * (2 if self.kind == "k" else 1)

    def nbytes(self) -> int:
        return self.values.nbytes + self.meta.nbytes


def _alloc(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = 0x7FFF if dtype == torch.int16 else float("nan")
    return torch.full(shape, fill, dtype=dtype, device=device)


def _packed_shapes(kind: str, B: int, H: int, cap: int, D: int):
    if kind == "k":
        return (B, H, cap, D // 2), (B, H, cap, D // 16)
    return (B, H, cap // 2, D), (B, H, cap // 16, D)


# --- input checks -------------------------------------------------------------------------

def _fail(what: str, problem: str, fix: str):
    raise ValueError(f"{what}: {problem}. Fix: {fix}")


def _check_same_device(q: torch.Tensor, fix: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != q.device:
            _fail(name, f"on {t.device} but q is on {q.device}", fix)


def _check_cuda(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(what, f"expected a torch.Tensor, got {type(t).__name__}", "pass a CUDA tensor")
    if t.device.type != "cuda":
        _fail(what, f"tensor is on {t.device}", f"move it to the GPU ({what}.cuda())")


def _check_dtype(t, what: str) -> str:
    if t.dtype not in _DTYPES:
        _fail(what, f"dtype {t.dtype} is not supported", "use torch.float16 or torch.bfloat16")
    return _DTYPES[t.dtype]


def _check_aligned(t, what: str, nbytes: int) -> None:
    # inside the custom ops only: torch.compile cannot trace data_ptr()
    if t.data_ptr() % nbytes:
        _fail(what, f"data pointer is not {nbytes}-byte aligned",
              f"pass a tensor whose storage starts on a {nbytes}-byte boundary (.clone())")


_CC: dict[int, tuple[int, int]] = {}


def _rows16(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] whose rows start on 16-byte boundaries (the compression, scoring and fill
    kernels load 16 bytes at a time); other layouts are copied once (inside the ops only)."""
    if x.stride(3) != 1 or x.data_ptr() % 16 or any(st % 8 for st in x.stride()[:3]):
        return x.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    return x


def _check_pointers(q, k_vals, k_meta, v_vals, v_meta) -> None:
    """Q loads 4 bytes at a time, the packed K/V 16 (inside the custom ops only)."""
    _check_aligned(q, "q", 4)
    for t, name in ((k_vals, "k.values"), (k_meta, "k.meta"), (v_vals, "v.values"), (v_meta, "v.meta")):
        _check_aligned(t, name, 16)


def _launch(lib, symbol: str, device: torch.device, *args) -> None:
    """Call a C entry point (its last argument, the stream, is the current stream of ``device``)
    and raise a CudaError naming it when it fails."""
    with torch.cuda.device(device):
        code = lib.function(symbol)(*args, torch.cuda.current_stream(device).cuda_stream)
    lib.check(code, symbol)


def _device_cc(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CC:
        _CC[index] = torch.cuda.get_device_capability(index)
    return _CC[index]


_SM_COUNT: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def capture_graph(step):
    """Run ``step()`` once on a side stream (a real call, which also warms the allocator up),
    then capture a second call in a CUDA graph. Returns (graph, warm-up result, captured result);
    the captured result's tensors are rewritten by every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, warm, captured


# --- compression --------------------------------------------------------------------------

def compress(lib, x: torch.Tensor, kind: str, capacity: int | None = None) -> PackedKV:
    what = "k" if kind == "k" else "v"
    _check_cuda(x, what)
    dtype = _check_dtype(x, what)
    if x.dim() != 4:
        _fail(what, f"expected 4 dims [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}",
              "reshape to [batch, kv_heads, tokens, head_dim]")
    B, H, L, D = x.shape
    if B < 1 or H < 1:
        _fail(what, f"empty batch or head dimension in shape {tuple(x.shape)}", "pass at least one")
    if x.stride(3) != 1:
        _fail(what, f"head_dim must be contiguous (stride 1), got strides {x.stride()}",
              f"pass {what}.contiguous()")
    cap = round_capacity(L) if capacity is None else int(capacity)
    if cap % CHUNK or cap < L or cap < CHUNK:
        _fail("capacity", f"{cap} cannot hold {L} tokens in whole {CHUNK}-token chunks",
              f"use a multiple of {CHUNK} that is at least {max(L, CHUNK)} (e.g. {round_capacity(L)})")
    vals, meta = torch.ops.hierasparse.compress(lib.key, x, cap, kind)
    return PackedKV(vals, meta, kind, L)


# Dispatch happens inside the custom ops: it runs eagerly at launch time, so torch.compile
# sees only the shape checks above and an opaque op.

@torch.library.custom_op("hierasparse::compress", mutates_args=())
def _compress_op(lib_key: str, x: torch.Tensor, capacity: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[lib_key]
    B, H, L, D = x.shape
    variant = lib.select("compress", head_dim=D, dtype=_DTYPES[x.dtype], cc=_device_cc(x.device))
    symbol = f"{variant.symbol}_{kind}"
    x = _rows16(x)
    vshape, mshape = _packed_shapes(kind, B, H, capacity, D)
    vals = _alloc(vshape, x.dtype, x.device)
    meta = _alloc(mshape, torch.int16, x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        code = lib.function(symbol)(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), B, H, L,
                                    capacity, vals.data_ptr(), meta.data_ptr(), stream)
    lib.check(code, symbol)
    return vals, meta


@_compress_op.register_fake
def _(lib_key, x, capacity, kind):
    B, H, _, D = x.shape
    vshape, mshape = _packed_shapes(kind, B, H, capacity, D)
    return x.new_empty(vshape), x.new_empty(mshape, dtype=torch.int16)


# --- decode -------------------------------------------------------------------------------

@lru_cache(maxsize=4096)  # pure, and on every decode call's host path
def choose_splits(batch_heads: int, chunks: int, warps: int, sms: int, resident: int) -> int:
    """Splits of the sequence per (batch, kv head) for a memory-bound decode.

    Every SM should stream the same number of bytes, so the CTA count should be a multiple
    of the SM count (at most ``resident`` CTAs an SM at once). Among split counts whose
    balance is within 5 % of the best, take the smallest (fewer partials to merge); never
    give a warp less than two chunks on average.
    """
    most = max(1, min(256, chunks // (2 * warps)))
    slots = sms * max(1, resident)
    balance = []
    for s in range(1, most + 1):
        ctas = batch_heads * s
        rounds = math.ceil(ctas / sms)  # CTAs per SM, rounded up
        waves = math.ceil(ctas / slots)
        balance.append(ctas / (rounds * sms) / waves ** 0.25 if ctas >= 1 else 0.0)
    top = max(balance)
    return next(s for s, b in enumerate(balance, 1) if b >= 0.95 * top)


def _decode_outputs(lib, variant, q: torch.Tensor, batch_heads: int, tokens: int, num_splits: int):
    """Split count (0: automatic, from the variant's tiles and the GPU) and the decode outputs:
    (num_splits, out, lse, o_part, lse_part); the partials are None for a single split."""
    B, Hq, D = q.shape
    if num_splits == 0:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = choose_splits(batch_heads, tokens // variant.tiles.get("chunk_tokens", CHUNK),
                                   variant.tiles.get("warps", 4), _sm_count(index),
                                   ctas_per_sm(variant.arch, variant.smem_bytes, variant.threads))
    out = _alloc((B, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq), torch.float32, q.device)
    if num_splits == 1:
        return num_splits, out, lse, None, None
    return (num_splits, out, lse, _alloc((B, Hq, num_splits, D), torch.float32, q.device),
            _alloc((B, Hq, num_splits), torch.float32, q.device))


def _scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim) unless given (0.0 is a valid scale)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check_packed(t, kind: str, what: str) -> PackedKV:
    if not isinstance(t, PackedKV) or t.kind != kind:
        _fail(what, f"expected the PackedKV returned by compress_{kind}(), got {type(t).__name__}"
              + (f" of kind {t.kind!r}" if isinstance(t, PackedKV) else ""),
              f"pass lib.compress_{kind}({kind}_dense)")
    for name, x in (("values", t.values), ("meta", t.meta)):
        _check_cuda(x, f"{what}.{name}")
        if not x.is_contiguous():
            _fail(f"{what}.{name}", "packed tensors must be contiguous", "do not slice or transpose them")
    return t


def decode(lib, q, k: PackedKV, v: PackedKV, seqlens=None, *, scale: float | None = None,
           num_splits: int | None = None, check_seqlens: bool = True):
    _check_cuda(q, "q")
    dtype = _check_dtype(q, "q")
    if q.dim() != 3:
        _fail("q", f"expected 3 dims [batch, q_heads, head_dim], got shape {tuple(q.shape)}",
              "pass one query token per sequence as [batch, q_heads, head_dim]")
    k = _check_packed(k, "k", "k")
    v = _check_packed(v, "v", "v")
    B, Hq, D = q.shape
    Bk, Hkv = k.values.shape[:2]
    if (Bk, Hkv) != tuple(v.values.shape[:2]) or k.capacity != v.capacity or k.head_dim != v.head_dim:
        _fail("k, v", f"K (batch {Bk}, kv_heads {Hkv}, capacity {k.capacity}, head_dim {k.head_dim}) and "
              f"V (batch {v.values.shape[0]}, kv_heads {v.values.shape[1]}, capacity {v.capacity}, "
              f"head_dim {v.head_dim}) do not match", "compress K and V of the same cache")
    if Bk != B:
        _fail("q", f"batch {B} but the cache has batch {Bk}", "pass one query per cached sequence")
    if D != k.head_dim:
        _fail("q", f"head_dim {D} but the cache has head_dim {k.head_dim}", "use the same head_dim")
    if Hq % Hkv:
        _fail("q", f"{Hq} query heads are not a multiple of the {Hkv} KV heads",
              "pass num_kv_heads * group query heads")
    if k.values.dtype != q.dtype or v.values.dtype != q.dtype:
        _fail("q", f"dtype {q.dtype} but the cache holds {k.values.dtype}", "use one dtype for Q, K and V")
    if q.stride(2) != 1 or q.stride(0) % 2 or q.stride(1) % 2:
        _fail("q", f"strides {q.stride()} not supported (head_dim must be contiguous, other strides even)",
              "pass q.contiguous()")
    _check_same_device(q, "keep Q and the cache on one GPU", k=k.values, v=v.values)
    if seqlens is None:
        seqlens = torch.full((B,), min(k.length, v.length), dtype=torch.int32, device=q.device)
    else:
        _check_cuda(seqlens, "seqlens")
        if seqlens.dtype != torch.int32 or seqlens.shape != (B,):
            _fail("seqlens", f"expected int32 of shape ({B},), got {seqlens.dtype} {tuple(seqlens.shape)}",
                  "pass torch.tensor(lengths, dtype=torch.int32, device='cuda')")
        if seqlens.device != q.device:
            _fail("seqlens", f"on {seqlens.device} but q is on {q.device}", "move it to q's device")
        seqlens = seqlens.contiguous()
        capturing = torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
        if check_seqlens and not capturing:
            lo, hi = int(seqlens.min()), int(seqlens.max())
            if lo < 0 or hi > k.capacity:
                _fail("seqlens", f"values in [{lo}, {hi}] exceed the cache capacity {k.capacity}",
                      f"pass lengths between 0 and {k.capacity}")
    if num_splits is not None and num_splits < 1:
        _fail("num_splits", f"{num_splits} is not positive", "pass None (automatic) or a positive count")
    return torch.ops.hierasparse.decode(lib.key, q, k.values, k.meta, v.values, v.meta, seqlens,
                                        _scale(scale, D), int(num_splits or 0))


@torch.library.custom_op("hierasparse::decode", mutates_args=())
def _decode_op(lib_key: str, q: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
               v_vals: torch.Tensor, v_meta: torch.Tensor, seqlens: torch.Tensor, scale: float,
               num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[lib_key]
    B, Hq, D = q.shape
    Hkv, cap = k_vals.shape[1], k_vals.shape[2]
    variant = lib.select("decode", head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device),
                         group=Hq // Hkv, tier=("sparse24", "sparse24"))
    _check_pointers(q, k_vals, k_meta, v_vals, v_meta)
    num_splits, out, lse, o_part, lse_part = _decode_outputs(lib, variant, q, B * Hkv, cap, num_splits)
    _launch(lib, variant.symbol, q.device, q.data_ptr(), q.stride(0), q.stride(1), k_vals.data_ptr(),
            k_meta.data_ptr(), v_vals.data_ptr(), v_meta.data_ptr(), seqlens.data_ptr(), B, Hkv, cap, scale,
            num_splits, _ptr(o_part), _ptr(lse_part), out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr())
    return out, lse


@_decode_op.register_fake
def _(lib_key, q, k_vals, k_meta, v_vals, v_meta, seqlens, scale, num_splits):
    B, Hq, D = q.shape
    return q.new_empty((B, Hq, D)), q.new_empty((B, Hq), dtype=torch.float32)


# --- hierarchical cache -------------------------------------------------------------------

def _compress_variant(lib, x: torch.Tensor):
    return lib.select("compress", head_dim=x.shape[-1], dtype=_DTYPES[x.dtype], cc=_device_cc(x.device))


def score_blocks(lib, x: torch.Tensor, kind: str, block_size: int) -> torch.Tensor:
    """2:4 prune loss of every whole block of ``x [B, H, L, D]``: float32 ``[B, H, L // block]``."""
    _check_cuda(x, kind)
    _check_dtype(x, kind)
    x = _rows16(x)
    B, H, L, D = x.shape
    loss = _alloc((B, H, L // block_size), torch.float32, x.device)
    if L >= block_size:
        _launch(lib, f"{_compress_variant(lib, x).symbol}_score_{kind}", x.device, x.data_ptr(), x.stride(0),
                x.stride(1), x.stride(2), B, H, L, block_size, loss.data_ptr())
    return loss


def select_blocks(lib, x: torch.Tensor, loss: torch.Tensor | None, first: int, n_elig: int, n_sparse: int,
                  blocks: int, table: torch.Tensor) -> None:
    """Per (batch, head) of ``table [B, H, max_blocks]``: the ``n_sparse`` eligible blocks of least
    loss become 2:4, the rest dense, sink and window after them (see select_kernel)."""
    rows = table.shape[0] * table.shape[1]
    _launch(lib, f"{_compress_variant(lib, x).symbol}_select", table.device,
            None if loss is None else loss.data_ptr(), rows, first + n_elig if loss is None else loss.shape[2],
            first, n_elig, n_sparse, blocks, table.data_ptr(), table.shape[2])


def fill_blocks(lib, x: torch.Tensor, kind: str, table: torch.Tensor, block: int, dense: torch.Tensor,
                vals: torch.Tensor, meta: torch.Tensor) -> None:
    """Write the blocks of ``x [B, H, L, D]`` into a cache's pools where ``table [B, H, max_blocks]``
    says: dense slot (copied) or 2:4 slot (compressed). Runs on the current stream."""
    B, H, L, D = x.shape
    x = _rows16(x)
    for t in (table, dense, vals, meta):
        if not t.is_contiguous():
            raise ValueError("fill_blocks: table and pools must be contiguous")
    _launch(lib, f"{_compress_variant(lib, x).symbol}_fill_{kind}", x.device, x.data_ptr(), x.stride(0),
            x.stride(1), x.stride(2), B, H, L, table.data_ptr(), table.shape[2], block, dense.data_ptr(),
            dense.shape[2], vals.data_ptr(), meta.data_ptr(), vals.shape[2])


def _eager_or_op(impl, op):
    """The custom op under torch.compile; its implementation, called directly, otherwise: a
    decode step runs these once a layer, and the dispatcher's host time adds up (CUDA graph
    capture sees the same kernel launches either way)."""
    return op if torch.compiler.is_compiling() else impl


def append_cache(lib, cache, k: torch.Tensor, v: torch.Tensor) -> None:
    """One decode step into a HieraCache (its append checks the arguments): the append kernel
    pair, through a custom op so that torch.compile keeps it in the graph."""
    kt, vt = cache.k, cache.v
    _eager_or_op(_cache_append_impl, torch.ops.hierasparse.cache_append)(
        lib.key, k, v, cache.seqlens, cache.ctrl, kt.table, kt.dense, kt.sparse_vals, kt.sparse_meta,
        vt.table, vt.dense, vt.sparse_vals, vt.sparse_meta, cache.block, cache.sink_blocks, cache.window_blocks,
        cache.max_seq_len, kt.ratio, vt.ratio)


def _cache_append_impl(lib_key: str, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, ctrl: torch.Tensor,
                     k_table: torch.Tensor, k_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                     v_table: torch.Tensor, v_dense: torch.Tensor, v_vals: torch.Tensor, v_meta: torch.Tensor,
                     block: int, sink_blocks: int, window_blocks: int, max_len: int,
                     k_ratio: float, v_ratio: float) -> None:
    lib = _LIBRARIES[lib_key]
    B, H, D = k.shape
    _check_aligned(k, "k", 16)
    _check_aligned(v, "v", 16)
    variant = _compress_variant(lib, k)
    _launch(lib, f"{variant.symbol}_append", k.device, k.data_ptr(), k.stride(0), k.stride(1),
            v.data_ptr(), v.stride(0), v.stride(1), seqlens.data_ptr(), ctrl.data_ptr(), ctrl.shape[1], B, H,
            k_table.shape[2], block, sink_blocks, window_blocks, max_len,
            k_table.data_ptr(), k_dense.data_ptr(), k_vals.data_ptr(), k_meta.data_ptr(), k_dense.shape[2],
            k_vals.shape[2], k_ratio, v_table.data_ptr(), v_dense.data_ptr(), v_vals.data_ptr(), v_meta.data_ptr(),
            v_dense.shape[2], v_vals.shape[2], v_ratio)


_cache_append_op = torch.library.custom_op(
    "hierasparse::cache_append", _cache_append_impl,
    mutates_args=("seqlens", "ctrl", "k_table", "k_dense", "k_vals", "k_meta", "v_table", "v_dense", "v_vals",
                  "v_meta"))


@_cache_append_op.register_fake
def _(lib_key, k, v, seqlens, ctrl, k_table, k_dense, k_vals, k_meta, v_table, v_dense, v_vals, v_meta,
      block, sink_blocks, window_blocks, max_len, k_ratio, v_ratio):
    return None


def decode_cache(lib, q: torch.Tensor, cache, *, scale: float | None = None, num_splits: int | None = None):
    """Decode attention over a :class:`~hierasparse_gen.cache.HieraCache` (mixed-tier kernel)."""
    _check_cuda(q, "q")
    _check_dtype(q, "q")
    if q.dim() != 3 or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim or q.shape[1] % cache.heads:
        _fail("q", f"shape {tuple(q.shape)} does not fit the cache (batch {cache.batch}, {cache.heads} KV heads, "
              f"head_dim {cache.head_dim})", f"pass [{cache.batch}, num_kv_heads * group, {cache.head_dim}]")
    if q.dtype != cache.dtype:
        _fail("q", f"dtype {q.dtype} but the cache holds {cache.dtype}", "use one dtype for Q and the cache")
    if q.device != cache.device:
        _fail("q", f"on {q.device} but the cache is on {cache.device}", "keep Q and the cache on one GPU")
    if q.stride(2) != 1 or q.stride(0) % 2 or q.stride(1) % 2:
        _fail("q", f"strides {q.stride()} not supported", "pass q.contiguous()")
    if num_splits is not None and num_splits < 1:
        _fail("num_splits", f"{num_splits} is not positive", "pass None (automatic) or a positive count")
    k, v = cache.k, cache.v
    return _eager_or_op(_decode_mixed_impl, torch.ops.hierasparse.decode_mixed)(
        lib.key, q, k.table, v.table, k.dense, v.dense, k.sparse_vals, k.sparse_meta, v.sparse_vals,
        v.sparse_meta, cache.seqlens, cache.block, _scale(scale, q.shape[2]),
        int(num_splits or 0))


def _decode_mixed_impl(lib_key: str, q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                     k_dense: torch.Tensor, v_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                     v_vals: torch.Tensor, v_meta: torch.Tensor, seqlens: torch.Tensor, block_size: int,
                     scale: float, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[lib_key]
    B, Hq, D = q.shape
    Hkv, max_blocks = k_table.shape[1], k_table.shape[2]
    variant = lib.select("decode", head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device),
                         group=Hq // Hkv, tier=("mixed", "mixed"), block_size=block_size)
    _check_aligned(q, "q", 4)
    num_splits, out, lse, o_part, lse_part = _decode_outputs(lib, variant, q, B * Hkv, max_blocks * block_size,
                                                             num_splits)
    _launch(lib, variant.symbol, q.device, q.data_ptr(), q.stride(0), q.stride(1), k_table.data_ptr(),
            v_table.data_ptr(), max_blocks, k_dense.data_ptr(), v_dense.data_ptr(), k_dense.shape[2],
            v_dense.shape[2], k_vals.data_ptr(), k_meta.data_ptr(), v_vals.data_ptr(), v_meta.data_ptr(),
            k_vals.shape[2], v_vals.shape[2], seqlens.data_ptr(), B, Hkv, scale, num_splits, _ptr(o_part),
            _ptr(lse_part), out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr())
    return out, lse


_decode_mixed_op = torch.library.custom_op("hierasparse::decode_mixed", _decode_mixed_impl, mutates_args=())


@_decode_mixed_op.register_fake
def _(lib_key, q, k_table, v_table, k_dense, v_dense, k_vals, k_meta, v_vals, v_meta, seqlens, block_size,
      scale, num_splits):
    B, Hq, D = q.shape
    return q.new_empty((B, Hq, D)), q.new_empty((B, Hq), dtype=torch.float32)


# --- prefill ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Where the prefill kernel reads K or V (see templates/prefill.cu.j2): a block table over
    dense and 2:4 pools (no table: the identity over a flat tensor), and dense tail rows."""
    table: torch.Tensor | None = None       # [B, Hkv, max_blocks] int32
    block: int = 32
    dense: torch.Tensor | None = None       # [B, Hkv, n_dense, block, D]
    vals: torch.Tensor | None = None
    meta: torch.Tensor | None = None
    n_sparse: int = 0
    tail: torch.Tensor | None = None        # [B, Hkv, rows, D], last dim contiguous
    tail_start: torch.Tensor | None = None  # [B] int32: token of tail row 0 (None: 0)


def _check_queries(q: torch.Tensor, B: int, Hkv: int, D: int, dtype) -> None:
    _check_cuda(q, "q")
    _check_dtype(q, "q")
    if q.dim() != 4:
        _fail("q", f"expected 4 dims [batch, q_heads, queries, head_dim], got shape {tuple(q.shape)}",
              "pass the chunk's queries as [batch, q_heads, queries, head_dim]")
    if q.shape[0] != B or q.shape[3] != D or q.shape[1] % Hkv or q.shape[2] < 1:
        _fail("q", f"shape {tuple(q.shape)} does not fit the keys ({B} sequences, {Hkv} KV heads, head_dim {D})",
              f"pass [{B}, a multiple of {Hkv} heads, >= 1 queries, {D}]")
    if q.dtype != dtype:
        _fail("q", f"dtype {q.dtype} but the keys are {dtype}", "use one dtype for Q, K and V")
    if q.stride(3) != 1 or any(x % 2 for x in q.stride()[:3]):
        _fail("q", f"strides {q.stride()} not supported", "pass q.contiguous()")


def _check_lengths(x, what: str, B: int, device, fix: str) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or tuple(x.shape) != (B,) or x.device != device:
        _fail(what, f"expected an int32 tensor of shape ({B},) on {device}", fix)
    return x.contiguous()


def prefill(lib, q: torch.Tensor, k, v: PackedKV, seqlens=None, *, qlens=None, scale: float | None = None):
    """Causal attention of a chunk of queries ``q [B, Hq, Lq, D]`` over 2:4 V and K that is
    2:4 (a PackedKV: all-2:4) or dense (``[B, Hkv, L, D]``: the balanced kernel).

    Sequence b has ``seqlens[b]`` keys and ``qlens[b]`` queries (default: Lq; rows past it,
    right padding, get zeros and lse -inf), its last ``qlens[b]`` positions (bottom-right
    causal alignment): a chunk at offset o attends to all tokens before it and causally to
    itself. Returns (out ``[B, Hq, Lq, D]``, lse ``[B, Hq, Lq]`` fp32, natural log).
    """
    v = _check_packed(v, "v", "v")
    B, Hkv = v.values.shape[:2]
    if isinstance(k, PackedKV):
        k = _check_packed(k, "k", "k")
        if tuple(k.values.shape[:2]) != (B, Hkv) or k.capacity != v.capacity or k.values.dtype != v.values.dtype:
            _fail("k, v", "K and V do not match each other", "compress K and V of the same cache")
        tier, length, D = ("sparse24", "sparse24"), min(k.length, v.length), k.head_dim
        ksrc = _Source(vals=k.values, meta=k.meta, n_sparse=k.capacity // 32)
    else:
        _check_cuda(k, "k")
        _check_dtype(k, "k")
        if k.dim() != 4 or tuple(k.shape[:2]) != (B, Hkv) or k.shape[3] != v.head_dim or k.dtype != v.values.dtype:
            _fail("k", f"dense K of shape {tuple(k.shape)} and dtype {k.dtype} does not match V "
                  f"({B} sequences, {Hkv} KV heads, head_dim {v.head_dim}, {v.values.dtype})",
                  "pass K as [batch, kv_heads, tokens, head_dim] of V's dtype, or lib.compress_k(k)")
        tier, length, D = ("dense", "sparse24"), min(k.shape[2], v.length), v.head_dim
        ksrc = _Source(tail=k)
    _check_queries(q, B, Hkv, D, v.values.dtype)
    _check_same_device(q, "keep Q, K and V on one GPU", k=k.values if isinstance(k, PackedKV) else k, v=v.values)
    if seqlens is None and qlens is None and q.shape[2] == length and lib.find_wgmma_prefill(
            head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device), group=q.shape[1] // Hkv, tier=tier):
        # a whole prompt on Hopper: the wgmma kernels (templates/prefill_sm90.cu.j2)
        if tier[0] == "dense":  # the prompt's rows only (past them the tensor map reads zeros)
            return torch.ops.hierasparse.prefill_sm90_kd(lib.key, q, k[:, :, :length], v.values, v.meta,
                                                         v.capacity, _scale(scale, D))
        return torch.ops.hierasparse.prefill_sm90(lib.key, q, k.values, k.meta, v.values, v.meta, k.capacity,
                                                  _scale(scale, D))
    vsrc = _Source(vals=v.values, meta=v.meta, n_sparse=v.capacity // 32)
    fix = "pass torch.tensor(lengths, dtype=torch.int32, device=q.device)"
    seqlens = _check_lengths(seqlens, "seqlens", B, q.device, fix)
    if seqlens is None:
        seqlens = torch.full((B,), length, dtype=torch.int32, device=q.device)
    return _prefill(lib, q, tier, None, ksrc, vsrc, seqlens, _check_lengths(qlens, "qlens", B, q.device, fix),
                    length, _scale(scale, D))


@torch.library.custom_op("hierasparse::prefill_sm90", mutates_args=())
def _prefill_sm90_op(lib_key: str, q: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor,
                     v_vals: torch.Tensor, v_meta: torch.Tensor, capacity: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[lib_key]
    B, Hq, L, D = q.shape
    Hkv = k_vals.shape[1]
    variant = lib.find_wgmma_prefill(head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device), group=Hq // Hkv)
    q = _rows16_strided(q)
    for t, name in ((k_vals, "k.values"), (k_meta, "k.meta"), (v_vals, "v.values"), (v_meta, "v.meta")):
        _check_aligned(t, name, 16)
    out, lse = _prefill_outputs(q, _alloc)
    _launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3], k_vals.data_ptr(), k_meta.data_ptr(),
            v_vals.data_ptr(), v_meta.data_ptr(), capacity, B, Hq, Hkv, L, scale, out.data_ptr(), lse.data_ptr())
    return out, lse


@_prefill_sm90_op.register_fake
def _(lib_key, q, k_vals, k_meta, v_vals, v_meta, capacity, scale):
    return _prefill_outputs(q, _fake_alloc(q))


def _rows16_strided(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] as the sm_90a kernels read it (16-byte aligned rows at least D apart, strides nonzero
    multiples of 8 elements: Q's 16-byte loads, K's tensor map); a copy when it is not (one-query views and
    expanded tensors may say less)."""
    if (x.data_ptr() % 16 or any(t % 8 or t == 0 for t in x.stride()[:3]) or x.stride(2) < x.shape[3]
            or x.stride(3) != 1):
        return x.clone(memory_format=torch.contiguous_format)
    return x


@torch.library.custom_op("hierasparse::prefill_sm90_kd", mutates_args=())
def _prefill_sm90_kd_op(lib_key: str, q: torch.Tensor, k: torch.Tensor, v_vals: torch.Tensor, v_meta: torch.Tensor,
                        capacity: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sm_90a prefill with dense K rows ([B, Hkv, >= Lq, D], read through a TMA tensor map) and 2:4 V."""
    lib = _LIBRARIES[lib_key]
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    variant = lib.find_wgmma_prefill(head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device), group=Hq // Hkv,
                                     tier=("dense", "sparse24"))
    q, k = _rows16_strided(q), _rows16_strided(k)
    for t, name in ((v_vals, "v.values"), (v_meta, "v.meta")):
        _check_aligned(t, name, 16)
    out, lse = _prefill_outputs(q, _alloc)
    try:
        _launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3],
                k.shape[2], v_vals.data_ptr(), v_meta.data_ptr(), capacity, B, Hq, Hkv, L, scale, out.data_ptr(),
                lse.data_ptr())
    except CudaError as e:
        if e.code != _CUDA_ERROR_NOT_SUPPORTED:
            raise
        raise CudaError(f"{e}: the CUDA driver offers no cuTensorMapEncodeTiled (TMA tensor maps, CUDA 12 drivers "
                        f"and newer), which the sm_90a balanced kernel needs. Fix: update the driver, or pass "
                        f"seqlens to run the warp-level balanced kernel", e.code) from None
    return out, lse


@_prefill_sm90_kd_op.register_fake
def _(lib_key, q, k, v_vals, v_meta, capacity, scale):
    return _prefill_outputs(q, _fake_alloc(q))


def prefill_cache(lib, q: torch.Tensor, cache, seqlens: torch.Tensor, qlens: torch.Tensor, *,
                  k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
                  tail_start: torch.Tensor | None = None, scale: float | None = None, wgmma: bool = True,
                  whole: bool = False):
    """Causal attention of a query chunk (sequence b: the last ``qlens[b]`` of its ``seqlens[b]``
    tokens) over a HieraCache's block tables (the mixed-tier kernel); keys from ``tail_start[b]``
    on come from the dense ``k_tail``/``v_tail`` rows instead, when given. Without tails, on
    Hopper, the wgmma kernel over the tables takes it (``wgmma=False``: the warp-level kernel);
    ``whole`` (every sequence holds exactly the chunk's tokens: a prompt into an empty cache) lets
    it skip the per-sequence lengths, and take a dense ``k_tail`` (which then starts at token 0) as
    all of K. Used by :meth:`HieraCache.prefill`, which checks the arguments."""
    ks, vs = cache.k, cache.v
    D = cache.head_dim
    if wgmma and (k_tail is None or whole) and v_tail is None and cache.block == 64 and lib.find_wgmma_prefill(
            head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device), group=q.shape[1] // ks.table.shape[1],
            tier=("mixed", "mixed")):
        k_rows = None if k_tail is None else k_tail[:, :, :q.shape[2]]
        return torch.ops.hierasparse.prefill_sm90_table(lib.key, q, ks.table, vs.table, ks.dense, ks.sparse_vals,
                                                        ks.sparse_meta, vs.dense, vs.sparse_vals, vs.sparse_meta,
                                                        k_rows, None if whole else seqlens,
                                                        None if whole else qlens, _scale(scale, D))
    ksrc = _Source(ks.table, cache.block, ks.dense, ks.sparse_vals, ks.sparse_meta, ks.sparse_vals.shape[2],
                   k_tail, tail_start if k_tail is not None else None)
    vsrc = _Source(vs.table, cache.block, vs.dense, vs.sparse_vals, vs.sparse_meta, vs.sparse_vals.shape[2],
                   v_tail, tail_start if v_tail is not None else None)
    return _prefill(lib, q, ("mixed", "mixed"), cache.block, ksrc, vsrc, seqlens, qlens, cache.max_seq_len,
                    _scale(scale, cache.head_dim))


@torch.library.custom_op("hierasparse::prefill_sm90_table", mutates_args=())
def _prefill_sm90_table_op(lib_key: str, q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor,
                           k_dense: torch.Tensor, k_vals: torch.Tensor, k_meta: torch.Tensor, v_dense: torch.Tensor,
                           v_vals: torch.Tensor, v_meta: torch.Tensor, k_rows: torch.Tensor | None,
                           seqlens: torch.Tensor | None, qlens: torch.Tensor | None,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _LIBRARIES[lib_key]
    B, Hq, L, D = q.shape
    Hkv = k_table.shape[1]
    variant = lib.find_wgmma_prefill(head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device), group=Hq // Hkv,
                                     tier=("mixed", "mixed"))
    q = _rows16_strided(q)
    k_rows = None if k_rows is None else _rows16_strided(k_rows)
    for t, name in ((k_dense, "k dense pool"), (k_vals, "k 2:4 pool"), (k_meta, "k metadata pool"),
                    (v_dense, "v dense pool"), (v_vals, "v 2:4 pool"), (v_meta, "v metadata pool")):
        _check_aligned(t, name, 16)
    out, lse = _prefill_outputs(q, _alloc)
    _launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3], k_table.data_ptr(), v_table.data_ptr(),
            k_table.shape[2], k_dense.data_ptr(), k_dense.shape[2], k_vals.data_ptr(), k_meta.data_ptr(),
            k_vals.shape[2], v_dense.data_ptr(), v_dense.shape[2], v_vals.data_ptr(), v_meta.data_ptr(),
            v_vals.shape[2], _ptr(k_rows), *(k_rows.stride()[:3] if k_rows is not None else (0, 0, 0)),
            _ptr(seqlens), _ptr(qlens), B, Hq, Hkv, L, scale, out.data_ptr(), lse.data_ptr())
    return out, lse


@_prefill_sm90_table_op.register_fake
def _(lib_key, q, k_table, v_table, k_dense, k_vals, k_meta, v_dense, v_vals, v_meta, k_rows, seqlens, qlens, scale):
    return _prefill_outputs(q, _fake_alloc(q))


def _prefill(lib, q, tier, block_size, k: _Source, v: _Source, seqlens, qlens, max_len: int, scale: float):
    return torch.ops.hierasparse.prefill(
        lib.key, q, tier[0], tier[1], block_size or 0,
        k.table, k.block, k.dense, k.vals, k.meta, k.n_sparse, k.tail, k.tail_start,
        v.table, v.block, v.dense, v.vals, v.meta, v.n_sparse, v.tail, v.tail_start,
        seqlens, qlens, max_len, scale)


def _fake_alloc(q: torch.Tensor):
    """The allocator of the ops' fake (meta) implementations."""
    return lambda shape, dtype, device: q.new_empty(shape, dtype=dtype)


def _prefill_outputs(q: torch.Tensor, alloc):
    """out [B, Hq, Lq, D] in q's dtype and lse [B, Hq, Lq] fp32 of both prefill ops (alloc: _alloc or fake)."""
    B, Hq, Lq, D = q.shape
    return alloc((B, Hq, Lq, D), q.dtype, q.device), alloc((B, Hq, Lq), torch.float32, q.device)


def _source_args(table, block, dense, vals, meta, n_sparse, tail, tail_start) -> list:
    return [_ptr(table), 0 if table is None else table.shape[2], block,
            _ptr(dense), 0 if dense is None else dense.shape[2], _ptr(vals), _ptr(meta), n_sparse,
            _ptr(tail), *(tail.stride()[:3] if tail is not None else (0, 0, 0)), _ptr(tail_start)]


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
    lib = _LIBRARIES[lib_key]
    B, Hq, Lq, D = q.shape
    Hkv = next(t for t in (k_table, k_vals, k_tail) if t is not None).shape[1]
    variant = lib.select("prefill", head_dim=D, dtype=_DTYPES[q.dtype], cc=_device_cc(q.device), group=Hq // Hkv,
                         tier=(k_tier, v_tier), block_size=block_size or None)
    _check_aligned(q, "q", 4)
    # tails are caller tensors: copy them once if their rows are not 16-byte aligned
    k_tail = None if k_tail is None else _rows16(k_tail)
    v_tail = None if v_tail is None else _rows16(v_tail)
    for t, name in ((k_vals, "k.values"), (k_meta, "k.meta"), (v_vals, "v.values"), (v_meta, "v.meta"),
                    (k_dense, "k dense pool"), (v_dense, "v dense pool")):
        if t is not None:
            _check_aligned(t, name, 16)
    out, lse = _prefill_outputs(q, _alloc)
    _launch(lib, variant.symbol, q.device, q.data_ptr(), *q.stride()[:3],
            *_source_args(k_table, k_block, k_dense, k_vals, k_meta, k_n_sparse, k_tail, k_tail_start),
            *_source_args(v_table, v_block, v_dense, v_vals, v_meta, v_n_sparse, v_tail, v_tail_start),
            seqlens.data_ptr(), _ptr(qlens), max_len, B, Hq, Hkv, Lq, scale,
            out.data_ptr(), *out.stride()[:3], lse.data_ptr())
    return out, lse


@_prefill_op.register_fake
def _(lib_key, q, k_tier, v_tier, block_size, k_table, k_block, k_dense, k_vals, k_meta, k_n_sparse, k_tail,
      k_tail_start, v_table, v_block, v_dense, v_vals, v_meta, v_n_sparse, v_tail, v_tail_start, seqlens, qlens,
      max_len, scale):
    return _prefill_outputs(q, _fake_alloc(q))
