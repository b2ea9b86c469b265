"""The hierarchical KV cache: preallocated dense and 2:4 pools plus one block table.

Every (batch, kv head) sequence is cut into blocks of ``block_size`` tokens. Each block of K
and, independently, of V lives either in the dense pool (row-major) or in the 2:4 pool (the
kernel fragment layout of :mod:`hierasparse_gen.format`); the block table says which, and
where: entry ``e >= 0`` is dense slot ``e``, ``e < 0`` is 2:4 slot ``-e - 1``.

* The first ``sink`` tokens and the window (the last ``local_window`` tokens in whole blocks,
  plus the newest, partial block) are always dense.
* Eligible blocks (between sink and window) are 2:4 in the proportion of each tensor's ratio:
  ``round(ratio * eligible)`` of them, per (batch, kv head). At prefill the blocks of least
  score are chosen, per head, by the cache's ``selection`` (:mod:`hierasparse_gen.selection`:
  prune loss, the attention mass of the prompt's last queries, or both); when decode pushes a
  block out of the window it becomes 2:4 exactly when that keeps the count at the ratio, so
  every head of a sequence holds the same number of dense and 2:4 blocks and pools can be
  sized up front.
* Appends write one row of the newest dense block; a flush re-tiers one block in place
  (compress it into the next 2:4 slot, free its dense slot). Nothing is ever concatenated.
* Storage (``key_storage``/``value_storage``, docs/fp8.md): with ``"float8_e4m3"`` a tensor's eligible
  blocks live in e4m3 pools with one float16 scale per token, dense (table entry ``DENSE8 + slot``) or 2:4
  (``e < 0``), and its sink and window stay dense in the model dtype; every block leaving the window moves
  into the e4m3 pools (2:4 by the ratio, by count: a dense e4m3 block has lost the values re-tiering would
  compress).

Slot bookkeeping (per sequence, the same for all heads) lives twice: on the host, for prefill
and inspection, and on the device (``ctrl``), where the decode-step append kernel reads and
advances it, so a decode step needs no synchronisation and can be captured in a CUDA graph.
Eager appends keep both in step; after captured or compiled steps the host copy is marked
stale and :meth:`HieraCache.sync` (called by every host-side method) pulls it back.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch

from .cache_inspect import DENSE8, CacheInspection, prefill_pools
from .errors import CacheFullError, InputError
from .ops import cache_kernels as _kernels
from .ops.checks import check_queries
from .ops.packing import widen8
# (the policy names also stay importable from here: PREFILL_MODES, ratio_count, cache_settings, ...)
from .policy import (PREFILL_MODES, cache_settings, check_not_full, check_prefill_mode, check_ratios, check_room,
                     eligible_blocks, pool_sizes, ratio_count)
from .format import block_prune_loss
from .format_fp8 import check_storage
from .selection import (block_scores, check_selection, needs_queries, observed_queries, resolve,
                        resolve_channels, resolve_tokens)

_CTRL_STACK = 6  # ctrl columns before the free-slot stacks
_STATUS = 5      # ctrl column: 1 = a captured append found the sequence full, 2 = no free dense slot


def _pinned(values: list[int]) -> torch.Tensor:
    """int32 host tensor in page-locked memory where CUDA is present: its copy to the GPU need not wait for the
    stream (a copy from pageable memory does), so a prefill queues behind the model's work instead of draining it."""
    t = torch.tensor(values, dtype=torch.int32)
    return t.pin_memory() if torch.cuda.is_available() else t


def _upload(values: list[int], device) -> torch.Tensor:
    return _pinned(values).to(device, non_blocking=True)


@dataclass
class _Tensor:
    """Pools, table and per-sequence slot bookkeeping of K or of V."""
    name: str
    ratio: float
    dense: torch.Tensor          # [B, H, n_dense, block, D]
    sparse_vals: torch.Tensor    # [B, H, n_sparse, block * D / 2]
    sparse_meta: torch.Tensor    # [B, H, n_sparse, block * D / 16] int16
    table: torch.Tensor          # [B, H, max_blocks] int32
    n_sparse: list[int] = field(default_factory=list)        # 2:4 blocks, per sequence
    free: list[list[int]] = field(default_factory=list)      # free dense slots, per sequence
    uniform: list[dict[int, int]] = field(default_factory=list)  # block -> dense slot, same for all heads
    storage: str = "model"       # "float8_e4m3": eligible blocks in the e4m3 pools below (2:4 values: uint8)
    dense8: torch.Tensor | None = None          # [B, H, n_dense8, block * D] uint8 (format_fp8's dense layout)
    dense8_scales: torch.Tensor | None = None   # [B, H, n_dense8, block] float16
    sparse_scales: torch.Tensor | None = None   # [B, H, n_sparse, block] float16

    @property
    def e4m3(self) -> bool:
        return self.storage == "float8_e4m3"


class HieraCache(CacheInspection):
    """One layer's hierarchical K/V cache for ``batch`` sequences of up to ``max_seq_len`` tokens."""

    def __init__(self, lib, *, batch: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 key_ratio: float, value_ratio: float, dtype=torch.float16, device="cuda",
                 block_size: int | None = None, sink: int | None = None, local_window: int | None = None,
                 selection: str = "auto", key_channels: str = "auto", observe: int = 64,
                 value_tokens: str = "auto", key_storage: str = "model", value_storage: str = "model"):
        self.lib = lib
        self.block, self.sink, self.window = cache_settings(lib, block_size, sink, local_window)
        check_ratios(key_ratio, value_ratio)
        check_selection(selection, key_channels, observe, value_tokens)
        self.selection, self.key_channels, self.observe = selection, key_channels, int(observe)
        self.value_tokens = value_tokens
        if batch < 1 or num_kv_heads < 1 or max_seq_len < 1:
            raise InputError(f"batch {batch}, num_kv_heads {num_kv_heads} and max_seq_len {max_seq_len} must be "
                             f"positive. Fix: pass sizes of at least 1")
        if dtype not in (torch.float16, torch.bfloat16):
            raise InputError(f"dtype {dtype} is not supported. Fix: use torch.float16 or torch.bfloat16")
        self.batch, self.heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype = dtype
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.device = self.seqlens.device  # "cuda" resolved to "cuda:N"
        self.max_seq_len = max_seq_len
        self.max_blocks = -(-max_seq_len // self.block)
        self.sink_blocks, self.window_blocks = self.sink // self.block, self.window // self.block
        self._lengths = [0] * batch
        self.n_eligible = [0] * batch
        storage = {"k": check_storage(key_storage, "key_storage"), "v": check_storage(value_storage, "value_storage")}
        if "float8_e4m3" in storage.values():
            _kernels.check_e4m3_build(lib, head_dim, dtype, storage["k"], storage["v"])
        self.k = self._make("k", key_ratio, storage["k"])
        self.v = self._make("v", value_ratio, storage["v"])
        # K's per-channel weights of the 2:4 choice (key_channels "query"/"auto": set by a sequence's first
        # prefill when it brings queries, read by the fill and append kernels; ones weigh nothing); None: magnitudes
        self.key_weight = torch.ones(batch, num_kv_heads, head_dim, dtype=torch.float32, device=self.device) \
            if key_channels != "magnitude" else None
        self.weighted = [False] * batch  # per sequence: its K channel weights were set
        # V's token weights (value_tokens "attention"/"auto" with queries): every prompt token's, set by a first
        # prefill, read by the fill, the append kernel and the chunk flush for blocks that become 2:4 later
        # (ones weigh nothing: 4 bytes a token and head, under 1 % of a 16-bit cache at head_dim 128)
        self.value_weight = torch.ones(batch, num_kv_heads, self.max_blocks * self.block, dtype=torch.float32,
                                       device=self.device)
        self._weighs_v = [False] * batch
        # the blocks' scores of decode-time re-tiering (selection "attention": the prompt's attention mass per
        # visible query, selection.visible_block_mass); inf: none, the leaving block becomes 2:4 by count
        self.block_mass = torch.full((batch, num_kv_heads, self.max_blocks), float("inf"), dtype=torch.float32,
                                     device=self.device)
        # device bookkeeping, one row a sequence (columns: templates/cache/append.cuh):
        # eligible blocks, K 2:4 count, K free-stack height, V's two, status, K stack, V stack
        self.ctrl = torch.zeros(batch, _CTRL_STACK + self.k.dense.shape[2] + self.v.dense.shape[2],
                                dtype=torch.int32, device=self.device)
        self._stale = False
        self._push_ctrl()

    @property
    def lengths(self) -> list[int]:
        """Tokens held per sequence (brought up to date first after captured or compiled steps)."""
        self.sync()
        return list(self._lengths)

    # --- sizing -------------------------------------------------------------------------------
    def _eligible(self, full_blocks: int) -> int:
        return eligible_blocks(full_blocks, self.sink_blocks, self.window_blocks)

    def _make(self, name: str, ratio: float, storage: str = "model") -> _Tensor:
        B, H, D, S = self.batch, self.heads, self.head_dim, self.block
        sizes = (self.max_seq_len, self.block, self.sink_blocks, self.window_blocks)
        n_dense, n_sparse = pool_sizes(ratio, *sizes)
        e4m3 = storage == "float8_e4m3"
        if e4m3:  # the model-dtype pool holds what is never eligible (sink, window, partial): ratio 1's dense
            n_dense = pool_sizes(1.0, *sizes)[0]
            most = eligible_blocks(self.max_seq_len // S, self.sink_blocks, self.window_blocks)
            n_dense8 = max(1, most - ratio_count(ratio, most))  # dense eligible blocks only grow with the count
        z = dict(device=self.device)
        t = _Tensor(name, ratio,
                    torch.zeros(B, H, n_dense, S, D, dtype=self.dtype, **z),
                    torch.zeros(B, H, n_sparse, S * D // 2, dtype=torch.uint8 if e4m3 else self.dtype, **z),
                    torch.zeros(B, H, n_sparse, S * D // 16, dtype=torch.int16, **z),
                    torch.zeros(B, H, self.max_blocks, dtype=torch.int32, **z), storage=storage)
        if e4m3:
            t.dense8 = torch.zeros(B, H, n_dense8, S * D, dtype=torch.uint8, **z)
            t.dense8_scales = torch.ones(B, H, n_dense8, S, dtype=torch.float16, **z)
            t.sparse_scales = torch.ones(B, H, n_sparse, S, dtype=torch.float16, **z)
        t.n_sparse = [0] * B
        t.free = [list(range(n_dense)) for _ in range(B)]
        t.uniform = [{} for _ in range(B)]
        return t

    # --- prefill ------------------------------------------------------------------------------
    def prefill(self, k: torch.Tensor, v: torch.Tensor, lengths=None, *, q: torch.Tensor | None = None,
                mode: str = "compress_then_attend", scale: float | None = None, kernel: str = "auto",
                select_q: torch.Tensor | None = None, select_lse: torch.Tensor | None = None):
        """Add a prompt chunk's dense K/V ``[B, Hkv, L, D]`` after what each sequence holds
        (sequence b takes the first ``lengths[b] <= L`` rows; default all L).

        Empty sequences are filled in one pass, their 2:4 blocks chosen by prune loss; the
        chunks of a sequence that already holds tokens enter block by block, re-tiered as
        decode would. With ``q [B, Hq, L, D]`` (rows as for K) also returns the chunk's causal
        attention (out ``[B, Hq, L, D]``, lse ``[B, Hq, L]``; padding rows get 0 and -inf) under
        ``mode`` (see PREFILL_MODES):

        * ``attend_then_compress``: the chunk attends to the cache as it was and to its own
          dense K/V (exact for the prompt), which then enter the cache;
        * ``compress_then_attend``: K/V enter the cache first; the chunk attends to them as stored;
        * ``balanced``: as compress_then_attend, but the chunk's own keys are read dense (dense
          K + 2:4 V during prefill, K compressed afterwards).

        ``kernel``: the attention's kernel family, "auto", "wgmma" or "mma_sp" (the rule:
        :func:`hierasparse_gen.ops.choose_kernel`; the sm_90a table kernel takes compress_then_attend
        chunks, and balanced prompts into an empty cache).

        ``select_q``: the prompt's queries ``[B, Hq, L, D]`` for the choices that read them (the
        selections attention, expected_error and auto; query-weighted K channels),
        when ``q`` is not given (default: ``q``); only the last ``observe`` rows of each sequence
        are read. ``select_lse``: their rows' natural log-sum-exp ``[B, Hq, L]`` (float32) under ``scale``, as a
        causal attention over the prompt run before this call returns it (cuDNN's, as ``enable`` passes it): the
        attention-mass kernel then skips the pass that computes it (masses equal to float32 rounding). Read only
        for sequences that were empty, whose keys are the chunk's.
        """
        self.sync()
        self._check_dense(k, "k", 4)
        self._check_dense(v, "v", 4)
        if k.shape != v.shape:
            raise InputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ. Fix: pass K and V of one prompt")
        check_prefill_mode(mode)
        L = k.shape[2]
        lengths = [L] * self.batch if lengths is None else [int(x) for x in lengths]
        if len(lengths) != self.batch or min(lengths) < 0 or max(lengths) > L:
            raise InputError(f"lengths {lengths} must give one value in [0, {L}] per sequence. Fix: pass "
                             f"{self.batch} lengths, none above the chunk's {L} rows")
        check_room(self._lengths, lengths, self.max_seq_len)
        self._check_selectable(lengths)
        after = [n0 + n for n0, n in zip(self._lengths, lengths)]
        select_q = q if select_q is None else select_q
        if select_q is not None and select_q is not q:
            self._check_queries(select_q, L)
        if select_q is None and needs_queries(self.selection, self.key_channels, self.value_tokens) and \
                any(n0 == 0 and n for n0, n in zip(self._lengths, lengths)):
            raise InputError(f"selection {self.selection!r} with key_channels {self.key_channels!r} and value_tokens "
                             f"{self.value_tokens!r} chooses blocks by the prompt's queries, and this prefill has none; "
                             f"nothing was written. Fix: pass q= (or select_q=) with the prompt, or build the cache "
                             f"with selection='auto', key_channels='auto' and value_tokens='magnitude'")
        if select_lse is not None:
            self._check_lse(select_lse, select_q, L)
        sel = (select_q, scale, select_lse)
        if q is not None:
            self._check_queries(q, L)
            # the kernel is chosen (a forced one that cannot run refused) before anything is written
            whole = all(n0 == 0 for n0 in self._lengths) and all(n == L for n in lengths)
            _kernels.table_prefill_family(self.lib, q, self, kernel, k_tail=mode != "compress_then_attend",
                                          v_tail=mode == "attend_then_compress", whole=whole)
        if q is None:
            self._extend(k, v, lengths, *sel)
            return None
        old = list(self._lengths)
        qlens = _upload(lengths, self.device)
        if mode == "attend_then_compress":
            seqlens = _upload(after, self.device)
            start = _upload(old, self.device)
            out = _kernels.prefill_cache(self.lib, q, self._prefill_source(any(old)), seqlens, qlens, k_tail=k,
                                         v_tail=v, tail_start=start, scale=scale, kernel=kernel)
            self._extend(k, v, lengths, *sel)
            return out
        whole = all(n0 == 0 for n0 in old) and all(n == L for n in lengths)  # a prompt into an empty cache
        if mode == "balanced":
            # The chunk's keys, dense, from the last 32-token boundary before it: the rows of
            # the partial block before the chunk are copied now, while still dense, so no
            # kernel piece straddles cache and tail after the chunk's blocks are re-tiered.
            k_tail, start = self._aligned_tail(k, lengths)
        self._extend(k, v, lengths, *sel)
        if mode == "compress_then_attend":  # no tails: the sm_90a kernel over the tables may take it
            return _kernels.prefill_cache(self.lib, q, self._prefill_source(), self.seqlens, qlens, scale=scale,
                                          whole=whole, kernel=kernel)
        # balanced: a whole prompt's dense K rows are all its keys, which the sm_90a table kernel also takes
        return _kernels.prefill_cache(self.lib, q, self._prefill_source(), self.seqlens, qlens, k_tail=k_tail,
                                      tail_start=start, scale=scale, whole=whole, kernel=kernel)

    def _prefill_source(self, reads: bool = True):
        """What the prefill kernels read (16-bit blocks): the cache itself, or with e4m3 tensors a stand-in in the
        model dtype: its dense pool the model-dtype dense blocks followed by the e4m3 dense blocks dequantized, its
        2:4 pool the e4m3 2:4 blocks as 16-bit 2:4 values with the same metadata (cache_inspect.prefill_pools),
        its table pointing there. Transient: those tensors' 16-bit bytes. ``reads`` False (the chunk attends to
        nothing held): empty pools."""
        if not (self.k.e4m3 or self.v.e4m3):
            return self
        view = copy.copy(self)
        for name in "kv":
            t = getattr(self, name)
            if not t.e4m3:
                continue
            if reads:
                dense, vals, meta, table = prefill_pools(self, t, partial(widen8, self.lib))
            else:
                S, D = self.block, self.head_dim
                dense = torch.zeros(self.batch, self.heads, 1, S, D, dtype=self.dtype, device=self.device)
                vals = torch.zeros(self.batch, self.heads, 1, S * D // 2, dtype=self.dtype, device=self.device)
                meta, table = t.sparse_meta[:, :, :1].contiguous(), torch.zeros_like(t.table)
            setattr(view, name, dataclasses.replace(t, dense=dense, sparse_vals=vals, sparse_meta=meta, table=table,
                                                    storage="model", dense8=None, dense8_scales=None,
                                                    sparse_scales=None))
        return view

    def _aligned_tail(self, k: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K rows from each sequence's last 32-token boundary: [B, Hkv, 31 + L, D], and
        the token of row 0 per sequence."""
        heads = [n0 % 32 for n0 in self._lengths]
        if not any(heads):
            return k, _upload(self._lengths, self.device)
        L = k.shape[2]
        tail = torch.zeros(self.batch, self.heads, 31 + L, self.head_dim, dtype=self.dtype, device=self.device)
        for b, r in enumerate(heads):
            n0 = self._lengths[b]
            if r:
                slot = self.k.uniform[b][n0 // self.block]  # the partial block is dense
                tail[b, :, :r] = self.k.dense[b, :, slot, n0 % self.block - r:n0 % self.block]
            tail[b, :, r:r + lengths[b]] = k[b, :, :lengths[b]]
        start = _upload([n0 - r for n0, r in zip(self._lengths, heads)], self.device)
        return tail, start

    def _extend(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int], select_q=None, scale=None,
                select_lse=None) -> None:
        fresh = [b for b in range(self.batch) if self._lengths[b] == 0 and lengths[b] > 0]

        def rows(x, b0, b1, n):
            return None if x is None else x[b0:b1, :, :n]
        # one batched pass when every sequence is empty with one length; else sequence by sequence
        if len(fresh) == self.batch and len(set(lengths)) == 1:
            n = lengths[0]
            self._prefill_group(0, self.batch, k[:, :, :n], v[:, :, :n], rows(select_q, 0, self.batch, n), scale,
                                rows(select_lse, 0, self.batch, n))
        else:
            for b in fresh:
                n = lengths[b]
                self._prefill_group(b, b + 1, k[b:b + 1, :, :n], v[b:b + 1, :, :n], rows(select_q, b, b + 1, n),
                                    scale, rows(select_lse, b, b + 1, n))
        for b in range(self.batch):
            if b not in fresh and lengths[b]:
                self._extend_sequence(b, k[b], v[b], lengths[b])
        self.seqlens.copy_(_pinned(self._lengths), non_blocking=True)
        self._push_ctrl()

    def _extend_sequence(self, b: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Append n rows (``[Hkv, >= n, D]``) to a non-empty sequence. The bookkeeping runs block
        by block as decode would (free slots, a flush whenever a block leaves the window, so the
        dense pools never overflow); the data then moves in a few batched operations a tensor."""
        S, pos0 = self.block, self._lengths[b]
        started = {"k": {}, "v": {}}   # block -> dense slot, for blocks that start in the chunk
        flushed = {"k": [], "v": []}   # (block, its dense slot, new table entry) for blocks leaving the window
        old_slot = {t.name: dict(t.uniform[b]) for t in (self.k, self.v)}
        i = 0
        while i < n:
            pos = self._lengths[b]
            blk, r = divmod(pos, S)
            take = min(S - r, n - i)
            if r == 0:  # a new block starts: it is dense, in a free slot
                for t in (self.k, self.v):
                    started[t.name][blk] = t.uniform[b][blk] = t.free[b].pop()
            i += take
            self._lengths[b] = pos + take
            if self._lengths[b] % S == 0:
                for t, blk_out, slot, entry in self._maybe_flush(b):
                    flushed[t.name].append((blk_out, slot, entry))
        for t, x in ((self.k, k), (self.v, v)):
            self._move_rows(t, b, x[:, :n], pos0, {**old_slot[t.name], **started[t.name]}, flushed[t.name])

    def _move_rows(self, t: _Tensor, b: int, x: torch.Tensor, pos0: int, slot_of: dict[int, int],
                   flushed: list[tuple[int, int, int]]) -> None:
        """Rows ``x [H, n, D]`` of positions pos0.. of sequence b into ``t``: the blocks flushed in
        this chunk are assembled (older rows from their dense slot, read before anything is
        written: a freed slot may be taken again within the chunk), compressed in one call and
        stored 2:4; every other row is written to its block's dense slot."""
        S, n = self.block, x.shape[1]
        first, last = pos0 // S, (pos0 + n - 1) // S
        entries = {blk: slot_of[blk] for blk in range(first, last + 1)}
        if flushed:
            blocks = torch.tensor([f[0] for f in flushed], device=x.device)
            off = (blocks.view(-1, 1) * S + torch.arange(S, device=x.device) - pos0).clamp(min=0)  # [F, S]
            assembled = x[:, off].transpose(0, 1).contiguous()  # [F, H, S, D]
            for f, (blk, slot, _) in enumerate(flushed):
                older = pos0 - blk * S  # rows of the block held before the chunk
                if older > 0:
                    assembled[f, :, :older] = t.dense[b, :, slot, :older]
            entry = torch.tensor([f[2] for f in flushed], device=x.device, dtype=torch.int32)
            blocks_out = [f[0] for f in flushed]
            if t.e4m3 or (t.name == "k" and self.weighted[b]) or (t.name == "v" and self._weighs_v[b]):
                self._fill_flushed(t, b, assembled, entry, blocks_out)
            else:
                sp = -entry.long() - 1
                packed = (self.lib.compress_k if t.name == "k" else self.lib.compress_v)(assembled)
                t.sparse_vals[b, :, sp] = packed.values.reshape(len(flushed), self.heads, -1).transpose(0, 1)
                t.sparse_meta[b, :, sp] = packed.meta.reshape(len(flushed), self.heads, -1).transpose(0, 1)
            # (blocks from before the chunk may leave the window too: outside first..last)
            t.table[b, :, blocks.to(t.table.device)] = entry.to(t.table.device)
            entries.update({blk: e for blk, _, e in flushed if blk >= first})
        lut = torch.tensor([entries[blk] for blk in range(first, last + 1)], dtype=torch.int32)
        t.table[b, :, first:last + 1] = lut.to(t.table.device)
        pos = torch.arange(pos0, pos0 + n)
        slots = lut[pos // S - first]
        keep = (slots >= 0) & (slots < DENSE8)  # rows of blocks still in the model-dtype dense pool
        if bool(keep.any()):
            idx = torch.nonzero(keep).flatten()
            dev = t.dense.device
            t.dense[b, :, slots[idx].long().to(dev), (pos[idx] % S).to(dev)] = x[:, idx.to(x.device)]

    def _fill_flushed(self, t: _Tensor, b: int, assembled: torch.Tensor, entry: torch.Tensor,
                      blocks: list[int]) -> None:
        """Blocks ``blocks`` of sequence b (rows ``assembled [F, H, S, D]``) to their new table entries ``entry
        [F]`` (2:4 slots, or an e4m3 tensor's dense e4m3 slots) through the fill kernel, which takes K's channel
        weights and V's token weights (the flat compressor keeps magnitudes)."""
        F, S = assembled.shape[0], self.block
        x = assembled.transpose(0, 1).reshape(1, self.heads, F * S, self.head_dim)
        table = entry.to(torch.int32).view(1, 1, F).expand(1, self.heads, F).contiguous().to(self.device)
        if t.name == "k":
            weight = self.key_weight[b:b + 1] if self.key_weight is not None else None
        else:  # each block's token weights
            idx = (torch.tensor(blocks, device=self.device).view(-1, 1) * S + torch.arange(S, device=self.device))
            weight = self.value_weight[b, :, idx.flatten()].unsqueeze(0).contiguous()
        if t.e4m3:
            _kernels.fill_blocks8(self.lib, x, t.name, t, S, table, slice(b, b + 1), weight)
        else:
            _kernels.fill_blocks(self.lib, x, t.name, table, S, t.dense[b:b + 1], t.sparse_vals[b:b + 1],
                                 t.sparse_meta[b:b + 1], weight)

    def _prefill_group(self, b0: int, b1: int, k: torch.Tensor, v: torch.Tensor, select_q=None, scale=None,
                       select_lse=None) -> None:
        """Sequences b0..b1-1, all with the prompt length L: select, fill the table, then one
        fill kernel per tensor writes every block to its dense or 2:4 slot."""
        L, S = k.shape[2], self.block
        full, blocks = L // S, -(-L // S)
        first = self.sink_blocks
        n_elig = self._eligible(full)
        window0 = first + n_elig            # first block of the window (or of the tail)
        uniform = list(range(min(first, blocks))) + list(range(max(window0, min(first, blocks)), blocks))
        selection = resolve(self.selection, select_q is not None)
        observed = observed_queries(select_q, [L] * (b1 - b0), self.observe) if select_q is not None else []
        mass = vweight = None
        # V's token weights only where a V block becomes 2:4
        weigh_v = resolve_tokens(self.value_tokens, select_q is not None) == "attention" and \
            ratio_count(self.v.ratio, n_elig) > 0
        if (selection in ("attention", "expected_error") and n_elig) or weigh_v:
            tokens = self._token_mass(select_q, k, observed, scale, select_lse)  # per key, [b1 - b0, H, L]
            # block sums (the selection's scores); into the cache, as SimulatedCache: the scores of decode-time
            # re-tiering, V's token weights of every prompt token (later tokens weigh 1)
            mass, _, _ = _kernels.mass_stats(self.lib, k, tokens, observed[0].shape[1], S,
                                             seen=self.block_mass[b0:b1] if selection == "attention" else None,
                                             weights=self.value_weight[b0:b1] if weigh_v else None)
            if weigh_v:
                vweight = self.value_weight[b0:b1, :, :blocks * S]  # (a view: the weights stay for later flushes)
                vweight = vweight.contiguous()  # the fill kernel's [B, H, blocks * S]
                self._weighs_v[b0:b1] = [True] * (b1 - b0)
        weight = None  # K's channel weights, [b1 - b0, H, D]
        if self.key_weight is not None and resolve_channels(self.key_channels, select_q is not None) == "query":
            weight = self.key_weight[b0:b1]
            _kernels.channel_weights(self.lib, select_q[:, :, L - observed[0].shape[1]:L], self.heads, out=weight)
            self.weighted[b0:b1] = [True] * (b1 - b0)
        # K's and V's scores are one attention mass: one select launch writes both tables
        shared = selection == "attention" and mass is not None
        if shared:
            _kernels.select_blocks(self.lib, k, mass, first, n_elig, ratio_count(self.k.ratio, n_elig), blocks,
                                   self.k.table[b0:b1], ratio_count(self.v.ratio, n_elig), self.v.table[b0:b1])
        for t, x in ((self.k, k), (self.v, v)):
            n_s = ratio_count(t.ratio, n_elig)
            n_de = n_elig - n_s
            # per head: the n_s eligible blocks of least score become 2:4 (slots in block
            # order), then one fill kernel copies or compresses every block to its slot
            loss = None
            if n_s and not shared:
                gpu_loss = None
                kw = weight if t.name == "k" else None
                vw = vweight[:, :, :L].unsqueeze(-1) if t.name == "v" and vweight is not None else None
                if selection != "attention":  # weighted: the same float32 sums as the simulation's
                    gpu_loss = self._score(x, t.name) if kw is None and vw is None else \
                        block_prune_loss(x, t.name, S, None if kw is None else kw.unsqueeze(2), vw)
                loss = block_scores(selection, x, t.name, S, mass, gpu_loss).contiguous()
            if not shared:
                _kernels.select_blocks(self.lib, x, loss, first, n_elig, n_s, blocks, t.table[b0:b1])
            w = weight if t.name == "k" else vweight
            if t.e4m3:
                # select numbers the dense eligible blocks 0..n_de-1 and the others after them: the former go to
                # the e4m3 dense pool, the others keep the model-dtype one
                live = t.table[b0:b1, :, :blocks]
                live.copy_(torch.where(live < 0, live, torch.where(live < n_de, live + DENSE8, live - n_de)))
                _kernels.fill_blocks8(self.lib, x, t.name, t, S, t.table[b0:b1], slice(b0, b1), w)
            else:
                _kernels.fill_blocks(self.lib, x, t.name, t.table[b0:b1], S, t.dense[b0:b1], t.sparse_vals[b0:b1],
                                     t.sparse_meta[b0:b1], w)
            first_uniform = 0 if t.e4m3 else n_de  # the sink's and window's first model-dtype dense slot
            for b in range(b0, b1):
                t.n_sparse[b] = n_s
                t.uniform[b] = {blk: first_uniform + i for i, blk in enumerate(uniform)}
                t.free[b] = list(range(first_uniform + len(uniform), t.dense.shape[2]))
        for b in range(b0, b1):
            self._lengths[b] = L
            self.n_eligible[b] = n_elig

    def _token_mass(self, select_q: torch.Tensor, k: torch.Tensor, observed: list, scale, lse=None) -> torch.Tensor:
        """selection.token_mass of every sequence of a group (each ``k.shape[2]`` long), in one launch of the
        library's kernel (given the window rows' log-sum-exp, its second pass alone)."""
        L, W = k.shape[2], observed[0].shape[1]
        return _kernels.token_mass(self.lib, select_q[:, :, L - W:L], k, scale,
                                   None if lse is None else lse[:, :, L - W:L])

    def _score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Prune loss per whole block ``[1, H, L // block]`` (float32, on the GPU)."""
        return _kernels.score_blocks(self.lib, x, kind, self.block)

    # --- decode -------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one token per sequence (``[B, Hkv, D]`` each); a block leaving the window is
        re-tiered by each tensor's ratio. One kernel pair on the current stream, no host sync:
        safe to capture in a CUDA graph (see :meth:`sync` for what replays leave to do)."""
        self._check_dense(k, "k", 3)
        self._check_dense(v, "v", 3)
        for x, what in ((k, "k"), (v, "v")):
            if x.stride(2) != 1 or x.stride(0) % 8 or x.stride(1) % 8:
                raise InputError(f"{what}: strides {x.stride()} not supported (rows are read 16 bytes at a "
                                 f"time). Fix: pass {what}.contiguous()")
        # traced (graph capture, torch.compile): the host cannot follow, the device state rules
        traced = torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()
        if not traced:
            self.sync()
            check_not_full(self._lengths, self.max_seq_len)
        _kernels.append_cache(self.lib, self, k, v)
        if traced:  # replays advance the device state only
            self._stale = True
            return
        S = self.block
        for b in range(self.batch):  # the host copy of what the kernels just decided
            pos = self._lengths[b]
            if pos % S == 0:
                for t in (self.k, self.v):
                    t.uniform[b][pos // S] = t.free[b].pop()
            self._lengths[b] += 1
            if self._lengths[b] % S == 0:
                self._maybe_flush(b)

    def _maybe_flush(self, b: int) -> list:
        """Bookkeeping when a block leaves the window: it becomes eligible, and 2:4 by each
        tensor's ratio. Returns (tensor, block, dense slot, new table entry) for each tensor whose block
        moves (2:4, or an e4m3 tensor's block); the caller moves the data (the append kernel does it on
        the device)."""
        blk = self._lengths[b] // self.block - self.window_blocks - 1
        if blk < self.sink_blocks:
            return []
        self.n_eligible[b] += 1
        out = []
        for t in (self.k, self.v):
            due = t.n_sparse[b] < ratio_count(t.ratio, self.n_eligible[b])
            if not due and not t.e4m3:
                del t.uniform[b][blk]  # stays dense where it is
                continue
            # 2:4, or an e4m3 tensor's next dense e4m3 slot (its dense eligible blocks before this one)
            entry = -(t.n_sparse[b] + 1) if due else DENSE8 + self.n_eligible[b] - 1 - t.n_sparse[b]
            slot = t.uniform[b].pop(blk)
            out.append((t, blk, slot, entry))
            t.n_sparse[b] += 1 if due else 0
            t.free[b].append(slot)
        return out

    # --- host and device bookkeeping ----------------------------------------------------------
    def _push_ctrl(self) -> None:
        """Write the host bookkeeping into the device's ``ctrl`` (after host-side changes)."""
        ctrl = torch.zeros(self.ctrl.shape, dtype=torch.int32, pin_memory=torch.cuda.is_available())
        nd_k = self.k.dense.shape[2]
        for b in range(self.batch):
            ctrl[b, 0] = self.n_eligible[b]
            for z, t in enumerate((self.k, self.v)):
                ctrl[b, 1 + 2 * z] = t.n_sparse[b]
                ctrl[b, 2 + 2 * z] = len(t.free[b])
                at = _CTRL_STACK + (nd_k if z else 0)
                ctrl[b, at:at + len(t.free[b])] = torch.tensor(t.free[b], dtype=torch.int32)
        self.ctrl.copy_(ctrl, non_blocking=True)

    def sync(self) -> None:
        """Bring the host bookkeeping up to date after decode steps it did not see (replays of
        a captured step, compiled steps). Raises CacheFullError if such a step found a sequence
        full (its token was not stored; the sequence accepts no more until :meth:`reset`)."""
        if not self._stale:
            return
        ctrl = self.ctrl.cpu()
        lengths = self.seqlens.cpu().tolist()
        tables = [t.table[:, 0].cpu() for t in (self.k, self.v)]
        nd_k = self.k.dense.shape[2]
        for b in range(self.batch):
            self._lengths[b] = lengths[b]
            self.n_eligible[b] = int(ctrl[b, 0])
            blocks = -(-lengths[b] // self.block)
            for z, (t, table) in enumerate(zip((self.k, self.v), tables)):
                t.n_sparse[b] = int(ctrl[b, 1 + 2 * z])
                at = _CTRL_STACK + (nd_k if z else 0)
                t.free[b] = ctrl[b, at:at + int(ctrl[b, 2 + 2 * z])].tolist()
                # undecided dense blocks: the sink, and from the next block to leave the window on
                nxt = lengths[b] // self.block - self.window_blocks
                t.uniform[b] = {blk: int(e) for blk, e in enumerate(table[b, :blocks].tolist())
                                if e >= 0 and (blk < self.sink_blocks or blk >= nxt)}
        self._stale = False
        status = ctrl[:, _STATUS]
        if (status == 2).any():
            raise RuntimeError(f"cache bookkeeping found no free dense slot for sequences "
                               f"{torch.nonzero(status == 2).flatten().tolist()}; this is a bug")
        full = torch.nonzero(status == 1).flatten().tolist()
        if full:
            raise CacheFullError(f"sequences {full} reached the cache capacity {self.max_seq_len} during captured "
                                 f"decode steps; the tokens of the later steps were not stored. Fix: build the "
                                 f"cache with a larger max_seq_len, and reset() it")

    def attend(self, q: torch.Tensor, *, scale: float | None = None, num_splits: int | None = None):
        """Decode attention of ``q [B, Hq, D]`` over the cache. Returns (out, lse)."""
        return _kernels.decode_cache(self.lib, q, self, scale=scale, num_splits=num_splits)

    def reset(self) -> None:
        """Forget every sequence (pools are reused; stale data is never read)."""
        self._stale = False
        for t in (self.k, self.v):
            t.n_sparse = [0] * self.batch
            t.free = [list(range(t.dense.shape[2])) for _ in range(self.batch)]
            t.uniform = [{} for _ in range(self.batch)]
        self._lengths = [0] * self.batch
        self.n_eligible = [0] * self.batch
        if self.key_weight is not None:
            self.key_weight.fill_(1.0)
        self.weighted = [False] * self.batch
        self.value_weight.fill_(1.0)
        self._weighs_v = [False] * self.batch
        self.block_mass.fill_(float("inf"))
        self.seqlens.zero_()
        self._push_ctrl()

    def _check_queries(self, q, L: int) -> None:
        if not isinstance(q, torch.Tensor) or q.device != self.device:
            raise InputError(f"q: expected a tensor on {self.device}. Fix: move it to the cache's GPU")
        if q.dim() != 4 or q.shape[0] != self.batch or q.shape[2] != L or q.shape[3] != self.head_dim or \
                q.shape[1] % self.heads:
            raise InputError(f"q: shape {tuple(q.shape)} does not match the chunk. Fix: pass "
                             f"[{self.batch}, a multiple of {self.heads} heads, {L}, {self.head_dim}]")
        check_queries(q, self.batch, self.heads, self.head_dim, self.dtype)

    def _check_selectable(self, lengths: list[int]) -> None:
        """A prompt into an empty sequence is selected in one pass, over at most SELECT_MAX_ELIGIBLE blocks."""
        most = _kernels.SELECT_MAX_ELIGIBLE
        n = max((n for n0, n in zip(self._lengths, lengths) if n0 == 0), default=0)
        eligible = self._eligible(n // self.block)
        if eligible > most:
            first = (most + self.sink_blocks + self.window_blocks) * self.block  # the longest first chunk
            raise InputError(f"a prompt of {n} tokens into an empty sequence has {eligible} "
                             f"eligible {self.block}-token blocks; one prefill chooses among at most {most}, and "
                             f"nothing was written. Fix: prefill its first {first} tokens, then the rest in later "
                             f"prefill calls (they enter block by block, re-tiered as decode), or build a spec with "
                             f"larger blocks")

    def _check_lse(self, lse, select_q, L: int) -> None:
        if select_q is None:
            raise InputError("select_lse: given without the queries it belongs to. Fix: pass select_q= (or q=) too")
        want = (select_q.shape[0], select_q.shape[1], L)
        if not isinstance(lse, torch.Tensor) or lse.device != self.device or lse.dtype != torch.float32 or \
                tuple(lse.shape) != want:
            got = f"{tuple(lse.shape)} {lse.dtype} on {lse.device}" if isinstance(lse, torch.Tensor) else type(lse)
            raise InputError(f"select_lse: {got}, not the queries' log-sum-exp. Fix: pass float32 {list(want)} on "
                             f"{self.device} (the lse a causal attention over the prompt returns)")

    def _check_dense(self, x, what: str, dims: int) -> None:
        shape = (self.batch, self.heads, self.head_dim) if dims == 3 else None
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            raise InputError(f"{what}: expected a CUDA tensor. Fix: move it to the GPU")
        if x.dim() != dims or (shape and tuple(x.shape) != shape) or \
                (dims == 4 and (x.shape[0] != self.batch or x.shape[1] != self.heads or x.shape[3] != self.head_dim)):
            want = f"[{self.batch}, {self.heads}, {self.head_dim}]" if dims == 3 else \
                f"[{self.batch}, {self.heads}, L, {self.head_dim}]"
            raise InputError(f"{what}: shape {tuple(x.shape)} does not match the cache. Fix: pass {want}")
        if x.dtype != self.dtype:
            raise InputError(f"{what}: dtype {x.dtype} but the cache holds {self.dtype}. Fix: cast it")
