"""Read-only views of what a :class:`~hierasparse_gen.cache.HieraCache` holds: the tensors as
stored, the tier of every block, and byte counts (host-side, for tests and studies)."""

from __future__ import annotations

import torch

from .format import unpack_k, unpack_v
from .policy import cache_nbytes


class CacheInspection:
    """Inspection methods of HieraCache (they read its tables and pools; :meth:`sync` first)."""

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, Hkv, max(lengths), D]`` exactly as the cache holds them (2:4 blocks pruned)."""
        self.sync()
        L = max(self._lengths) if any(self._lengths) else 0
        out = []
        for t in (self.k, self.v):
            x = torch.zeros(self.batch, self.heads, self.max_blocks * self.block, self.head_dim,
                            dtype=self.dtype, device=self.device)
            for b in range(self.batch):
                blocks = -(-self._lengths[b] // self.block)
                for blk in range(blocks):
                    e = t.table[b, :, blk]
                    sl = slice(blk * self.block, (blk + 1) * self.block)
                    dense_rows = t.dense[b, torch.arange(self.heads), e.clamp(min=0).long()]
                    sp = (-e - 1).clamp(min=0).long()
                    vals = t.sparse_vals[b, torch.arange(self.heads), sp]
                    meta = t.sparse_meta[b, torch.arange(self.heads), sp]
                    unpack = unpack_k if t.name == "k" else unpack_v
                    shapes = ((self.heads, 1, self.block, self.head_dim // 2),
                              (self.heads, 1, self.block, self.head_dim // 16)) if t.name == "k" else \
                        ((self.heads, 1, self.block // 2, self.head_dim),
                         (self.heads, 1, self.block // 16, self.head_dim))
                    sparse_rows = unpack(vals.reshape(shapes[0]), meta.reshape(shapes[1]))[:, 0]
                    x[b, :, sl] = torch.where((e < 0).view(-1, 1, 1), sparse_rows, dense_rows)
                x[b, :, self._lengths[b]:] = 0
            out.append(x[:, :, :L])
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
                            sparse_blocks={t.name: sum(t.n_sparse) * self.heads for t in (self.k, self.v)})

    def allocated_nbytes(self) -> int:
        """Bytes of every preallocated pool and table."""
        return sum(x.nbytes for t in (self.k, self.v)
                   for x in (t.dense, t.sparse_vals, t.sparse_meta, t.table)) + self.seqlens.nbytes
