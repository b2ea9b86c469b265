"""The one tile-size oracle: maps a kernel shape to default tiles; specs may override.

Prefill is compute-bound: each warp keeps as many queries as its registers allow (Q^T
fragments, the O^T accumulators and one 32-key score tile), so that every K/V byte it reads
from shared memory feeds more MMAs. Decode is memory-bound, so the tiles are chosen for bytes in flight, not for FLOPs: each
warp keeps ``stages - 1`` chunks of ``chunk_tokens`` tokens (K and V values plus
metadata) in flight through cp.async. On sm_90 the defaults let two CTAs share an SM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .errors import TileError

#: Shared memory a CTA may opt in to, per arch (bytes).
SMEM_PER_BLOCK = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024,
                  "sm_90a": 227 * 1024}
#: Shared memory per SM, per arch (bytes); each resident CTA also reserves 1 KiB.
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_86": 100 * 1024, "sm_89": 100 * 1024, "sm_90": 228 * 1024,
               "sm_90a": 228 * 1024}


@dataclass(frozen=True)
class DecodeTiles:
    warps: int
    stages: int
    chunk_tokens: int

    def as_dict(self) -> dict:
        return {"warps": self.warps, "stages": self.stages, "chunk_tokens": self.chunk_tokens}


def token_bytes(head_dim: int, tier: str = "sparse24", storage: str = "model") -> int:
    """Bytes one token of one flat decode stream (K or V) stages: 2:4 values + metadata in the model
    dtype (D + D/8), in e4m3 (D/2 + D/8, + a 2-byte scale), or dense e4m3 (D + the scale)."""
    if storage == "float8_e4m3":
        return (head_dim if tier == "dense" else head_dim // 2 + head_dim // 8) + 2
    return head_dim + head_dim // 8


def decode_stage_bytes(head_dim: int, chunk_tokens: int, mixed: bool = False, tier=None) -> int:
    """Bytes of one pipeline stage of one warp.

    Flat tiers: K's and V's bytes per token (:func:`token_bytes`; ``tier`` None is all-2:4 in the
    model dtype). Mixed tiers: a stage is room for one all-2:4 chunk in the warp's byte ring (a dense
    chunk takes 16/9 of a stage)."""
    if mixed or tier is None:
        return 2 * chunk_tokens * token_bytes(head_dim)
    return chunk_tokens * (token_bytes(head_dim, tier.k, tier.k_storage) + token_bytes(head_dim, tier.v, tier.v_storage))


def decode_smem_bytes(head_dim: int, group: int, tiles: DecodeTiles, mixed: bool = False, tier=None) -> int:
    """Dynamic shared memory of a decode CTA (the pipeline, or the warp-merge scratch if larger)."""
    pipeline = tiles.warps * (tiles.stages * decode_stage_bytes(head_dim, tiles.chunk_tokens, mixed, tier)
                              + (128 if mixed else 0))
    n_tiles = -(-group // 8)
    merge = tiles.warps * n_tiles * 8 * (head_dim + 2) * 4
    return max(pipeline, merge)


def ctas_per_sm(arch: str, smem_bytes: int, threads: int) -> int:
    by_smem = SMEM_PER_SM[arch] // (smem_bytes + 1024)
    return max(0, min(by_smem, 2048 // threads, 32))


@lru_cache(maxsize=4096)  # pure, and on every decode call's host path
def choose_splits(batch_heads: int, chunks: int, warps: int, sms: int, resident: int) -> int:
    """Splits of the sequence per (batch, kv head) for a memory-bound decode (the launch-time half of
    the decode tiles: ``chunks`` of the variant's ``chunk_tokens``, its ``warps``, the GPU's ``sms``,
    ``resident`` CTAs an SM from :func:`ctas_per_sm`).

    Every SM should stream the same number of bytes, so the CTA count should be a multiple
    of the SM count (at most ``resident`` CTAs an SM at once). Among split counts whose
    balance is within 5 % of the best, take the smallest (fewer partials to merge). Few
    (batch, head) pairs get no more than half the SMs' worth of splits each, and every warp at
    least two chunks on average: a CTA's fixed costs (pipeline fill, merge, partial write)
    and the combine's reads grow with the splits, and half the SMs still pull the bandwidth
    (H100, one KV head, 8 warps, B=1, the combine a programmatic dependent launch: at 32K group 8
    10.7 us with 64 splits against 12.3 with 32 and 12.2 with 128, group 16 13.3 against 15.3 and
    15.3; at 128K group 8 21.8 with 64 against 23.2 with 128; experiments/tile_sweeps).
    """
    most = max(1, min(256, chunks // (2 * warps), sms // 2))
    slots = sms * max(1, resident)
    balance = []
    for s in range(1, most + 1):
        ctas = batch_heads * s
        rounds = math.ceil(ctas / sms)  # CTAs per SM, rounded up
        waves = math.ceil(ctas / slots)
        even = chunks / (s * math.ceil(chunks / s))  # the longest split sets the time
        balance.append(even * ctas / (rounds * sms) / waves ** 0.25 if ctas >= 1 else 0.0)
    top = max(balance)
    return next(s for s, b in enumerate(balance, 1) if b >= 0.95 * top)


def decode_tiles(head_dim: int, group: int, arch: str, warps: int | None = None,
                 stages: int | None = None, chunk_tokens: int | None = None,
                 mixed: bool = False, tier=None) -> DecodeTiles:
    """Default decode tiles for a shape, with any spec overrides applied and checked.

    The most warps (up to 8) whose 2-stage pipelines fit one CTA, with 32-token chunks; a stage
    holds the bytes the tier's storage puts in a chunk.
    """
    chunk = 32 if mixed else (chunk_tokens or 32)  # mixed: a chunk never straddles two blocks
    # Many warps with small pipelines: measured best or level with the rest everywhere it was tried.
    # H100, B=8, L=32K (experiments/tile_sweeps, experiments/fp8_tiles): 2:4 e4m3 8 x 2 120 us against
    # 4 x 4 205 us; dense e4m3 186 against 205; 2:4 fp16 198.4 against 200.5 (4 x 3); one KV head, group 8,
    # B=1 at 128K 25.5 against 28.9; mixed tiers on the H200: 8 x 2 148 us, 6 x 4 151 us, 4 x 5 167 us.
    warp_choices = [warps] if warps else [8, 6, 4, 2, 1]
    options = [DecodeTiles(w, stages or 2, chunk) for w in warp_choices]

    def residency(t: DecodeTiles) -> int:
        need = decode_smem_bytes(head_dim, group, t, mixed, tier)
        return 0 if need > SMEM_PER_BLOCK[arch] else ctas_per_sm(arch, need, t.warps * 32)

    for t in options:
        if residency(t) >= 1:
            return t
    t = options[-1]
    raise TileError(
        f"decode tiles warps={t.warps}, stages={t.stages}, chunk_tokens={t.chunk_tokens} need "
        f"{decode_smem_bytes(head_dim, group, t, mixed, tier)} bytes of shared memory for head_dim {head_dim}, "
        f"but {arch} allows {SMEM_PER_BLOCK[arch]}; lower decode.stages, decode.warps or "
        f"decode.chunk_tokens in the spec (or leave them out to let the tile oracle choose)")


@dataclass(frozen=True)
class PrefillTiles:
    warps: int
    stages: int
    chunk_tokens: int
    warp_queries: int
    step_keys: int
    min_ctas: int

    def as_dict(self) -> dict:
        return {"warps": self.warps, "stages": self.stages, "chunk_tokens": self.chunk_tokens,
                "warp_queries": self.warp_queries, "step_keys": self.step_keys, "min_ctas": self.min_ctas}


def wgmma_prefill_stages(k_tier: str) -> int:
    """Stage ring depth of the sm_90a prefill kernels, measured at 32K on an H200: all-2:4 4 (5 and 6 ~1 %
    slower), dense K (balanced) 5 (+1 % over 4; 3 starves the pipelined loop: -25 %), block tables 4 (34 KB
    stages)."""
    return {"sparse24": 4, "dense": 5, "mixed": 4}[k_tier]


def prefill_piece_bytes(head_dim: int, tier: str) -> int:
    """Shared memory of one 32-token piece of K or V: dense rows, or 2:4 values + metadata."""
    return 32 * head_dim * 2 if tier != "sparse24" else 32 * head_dim + 32 * head_dim // 8


def prefill_smem_bytes(head_dim: int, k_tier: str, v_tier: str, t: PrefillTiles) -> int:
    pipeline = t.stages * (t.chunk_tokens // 32) * (prefill_piece_bytes(head_dim, k_tier)
                                                     + prefill_piece_bytes(head_dim, v_tier))
    staged_out = t.warps * t.warp_queries * (head_dim + 8) * 2
    return max(pipeline, staged_out)


def _prefill_registers(head_dim: int, warp_queries: int) -> int:
    """Estimated registers a thread: per 8 queries, 3D/8 of Q^T fragments and O^T accumulators
    plus about 14 of scores and softmax state; about 40 of addresses and loop state."""
    return warp_queries // 8 * (3 * head_dim // 8 + 14) + 40


def prefill_warp_queries(head_dim: int) -> int:
    """Queries a warp: the most (32, 24 or 16) whose registers fit (the estimate above). At
    head_dim 128, 32 queries spilled (376 bytes) and 24 compiled to 234-254 registers."""
    for q in (32, 24):
        if _prefill_registers(head_dim, q) <= 240:
            return q
    return 16


def prefill_tiles(head_dim: int, arch: str, k_tier: str, v_tier: str, warp_queries: int | None = None,
                  stages: int | None = None, chunk_tokens: int | None = None,
                  step_keys: int | None = None) -> PrefillTiles:
    """Default prefill tiles: 4 warps of as many queries as fit the registers, and the first of
    64-key stages x 3, x 2, 32-key stages x 3, x 2 that leaves two CTAs on an SM (each CTA then
    gets up to 255 registers a thread), else one CTA."""
    warp_queries = warp_queries or prefill_warp_queries(head_dim)
    # Measured on the H200 (benchmarks/RESULTS.md, head_dim 128, 24 queries a warp): 128-key
    # stages x 2 with 64-key softmax steps beat 64-key stages x 3 (438 against 397
    # TFLOP/s all-2:4): fewer barriers and more independent MMAs between them. Smaller stages
    # only where the shared memory asks for them (dense pieces take 16 KiB a piece).
    shapes = [(c, n) for c, n in ((128, 2), (64, 3), (64, 2), (32, 3), (32, 2))
              if (chunk_tokens or c) == c and (stages or n) == n]
    if not shapes:
        shapes = [(chunk_tokens or 64, stages or 2)]
    # three CTAs an SM (168 registers a thread) when the estimate leaves room, else two (255)
    ctas = (3, 2, 1) if _prefill_registers(head_dim, warp_queries) <= 168 else (2, 1)
    for min_ctas in ctas:
        for chunk, n in shapes:
            # 64-key softmax steps when their scores (8 more registers per 8 queries) still fit
            wide = _prefill_registers(head_dim, warp_queries) + warp_queries <= 255
            step = min(step_keys or (64 if wide else 32), chunk)
            t = PrefillTiles(4, n, chunk, warp_queries, step, min_ctas)
            need = prefill_smem_bytes(head_dim, k_tier, v_tier, t)
            if need <= SMEM_PER_BLOCK[arch] and ctas_per_sm(arch, need, 128) >= min_ctas:
                return t
    raise TileError(f"prefill tiles for head_dim {head_dim} ({k_tier} K, {v_tier} V) need {need} bytes of "
                    f"shared memory, but {arch} allows {SMEM_PER_BLOCK[arch]}")
