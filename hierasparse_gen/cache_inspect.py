"""Read-only views of what a :class:`~hierasparse_gen.cache.HieraCache` holds: the tensors as
stored, the tier of every block, and byte counts (host-side, for tests and studies)."""

from __future__ import annotations

import torch

from . import format_fp8
from .format import unpack_k, unpack_v
from .policy import cache_nbytes

DENSE8 = 1 << 30  # (cache.DENSE8) table entry of an e4m3 tensor's dense e4m3 slot


def _sparse_pool(cache, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tensor ``t``'s 2:4 pool as flat packed tensors of one block each (B, H x slots planes): values, metadata
    and, for e4m3, scales, in format.py's / format_fp8's kernel layout."""
    B, H, S, D = cache.batch, cache.heads, cache.block, cache.head_dim
    n_sp = t.sparse_vals.shape[2]
    vshape, mshape = ((B, H * n_sp, S, D // 2), (B, H * n_sp, S, D // 16)) if t.name == "k" else \
        ((B, H * n_sp, S // 2, D), (B, H * n_sp, S // 16, D))
    scales = t.sparse_scales.reshape(B, H * n_sp, S) if t.e4m3 else None
    return t.sparse_vals.reshape(vshape), t.sparse_meta.reshape(mshape), scales


def _dense8_rows(cache, t, dtype) -> torch.Tensor:
    """An e4m3 tensor's dense e4m3 pool dequantized into ``dtype``: ``[B, H, n_dense8, block, D]``."""
    B, H, S, D = cache.batch, cache.heads, cache.block, cache.head_dim
    n8 = t.dense8.shape[2]
    unpack_dense = format_fp8.unpack_k_dense if t.name == "k" else format_fp8.unpack_v_dense
    return unpack_dense(t.dense8.reshape(B, H * n8, S, D), t.dense8_scales.reshape(B, H * n8, S),
                        dtype).reshape(B, H, n8, S, D)


def block_rows(cache, t, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot of tensor ``t`` of ``cache`` as dense rows in ``dtype`` (default the cache's; float32 holds e4m3
    values times their scales exactly), ``[B, H, slots, block, D]``: the
    model-dtype dense pool, then (e4m3 tensors) the e4m3 dense pool dequantized, then the 2:4 pool unpacked (dropped
    values 0, e4m3 dequantized); and the table with each entry turned into its slot there ``[B, H, max_blocks]``."""
    B, H, S, D = cache.batch, cache.heads, cache.block, cache.head_dim
    dtype = dtype or cache.dtype
    n_dense, n_sp = t.dense.shape[2], t.sparse_vals.shape[2]
    is_k = t.name == "k"
    vals, meta, scales = _sparse_pool(cache, t)
    parts = [t.dense.to(dtype)]
    n8 = 0
    if t.e4m3:
        n8 = t.dense8.shape[2]
        parts.append(_dense8_rows(cache, t, dtype))
        sparse = (format_fp8.unpack_k if is_k else format_fp8.unpack_v)(vals, meta, scales, dtype)
    else:
        sparse = (unpack_k if is_k else unpack_v)(vals, meta).to(dtype)
    parts.append(sparse.reshape(B, H, n_sp, S, D))
    e = t.table
    slot = torch.where(e < 0, n_dense + n8 - e - 1, torch.where(e >= DENSE8, n_dense + e - DENSE8, e))
    return torch.cat(parts, 2), slot


def prefill_pools(cache, t, widen=format_fp8.model_dtype_2to4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """An e4m3 tensor ``t`` of ``cache`` as model-dtype pools for the 16-bit prefill kernels: (dense
    ``[B, H, n_dense + n8, block, D]``: the model-dtype slots, then the e4m3 dense slots dequantized; 2:4 values
    in the cache's dtype with ``t``'s metadata (``widen(vals, meta, scales, kind, dtype)``: by default
    format_fp8's torch function, the cache passes its library's kernel, ops.packing.widen8); the metadata; the
    table with e4m3 dense entries turned into their slot in that dense pool, int32). Each value is what
    :func:`block_rows` gives in the cache's dtype."""
    dense = torch.cat((t.dense, _dense8_rows(cache, t, cache.dtype)), 2)
    vals = widen(*_sparse_pool(cache, t), t.name, cache.dtype).reshape(t.sparse_vals.shape)
    e = t.table
    table = torch.where(e >= DENSE8, t.dense.shape[2] + e - DENSE8, e).to(torch.int32).contiguous()
    return dense, vals, t.sparse_meta, table


class CacheInspection:
    """Inspection methods of HieraCache (they read its tables and pools; :meth:`sync` first)."""

    def to_dense(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, Hkv, max(lengths), D]`` exactly as the cache holds them (2:4 blocks pruned, e4m3 blocks
        dequantized into ``dtype``, by default the cache's: float32 is what the decode kernel multiplies)."""
        self.sync()
        L = max(self._lengths) if any(self._lengths) else 0
        out = []
        for t in (self.k, self.v):
            rows, table = block_rows(self, t, dtype)
            S, B, H = self.block, self.batch, self.heads
            idx = table.long().view(B, H, self.max_blocks, 1, 1).expand(-1, -1, -1, S, self.head_dim)
            x = torch.gather(rows, 2, idx).reshape(B, H, self.max_blocks * S, self.head_dim)
            live = torch.arange(x.shape[2], device=self.device).view(1, -1) < \
                torch.tensor(self._lengths, device=self.device).view(-1, 1)
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            out.append(torch.where(live.view(B, 1, -1, 1), x, zero)[:, :, :L])
        return out[0], out[1]

    def tiers(self, name: str = "k") -> torch.Tensor:
        """Per (batch, head, block): True where the block is 2:4 (blocks past a length are False)."""
        self.sync()
        t = self.k if name == "k" else self.v
        blocks = torch.arange(self.max_blocks, device=self.device).view(1, 1, -1)
        live = blocks < torch.tensor([-(-n // self.block) for n in self._lengths], device=self.device).view(-1, 1, 1)
        return (t.table < 0) & live

    def nbytes(self) -> dict:
        """Bytes held by the live blocks, by tier, and the compression ratio against dense."""
        self.sync()
        return cache_nbytes(block=self.block, head_dim=self.head_dim, itemsize=self.dtype.itemsize,
                            batch=self.batch, heads=self.heads, max_blocks=self.max_blocks, lengths=self._lengths,
                            sparse_blocks={t.name: sum(t.n_sparse) * self.heads for t in (self.k, self.v)},
                            storage={t.name: t.storage for t in (self.k, self.v)},
                            eligible=sum(self.n_eligible) * self.heads)

    def allocated_nbytes(self) -> int:
        """Bytes of every preallocated pool and table."""
        return sum(x.nbytes for t in (self.k, self.v)
                   for x in (t.dense, t.sparse_vals, t.sparse_meta, t.table, t.dense8, t.dense8_scales, t.sparse_scales)
                   if x is not None) + self.seqlens.nbytes
