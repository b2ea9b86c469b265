"""Shortcuts that make the simulation usable on a real model on the CPU, with the same results.

* ``MemoSimulatedCache``: the simulated cache prunes its whole K and V at every decode step
  (``view``), which costs about a second per step for a 30-layer model at 2K tokens on a
  2-core CPU. This subclass keeps the pruned view between steps and updates only the new row
  and the block that a flush turns 2:4; the attention itself is the same float64 reference.
* ``prefill_from``: with attend-then-compress, a sparse prefill attends densely and then
  compresses, so its K/V are those of a dense prefill: the sparse caches of every setting are
  filled from one dense prefill's K/V instead of re-running the model over the prompt.

Both reach into the transformers integration's cache layers (``store``, ``seen``,
``lazy_initialization``) and the model's sparse-KV settings; when those are not there, the
evaluation falls back to the plain path (``--exact`` asks for it), and the tests check that
both give the same numbers.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import hf
from ..format import prune_k, prune_v
from ..reference import decode_reference
from ..simulate import SimulatedCache


class MemoSimulatedCache(SimulatedCache):
    """SimulatedCache whose decode steps reuse the pruned view (same outputs)."""

    def _memo_drop(self) -> None:
        self._memo, self._flags = None, None

    def _memo_get(self) -> dict:
        if getattr(self, "_memo", None) is None:
            self._memo = {n: self.view(n).double() for n in "kv"}  # attention runs in float64
            self._flags = {n: self.sparse[n].clone() for n in "kv"}
        return self._memo

    def prefill(self, *args, **kwargs):
        self._memo_drop()
        return super().prefill(*args, **kwargs)

    def reset(self) -> None:
        self._memo_drop()
        super().reset()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().append(k, v)
        if getattr(self, "_memo", None) is None:
            return
        S = self.block
        for name in "kv":
            memo, x = self._memo[name], self.x[name]
            for b, n in enumerate(self.lengths):
                memo[b, :, n - 1] = x[b, :, n - 1]  # the new row sits in the newest block, dense
            changed = (self.sparse[name] & ~self._flags[name]).nonzero().tolist()
            for b, h, blk in changed:  # a flush turned this block 2:4
                rows = x[b, h, blk * S:(blk + 1) * S]
                memo[b, h, blk * S:(blk + 1) * S] = prune_k(rows) if name == "k" else prune_v(rows)
            if (self._flags[name] & ~self.sparse[name]).any():  # never happens; stay exact if it does
                self._memo_drop()
                return
            self._flags[name] = self.sparse[name].clone()

    def attend(self, q: torch.Tensor, *, scale=None, num_splits=None):
        memo = self._memo_get()
        if self.batch != 1:
            out, lse = decode_reference(q, memo["k"], memo["v"], torch.tensor(self.lengths), scale)
            return out.to(q.dtype), lse.float()
        # decode_reference's float64 arithmetic on the live keys only (one sequence: no masks)
        n, D = self.lengths[0], q.shape[-1]
        k, v = (memo[name][:, :, :n] for name in "kv")
        group = q.shape[1] // self.heads
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        s = torch.einsum("bhgd,bhld->bhgl", q.double().view(1, self.heads, group, D), k) * scale
        lse = torch.logsumexp(s, -1)
        out = torch.einsum("bhgl,bhld->bhgd", torch.exp(s - lse.unsqueeze(-1)), v)
        return out.reshape(1, -1, D).to(q.dtype), lse.reshape(1, -1).float()

def use_memo_store(model) -> bool:
    """Make the model's simulated caches MemoSimulatedCache; False when the settings are not
    where this version of the integration keeps them (then the plain simulation runs)."""
    settings = getattr(model, "_sparse_kv", None)
    if not isinstance(settings, hf.SparseKV) or settings.backend != "simulate":
        return False

    class _Settings(type(settings)):
        def make_store(self, *, batch, heads, head_dim, max_len, dtype, device):
            return MemoSimulatedCache(None, batch=batch, num_kv_heads=heads, head_dim=head_dim, max_seq_len=max_len,
                                      key_ratio=self.key_ratio, value_ratio=self.value_ratio, dtype=dtype,
                                      device=device, block_size=self.block_size, sink=self.sink,
                                      local_window=self.window)

    model._sparse_kv = _Settings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)})
    return True


def dense_prefill_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (K, V) ``[1, Hkv, P, D]`` of a dense transformers cache, or None if unreadable."""
    try:
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    except AttributeError:
        return None


def prefill_from(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Fill a fresh HieraSparseCache with a dense prefill's K/V, as the attend-then-compress
    prefill would; False (and nothing written) when its layers do not look as expected."""
    layers = getattr(cache, "layers", [])
    if len(layers) != len(kv) or not all(hasattr(x, "lazy_initialization") and hasattr(x, "seen") for x in layers):
        return False
    for layer, (k, v) in zip(layers, kv):
        layer.lazy_initialization(k, v)
        layer.store.prefill(k, v, [k.shape[2]])
        layer.seen = k.shape[2]
    return True
