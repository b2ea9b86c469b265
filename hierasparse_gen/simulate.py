"""A pure-torch model of :class:`~hierasparse_gen.cache.HieraCache`: the same tier policy and
the same prefill modes, computed with dense tensors, per-block tier flags and the float64
reference attention. It runs anywhere torch runs (CPU included); the tests use it as the
independent account of what the kernels must compute, and it serves accuracy studies on
machines without a GPU. It keeps the cache as stored (2:4 blocks pruned) and updates it as rows
arrive and blocks re-tier, so a decode step costs one float64 attention over the live keys.

Policy (identical to HieraCache): the first ``sink`` tokens and the window are dense; of the
eligible blocks in between, ``ratio_count(ratio, eligible)`` per head are 2:4, chosen at a
first prefill by least score of the cache's ``selection`` (:mod:`hierasparse_gen.selection`;
ties: lower block) and, afterwards, as blocks leave the window (a block becomes 2:4 exactly
when that keeps the count at the ratio).

Storage (``key_storage``/``value_storage``): with ``"float8_e4m3"`` the eligible blocks of that
tensor, dense or 2:4, are held as :mod:`format_fp8` stores them (per-token scales), dequantized, so
attention reads exactly the values an e4m3 cache holds; the sink, the window and the newest partial
block stay in the model's dtype.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .format import block_prune_loss, prune_k, prune_v
from .format_fp8 import check_storage, fake_quantize
from .policy import (cache_nbytes, cache_settings, check_kernel, check_not_full, check_prefill_mode, check_ratios, check_room,
                     eligible_blocks, ratio_count)
from .reference import decode_reference, prefill_reference
from .selection import (block_scores, channel_weights, check_selection, mass_stats, needs_queries, observed_queries,
                        output_error, resolve, resolve_channels, resolve_tokens, retier_pick, token_mass)


class SimulatedCache:
    """Same constructor, prefill/append/attend and inspection API as HieraCache (no library)."""

    def __init__(self, lib=None, *, batch: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 key_ratio: float, value_ratio: float, dtype=torch.float16, device="cpu",
                 block_size: int = 64, sink: int = 64, local_window: int = 256,
                 selection: str = "auto", key_channels: str = "auto", observe: int = 64,
                 value_tokens: str = "auto", key_storage: str = "model", value_storage: str = "model"):
        block_size, sink, local_window = cache_settings(None, block_size, sink, local_window)
        check_ratios(key_ratio, value_ratio)
        check_selection(selection, key_channels, observe, value_tokens, simulation=True)
        self.selection, self.key_channels, self.observe = selection, key_channels, int(observe)
        self.value_tokens = value_tokens
        self.storage = {"k": check_storage(key_storage, "key_storage"),
                        "v": check_storage(value_storage, "value_storage")}
        self.batch, self.heads, self.head_dim, self.dtype = batch, num_kv_heads, head_dim, dtype
        self.block, self.sink, self.window, self.max_seq_len = block_size, sink, local_window, max_seq_len
        self.sink_blocks, self.window_blocks = sink // block_size, local_window // block_size
        self.max_blocks = -(-max_seq_len // block_size)
        cap = self.max_blocks * block_size
        self.ratio = {"k": key_ratio, "v": value_ratio}
        self.x = {n: torch.zeros(batch, num_kv_heads, cap, head_dim, dtype=dtype, device=device) for n in "kv"}
        # as stored: x with its 2:4 blocks pruned, kept current by every write and re-tiering (_restore)
        self.stored = {n: self.x[n].clone() for n in "kv"}
        self.sparse = {n: torch.zeros(batch, num_kv_heads, self.max_blocks, dtype=torch.bool, device=device)
                       for n in "kv"}
        self.n_sparse = {n: [0] * batch for n in "kv"}
        self.lengths = [0] * batch
        self.n_eligible = [0] * batch
        self.device = self.x["k"].device
        # per (sequence, head) weight of K's channels in the 2:4 choice (key_channels="query"; set at a first prefill)
        self.key_weight = torch.ones(batch, num_kv_heads, 1, head_dim, device=self.device)
        # per token weight of V's 2:4 choice (value_tokens="attention"; prompt tokens at a first prefill)
        self.value_weight = torch.ones(batch, num_kv_heads, cap, 1, device=self.device)
        # per block score of decode-time re-tiering (selection "attention": the prompt's blocks' attention
        # mass per visible query; inf: none, the leaving block becomes 2:4 as the count says)
        self.block_mass = torch.full((batch, num_kv_heads, self.max_blocks), float("inf"), device=self.device)

    # --- what the cache holds ---------------------------------------------------------------
    def view(self, name: str) -> torch.Tensor:
        """A copy of the tensor as stored: ``[B, Hkv, capacity, D]``, 2:4 blocks pruned (e4m3 blocks dequantized)."""
        return self.stored[name].clone()

    def _restore(self, name: str, b: int, t0: int, t1: int) -> None:
        """Recompute what sequence b stores of tokens [t0, t1) (t0 on a block boundary; whole blocks)."""
        t1 = -(-t1 // self.block) * self.block
        x = self.x[name][b, :, t0:t1]
        pruned = prune_k(x, self.key_weight[b]) if name == "k" else prune_v(x, self.value_weight[b, :, t0:t1])
        flags = self.sparse[name][b, :, t0 // self.block:t1 // self.block].repeat_interleave(self.block, -1)
        self.stored[name][b, :, t0:t1] = self._as_stored(name, b, t0, torch.where(flags.unsqueeze(-1), pruned, x))

    def _as_stored(self, name: str, b: int, t0: int, tiered: torch.Tensor) -> torch.Tensor:
        """Tokens [t0, t0 + n) of sequence b, dense or pruned by tier (``tiered [Hkv, n, D]``), in the tensor's
        storage: with e4m3, its eligible blocks (as counted now) go through e4m3 and back."""
        if self.storage[name] == "model":
            return tiered
        a = max(t0, self.sink_blocks * self.block)
        e = min(t0 + tiered.shape[1], (self.sink_blocks + self.n_eligible[b]) * self.block)
        if a < e:
            tiered = tiered.clone()
            tiered[:, a - t0:e - t0] = fake_quantize(tiered[:, a - t0:e - t0])
        return tiered

    def set_tiers(self, name: str, sparse: torch.Tensor) -> None:
        """Re-tier every block of K or V at once (``sparse [B, Hkv, max_blocks]``, True = 2:4): for studies of
        other block choices than the cache's own; the counts follow the flags."""
        blk = torch.arange(self.max_blocks, device=sparse.device)
        first = self.sink_blocks
        eligible = (blk >= first) & (blk < first + torch.tensor(self.n_eligible, device=sparse.device).view(-1, 1))
        if sparse.shape == self.sparse[name].shape and (sparse & ~eligible.unsqueeze(1)).any():
            raise InputError(f"set_tiers: a 2:4 flag outside the eligible blocks (full blocks between the sink and "
                             f"the window: {first} to {first} + {self.n_eligible}). Fix: flag only those; the sink, "
                             f"the window and the newest partial block stay dense")
        counts = sparse.sum(-1)
        if sparse.shape != self.sparse[name].shape or (counts != counts[:, :1]).any():
            raise InputError(f"set_tiers: flags of shape {tuple(sparse.shape)} with per-head counts {counts.tolist()}. "
                             f"Fix: pass {tuple(self.sparse[name].shape)} booleans, the same count of 2:4 blocks "
                             f"in every head of a sequence (the cache's pools are sized that way)")
        self.sparse[name].copy_(sparse)
        self.n_sparse[name] = [int(n) for n in counts[:, 0]]
        for b in range(self.batch):
            self._restore(name, b, 0, self.x[name].shape[2])

    def to_dense(self):
        L = max(self.lengths)
        return self.view("k")[:, :, :L], self.view("v")[:, :, :L]

    def tiers(self, name: str = "k") -> torch.Tensor:
        live = torch.arange(self.max_blocks, device=self.device).view(1, 1, -1) < torch.tensor(
            [-(-n // self.block) for n in self.lengths], device=self.device).view(-1, 1, 1)
        return self.sparse[name] & live

    def nbytes(self, itemsize: int | None = None) -> dict:
        """As HieraCache.nbytes: the bytes the kernels' cache would hold for these blocks (``itemsize``: bytes
        of a stored value, by default the dtype's; 2 accounts a float32 study as the fp16/bf16 cache)."""
        return cache_nbytes(block=self.block, head_dim=self.head_dim, itemsize=itemsize or self.dtype.itemsize,
                            batch=self.batch, heads=self.heads, max_blocks=self.max_blocks, lengths=self.lengths,
                            sparse_blocks={n: int(self.tiers(n).sum()) for n in "kv"},
                            storage=self.storage, eligible=sum(self.n_eligible) * self.heads)

    # --- insertion ----------------------------------------------------------------------------
    def _fresh(self, b: int, k: torch.Tensor, v: torch.Tensor, q_obs: torch.Tensor | None, scale) -> None:
        """An empty sequence takes a whole prompt: 2:4 blocks by least score, per head (``q_obs
        [Hq, W, D]``: the prompt's last queries, for the selections that read them)."""
        L, S = k.shape[1], self.block
        n_elig = eligible_blocks(L // S, self.sink_blocks, self.window_blocks)
        channels = resolve_channels(self.key_channels, q_obs is not None)
        if channels == "query":
            self.key_weight[b] = channel_weights(q_obs, self.heads).unsqueeze(1)
        selection = resolve(self.selection, q_obs is not None)
        mass = tokens = None
        # (no eligible block: nothing to weigh, nothing to choose)
        weigh_v = resolve_tokens(self.value_tokens, q_obs is not None) == "attention" and n_elig > 0
        if weigh_v or (selection in ("attention", "expected_error") and n_elig):
            tokens = token_mass(q_obs, k, scale)
            mass, mass_seen, weights = mass_stats(tokens, q_obs.shape[1], S)
            mass = mass.unsqueeze(0)
        if weigh_v:
            # every prompt token: the blocks eligible now at the fill, the others when they become 2:4 later
            # (the cache keeps the weights for its append kernel); later tokens weigh 1 (magnitudes)
            self.value_weight[b, :, :L, 0] = weights
        if selection == "attention" and tokens is not None:
            self.block_mass[b, :, :mass_seen.shape[1]] = mass_seen
        for name, x in (("k", k), ("v", v)):
            self.x[name][b, :, :L] = x
            n_s = ratio_count(self.ratio[name], n_elig)
            if n_s:
                kw = self.key_weight[b:b + 1] if name == "k" and channels == "query" else None
                vw = self.value_weight[b:b + 1, :, :L] if name == "v" and weigh_v else None
                loss = error = None
                if selection == "output_error":
                    error = output_error(q_obs, k, v, S, scale, name, None if kw is None else kw[0],
                                         None if vw is None else vw[0]).unsqueeze(0)
                elif selection != "attention":
                    loss = block_prune_loss(x.unsqueeze(0), name, S, kw, vw)
                score = block_scores(selection, x.unsqueeze(0), name, S, mass, loss, error)
                score = score[0, :, self.sink_blocks:self.sink_blocks + n_elig]
                chosen = torch.argsort(score, dim=-1, stable=True)[:, :n_s] + self.sink_blocks
                self.sparse[name][b].scatter_(1, chosen, True)
            self.n_sparse[name][b] = n_s
            self._restore(name, b, 0, L)
        self.lengths[b] = L
        self.n_eligible[b] = n_elig
        if "float8_e4m3" in self.storage.values():  # _restore ran before the eligible blocks were counted
            for name in "kv":
                self.stored[name][b, :, :L] = self._as_stored(name, b, 0, self.stored[name][b, :, :L])

    def _push(self, b: int, k: torch.Tensor, v: torch.Tensor, decode: bool = False) -> None:
        """Append rows ``[Hkv, n, D]`` one at a time, flushing as decode does (``decode``: an append, whose
        flush re-tiers by the blocks' masses; a chunk's flushes make the leaving block 2:4 by count)."""
        for i in range(k.shape[1]):
            pos = self.lengths[b]
            for name, x in (("k", k), ("v", v)):  # the newest block is in the window: dense
                self.x[name][b, :, pos] = x[:, i]
                self.stored[name][b, :, pos] = x[:, i]
            self.lengths[b] = pos + 1
            if self.lengths[b] % self.block == 0:
                blk = self.lengths[b] // self.block - self.window_blocks - 1
                if blk >= self.sink_blocks:
                    self.n_eligible[b] += 1
                    for name in "kv":
                        changed = {blk}
                        if self.n_sparse[name][b] < ratio_count(self.ratio[name], self.n_eligible[b]):
                            # per head, the least-mass dense eligible block (the leaving one included); an e4m3
                            # tensor's held dense blocks have lost the values a re-tiering would compress: by count
                            if decode and self.storage[name] == "model":
                                first = self.sink_blocks
                                dense = ~self.sparse[name][b, :, first:blk + 1]
                                pick = retier_pick(self.block_mass[b, :, first:blk + 1], dense, blk - first) + first
                                self.sparse[name][b, torch.arange(self.heads, device=pick.device), pick] = True
                                changed |= set(pick.tolist())
                            else:
                                self.sparse[name][b, :, blk] = True
                            self.n_sparse[name][b] += 1
                        # the block leaves the window: 2:4 or dense, in the tensor's storage (and a block
                        # re-tiered in its place)
                        for c in sorted(changed):
                            self._restore(name, b, c * self.block, (c + 1) * self.block)

    def _insert(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int], select_q=None, scale=None) -> None:
        fresh = [b for b, n in enumerate(lengths) if n and self.lengths[b] == 0]
        if fresh and select_q is None and needs_queries(self.selection, self.key_channels, self.value_tokens):
            raise InputError(f"selection {self.selection!r} with key_channels {self.key_channels!r} and value_tokens "
                             f"{self.value_tokens!r} chooses blocks by the prompt's queries, and this prefill has "
                             f"none. Fix: pass q= (or select_q=) with the prompt, or use selection='prune_loss', "
                             f"key_channels='magnitude', value_tokens='magnitude'")
        q_obs = observed_queries(select_q, lengths, self.observe) if select_q is not None else [None] * len(lengths)
        for b, n in enumerate(lengths):
            if n and self.lengths[b] == 0:
                self._fresh(b, k[b, :, :n], v[b, :, :n], q_obs[b], scale)
            elif n:
                self._push(b, k[b, :, :n], v[b, :, :n])

    # --- the HieraCache API -------------------------------------------------------------------
    def prefill(self, k, v, lengths=None, *, q=None, mode: str = "compress_then_attend", scale=None,
                kernel: str = "auto", select_q=None, select_lse=None):
        """As HieraCache.prefill (``kernel`` and ``select_lse`` are accepted for the same signature: the model has
        one kernel, and computes each window row's softmax itself)."""
        check_prefill_mode(mode)
        check_kernel(kernel)
        L = k.shape[2]
        lengths = [L] * self.batch if lengths is None else [int(n) for n in lengths]
        check_room(self.lengths, lengths, self.max_seq_len)
        old = list(self.lengths)
        after = torch.tensor([n0 + n for n0, n in zip(old, lengths)])
        qlens = torch.tensor(lengths)
        select_q = q if select_q is None else select_q
        if q is not None and mode == "attend_then_compress":
            keys, vals = self.view("k"), self.view("v")
            for b, (n0, n) in enumerate(zip(old, lengths)):
                keys[b, :, n0:n0 + n] = k[b, :, :n]
                vals[b, :, n0:n0 + n] = v[b, :, :n]
            self._insert(k, v, lengths, select_q, scale)
            return self._prefill_out(q, keys, vals, after, qlens, scale)
        self._insert(k, v, lengths, select_q, scale)
        if q is None:
            return None
        keys = self.view("k")
        if mode == "balanced":  # the chunk's keys dense, from the last 32-token boundary before it
            for b, (n0, n) in enumerate(zip(old, lengths)):
                keys[b, :, n0 - n0 % 32:n0 + n] = self.x["k"][b, :, n0 - n0 % 32:n0 + n]
        return self._prefill_out(q, keys, self.view("v"), after, qlens, scale)

    def _prefill_out(self, q, keys, vals, seqlens, qlens, scale):
        out, lse = prefill_reference(q, keys, vals, seqlens, scale, qlens)
        return out.to(q.dtype), lse.float()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        check_not_full(self.lengths, self.max_seq_len)
        for b in range(self.batch):
            self._push(b, k[b].unsqueeze(1), v[b].unsqueeze(1), decode=True)

    def attend(self, q: torch.Tensor, *, scale=None, num_splits=None):
        n = max(self.lengths)  # keys past every sequence's length are masked anyway
        out, lse = decode_reference(q, self.stored["k"][:, :, :n], self.stored["v"][:, :, :n],
                                    torch.tensor(self.lengths), scale)
        return out.to(q.dtype), lse.float()

    def sync(self) -> None:
        """Nothing to do: the simulation has no device-side state."""

    def reset(self) -> None:
        for name in "kv":
            self.sparse[name].zero_()
            self.stored[name].copy_(self.x[name])
            self.n_sparse[name] = [0] * self.batch
        self.lengths = [0] * self.batch
        self.n_eligible = [0] * self.batch
        self.key_weight.fill_(1.0)
        self.value_weight.fill_(1.0)
        self.block_mass.fill_(float("inf"))
