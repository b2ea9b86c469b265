"""The hierarchical cache's policy, shared by :class:`~hierasparse_gen.cache.HieraCache` and its
pure-torch model :class:`~hierasparse_gen.simulate.SimulatedCache`: settings, ratios, how many
blocks are eligible and 2:4, pool sizes, capacity and prefill-mode checks.

Plain Python (no kernels, no compiler): the simulation imports it without loading ops,
the registry, the compiler or jinja2.
"""

from __future__ import annotations

import math

from .errors import CacheFullError, InputError

#: How a prompt chunk attends during HieraCache.prefill (see its docstring).
PREFILL_MODES = ("compress_then_attend", "attend_then_compress", "balanced")


def cache_settings(lib, block_size: int | None, sink: int | None, window: int | None) -> tuple[int, int, int]:
    """(block_size, sink, local_window): the given values, else the library spec's ``cache``
    section (64, 64, 256 without a library or section), checked."""
    cfg = lib.manifest["spec"].get("cache", {}) if lib is not None else {}
    block = int(block_size or cfg.get("block_size", 64))
    sink = int(cfg.get("sink", 64) if sink is None else sink)
    window = int(cfg.get("local_window", 256) if window is None else window)
    if block <= 0 or block % 32 or sink < 0 or window < 0 or sink % block or window % block:
        raise InputError(f"block_size {block} must be a multiple of 32 and sink {sink} and window {window} "
                         f"multiples of it. Fix: use the spec's cache values")
    return block, sink, window


def check_ratios(key_ratio: float, value_ratio: float) -> None:
    for name, r in (("key_ratio", key_ratio), ("value_ratio", value_ratio)):
        if not 0.0 <= r <= 1.0:
            raise InputError(f"{name}: {r} is outside [0, 1]. Fix: pass the fraction of eligible "
                             f"blocks to store 2:4 (0 = all dense, 1 = all 2:4)")


#: prefill kernel choices (ops.prefilling.choose_kernel holds the rule of "auto")
KERNELS = ("auto", "wgmma", "mma_sp")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise InputError(f"kernel: {kernel!r} is not a prefill kernel. Fix: pass one of {', '.join(map(repr, KERNELS))}")


def check_prefill_mode(mode: str, what: str = "mode") -> None:
    if mode not in PREFILL_MODES:
        raise InputError(f"{what} {mode!r} is not a prefill mode. Fix: use one of {', '.join(PREFILL_MODES)}")


def check_room(current: list[int], adding: list[int], capacity: int) -> None:
    """A prefill chunk must fit every sequence whole (else nothing is written)."""
    most = max(n0 + n for n0, n in zip(current, adding))
    if most > capacity:
        raise CacheFullError(f"sequences would hold up to {most} tokens, more than the cache capacity {capacity}; "
                             f"nothing was written. Fix: build the cache with a larger max_seq_len")


def check_not_full(lengths: list[int], capacity: int) -> None:
    """A decode step needs room for one more token in every sequence."""
    full = [b for b, n in enumerate(lengths) if n >= capacity]
    if full:
        raise CacheFullError(f"sequences {full} hold {capacity} tokens, the cache capacity; nothing was written. "
                             f"Fix: build the cache with a larger max_seq_len")


#: How K and V may store their eligible blocks: the model's dtype, or e4m3 (see format_fp8).
STORAGES = ("model", "float8_e4m3")
#: Bytes of one e4m3 block's scale per token and KV head (float16: format_fp8.SCALE_DTYPE).
SCALE_BYTES = 2


def check_storage(storage: str, what: str = "storage") -> str:
    if storage not in STORAGES:
        raise InputError(f"{what} {storage!r} is not a storage. Fix: use one of {', '.join(map(repr, STORAGES))} "
                         f"('float8_e4m3' stores the blocks between the sink and the window in e4m3)")
    return storage


def block_nbytes(block: int, head_dim: int, *, storage: str, sparse: bool, itemsize: int) -> int:
    """Bytes of one block of one KV head as stored (format.py, format_fp8.py). ``itemsize``: bytes of a
    model-dtype value. Model dtype: dense ``S*D*itemsize``, 2:4 ``S*D*itemsize/2 + S*D/8``; e4m3: dense
    ``S*D + 2*S``, 2:4 ``S*D/2 + S*D/8 + 2*S`` (1-byte values, int16 metadata, float16 scales)."""
    check_storage(storage)
    elems = block * head_dim
    if storage == "model":
        return elems * itemsize // 2 + elems // 8 if sparse else elems * itemsize
    return (elems // 2 + elems // 8 if sparse else elems) + block * SCALE_BYTES


def ratio_count(ratio: float, eligible: int) -> int:
    """2:4 blocks among ``eligible`` blocks for a ratio (round half up, never more than all)."""
    return min(eligible, math.floor(ratio * eligible + 0.5))


def eligible_blocks(full_blocks: int, sink_blocks: int, window_blocks: int) -> int:
    """Blocks between the sink and the window among a sequence's ``full_blocks`` whole blocks."""
    return max(0, full_blocks - sink_blocks - window_blocks)


def pool_sizes(ratio: float, max_seq_len: int, block: int, sink_blocks: int, window_blocks: int) -> tuple[int, int]:
    """(dense slots, 2:4 slots) a sequence can ever need: the most blocks dense at once, and the
    2:4 blocks of a full sequence (at least one of each, so every pool has a slot)."""
    max_blocks = -(-max_seq_len // block)
    most_dense = 0
    for full in range(max_blocks + 1):
        held = ratio_count(ratio, eligible_blocks(full, sink_blocks, window_blocks))
        if full * block <= max_seq_len:         # every block full
            most_dense = max(most_dense, full - held)
        if full * block + 1 <= max_seq_len:     # one more, partial, block
            most_dense = max(most_dense, full + 1 - held)
    n_sparse = ratio_count(ratio, eligible_blocks(max_seq_len // block, sink_blocks, window_blocks))
    return max(most_dense, 1), max(n_sparse, 1)


__all__ = ["PREFILL_MODES", "cache_settings", "check_ratios", "check_prefill_mode", "check_room", "check_not_full",
           "ratio_count", "eligible_blocks", "pool_sizes", "STORAGES", "SCALE_BYTES", "check_storage", "block_nbytes"]


def cache_nbytes(*, block: int, head_dim: int, itemsize: int, batch: int, heads: int, max_blocks: int,
                 lengths: list[int], sparse_blocks: dict[str, int], storage: dict[str, str] | None = None,
                 eligible: int = 0) -> dict:
    """Bytes a cache holds, as the kernels store it: a dense block S x D values; a 2:4 block half its values
    plus 2 bits of metadata per kept element; two int32 block tables. ``sparse_blocks``: 2:4 blocks of K and
    of V over all sequences and heads. ``storage`` (default "model" for both): a tensor in "float8_e4m3" holds
    its ``eligible`` blocks (over all sequences and heads) in e4m3 (1-byte values plus a float16 scale per
    token: :func:`block_nbytes`): ``*_dense`` counts the model-dtype dense blocks, ``*_dense_fp8`` the
    e4m3 dense ones, ``*_sparse`` the 2:4 ones in the tensor's storage. Also the dense bytes of the same
    tokens (model dtype) and the ratio."""
    blocks = sum(-(-n // block) for n in lengths) * heads
    out = {}
    for name in ("k", "v"):
        st = (storage or {}).get(name, "model")
        n_sparse = sparse_blocks[name]
        fp8_dense = eligible - n_sparse if st != "model" else 0
        out[f"{name}_dense"] = (blocks - n_sparse - fp8_dense) * block_nbytes(
            block, head_dim, storage="model", sparse=False, itemsize=itemsize)
        out[f"{name}_dense_fp8"] = fp8_dense * block_nbytes(block, head_dim, storage="float8_e4m3", sparse=False,
                                                            itemsize=itemsize)
        out[f"{name}_sparse"] = n_sparse * block_nbytes(block, head_dim, storage=st, sparse=True, itemsize=itemsize)
    out["table"] = 2 * batch * heads * max_blocks * 4
    data = sum(v for k, v in out.items() if k != "table")
    out["total"] = data + out["table"]
    out["dense_equivalent"] = 2 * blocks * block * head_dim * itemsize
    out["compression_ratio"] = out["dense_equivalent"] / data if data else 1.0
    return out
