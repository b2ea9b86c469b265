"""The one tile-size oracle: maps a kernel shape to default tiles; specs may override.

Decode is memory-bound, so the tiles are chosen for bytes in flight, not for FLOPs: each
warp keeps ``stages - 1`` chunks of ``chunk_tokens`` tokens (K and V values plus
metadata) in flight through cp.async. On sm_90 the defaults let two CTAs share an SM.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Shared memory a CTA may opt in to, per arch (bytes).
SMEM_PER_BLOCK = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
#: Shared memory per SM, per arch (bytes); each resident CTA also reserves 1 KiB.
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_86": 100 * 1024, "sm_89": 100 * 1024, "sm_90": 228 * 1024}


@dataclass(frozen=True)
class DecodeTiles:
    warps: int
    stages: int
    chunk_tokens: int

    def as_dict(self) -> dict:
        return {"warps": self.warps, "stages": self.stages, "chunk_tokens": self.chunk_tokens}


class TileError(ValueError):
    """Tiles that no CTA of the target arch can hold."""


def decode_stage_bytes(head_dim: int, chunk_tokens: int, mixed: bool = False) -> int:
    """Bytes of one pipeline stage of one warp.

    All-2:4: K and V values (D bytes a token) + metadata (D/8). Mixed tiers: a stage is room
    for one all-2:4 chunk in the warp's byte ring (a dense chunk takes 16/9 of a stage)."""
    return 2 * (chunk_tokens * head_dim + chunk_tokens * head_dim // 8)


def decode_smem_bytes(head_dim: int, group: int, tiles: DecodeTiles, mixed: bool = False) -> int:
    """Dynamic shared memory of a decode CTA (the pipeline, or the warp-merge scratch if larger)."""
    pipeline = tiles.warps * (tiles.stages * decode_stage_bytes(head_dim, tiles.chunk_tokens, mixed)
                              + (128 if mixed else 0))
    n_tiles = -(-group // 8)
    merge = tiles.warps * n_tiles * 8 * (head_dim + 2) * 4
    return max(pipeline, merge)


def ctas_per_sm(arch: str, smem_bytes: int, threads: int) -> int:
    by_smem = SMEM_PER_SM[arch] // (smem_bytes + 1024)
    return max(0, min(by_smem, 2048 // threads, 32))


def decode_tiles(head_dim: int, group: int, arch: str, warps: int | None = None,
                 stages: int | None = None, chunk_tokens: int | None = None,
                 mixed: bool = False) -> DecodeTiles:
    """Default decode tiles for a shape, with any spec overrides applied and checked.

    All-2:4: 4 warps, 32-token chunks, and the deepest pipeline (up to 4 stages) that keeps
    two CTAs on an SM; failing that, one CTA; fewer warps only when nothing fits. Mixed tiers:
    the most warps (up to 8) whose 2-stage rings fit one CTA.
    """
    chunk = 32 if mixed else (chunk_tokens or 32)  # mixed: a chunk never straddles two blocks
    if mixed:
        # Mixed tiers: many warps with a small byte ring (2 all-2:4 chunks, or one all-dense)
        # beat few warps with deep rings: measured on the H200 at B=8, L=32K, all-2:4,
        # 8 warps x 2 stages 148 us, 6 x 4 151 us, 4 x 5 167 us (benchmarks/RESULTS.md).
        warp_choices = [warps] if warps else [8, 6, 4, 2, 1]
        stage_choices = [stages] if stages else [2, 3]
    else:
        warp_choices = [warps] if warps else [4, 2, 1]
        stage_choices = [stages] if stages else [4, 3, 2]
    options = [DecodeTiles(w, s, chunk) for w in warp_choices for s in stage_choices]

    def residency(t: DecodeTiles) -> int:
        need = decode_smem_bytes(head_dim, group, t, mixed)
        return 0 if need > SMEM_PER_BLOCK[arch] else ctas_per_sm(arch, need, t.warps * 32)

    for t in ([] if mixed else options):  # all-2:4: two CTAs an SM when possible
        if residency(t) >= 2:
            return t
    for t in options:
        if residency(t) >= 1:
            return t
    t = options[-1]
    raise TileError(
        f"decode tiles warps={t.warps}, stages={t.stages}, chunk_tokens={t.chunk_tokens} need "
        f"{decode_smem_bytes(head_dim, group, t, mixed)} bytes of shared memory for head_dim {head_dim}, "
        f"but {arch} allows {SMEM_PER_BLOCK[arch]}; lower decode.stages, decode.warps or "
        f"decode.chunk_tokens in the spec (or leave them out to let the tile oracle choose)")
