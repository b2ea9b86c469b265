"""Expand a validated spec into kernel variants: one translation unit each, readable names.

A variant is everything that changes one compiled kernel family: kind (decode attention or
compression), head_dim, GQA group, dtype, tier mix, arch and tiles. Kernels depend on the
group (query heads per KV head), not on the head counts, so shapes that share
(head_dim, group) share a variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import SpecError
from .spec import Spec, Tier
from .tiles import TileError, decode_tiles, prefill_tiles, wgmma_prefill_stages

DTYPE_TAG = {"float16": "f16", "bfloat16": "bf16"}
TIER_TAG = {"sparse24": "24", "dense": "d", "mixed": "m"}
#: after a tensor's tier tag, its storage when not the model's dtype
STORAGE_TAG = {"model": "", "float8_e4m3": "f8"}
SM90_PREFILL_TEMPLATE = "prefill_sm90.cu.j2"
#: Kernel families: the warp-level mma.sp kernels (any sm_80+ arch; also compression), the sm_90a
#: warpgroup kernels (wgmma.mma_async.sp, bulk/TMA copies), and the host-only runtime helpers.
FAMILIES = ("mma_sp", "wgmma", "host")
#: head_dims the sm_90a prefill kernel is written for (others use the warp-level kernels)
SM90_PREFILL_HEAD_DIMS = (128,)


# The compression kernels' ABI (bumped with their entry points: abi.SIGNATURES), and with the e4m3 packers.
COMPRESS_ABI = "compress7"
COMPRESS_E4M3_ABI = COMPRESS_ABI + "f8"


def c_abi(kind: str, family: str, tier: Tier | None, block_size: int = 0, fp8: bool = False) -> str:
    """The C signature set of a variant's entry points (the keys of abi.SIGNATURES).

    Warp-level prefill has one ABI for every tier mix (each of K and V is described by a source:
    table, pools, tail rows); the sm_90a kernels have one each: all-2:4 ("prefill_wgmma"), balanced
    = dense K + 2:4 V ("prefill_wgmma_balanced") and the cache's block-table tiers ("..._table")."""
    if kind == "runtime":
        return "runtime"
    if kind == "prefill" and family == "wgmma":
        return {"dense": "prefill_wgmma_balanced", "mixed": "prefill_wgmma_table"}.get(tier.k, "prefill_wgmma")
    if kind == "decode" and block_size:  # (+ the e4m3 pools of e4m3 tensors)
        return "decode_table8" if tier.e4m3 else "decode_table"
    if kind == "decode" and tier.e4m3:  # + the per-token scales of e4m3 tensors
        return "decode8"
    if kind == "compress":  # its fill entry points take the 2:4 choice's weights, the append K's
        return COMPRESS_E4M3_ABI if fp8 else COMPRESS_ABI
    return kind


def arch_capability(arch: str) -> tuple[int, int]:
    """(major, minor) of "sm_XY" or of the arch-specific "sm_XYa"."""
    n = int(arch[3:].rstrip("a"))
    return n // 10, n % 10


@dataclass(frozen=True)
class Variant:
    kind: str                      # "decode" | "prefill" | "compress" | "runtime"
    template: str                  # file under templates/
    arch: str                      # "sm_80", "sm_90", ...
    dtype: str                     # "float16" | "bfloat16"
    head_dim: int
    group: int = 0                 # decode: query heads per KV head
    tier: Tier | None = None       # decode: K and V tiers read
    block_size: int = 0            # decode over mixed tiers: tokens per cache block
    tiles: dict = field(default_factory=dict, hash=False, compare=False)
    family: str = "mma_sp"         # see FAMILIES
    fp8: bool = False              # compress: with the e4m3 packers (a spec with e4m3 tiers; sm_89+)
    abi: str = ""                  # C signature set of the entry points (see abi.py); derived when empty

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise SpecError(f"variant family {self.family!r} is unknown. Fix: use one of {', '.join(FAMILIES)}")
        if not self.abi:  # frozen: set once, here
            object.__setattr__(self, "abi", c_abi(self.kind, self.family, self.tier, self.block_size, self.fp8))

    @property
    def name(self) -> str:
        if self.kind == "runtime":
            return "runtime"
        d, t, a = f"d{self.head_dim}", DTYPE_TAG[self.dtype], self.arch.replace("_", "")
        if self.kind == "prefill":
            tier = f"k{TIER_TAG[self.tier.k]}_v{TIER_TAG[self.tier.v]}"
            if self.block_size:
                tier += f"_b{self.block_size}"
            if self.wgmma:  # the sm_90a family sits beside the warp-level kernel of the same tiers
                tier += "_wg"
            return f"prefill_{d}_g{self.group}_{t}_{tier}_{a}"
        if self.kind == "decode":
            tier = f"k{TIER_TAG[self.tier.k]}{STORAGE_TAG[self.tier.k_storage]}_v{TIER_TAG[self.tier.v]}" \
                   f"{STORAGE_TAG[self.tier.v_storage]}"
            if self.block_size:
                tier += f"_b{self.block_size}"
            return f"decode_{d}_g{self.group}_{t}_{tier}_{a}"
        return f"{self.kind}_{d}_{t}_{a}"

    @property
    def n_tiles(self) -> int:
        """MMA N tiles (8 columns each): the GQA group for decode, a warp's queries for prefill."""
        if self.kind == "prefill":
            return 8 if self.wgmma else self.tiles["warp_queries"] // 8  # wgmma: N = 64 queries a warpgroup
        return -(-self.group // 8)

    @property
    def symbol(self) -> str:
        """Prefix of the C entry points of this variant."""
        return f"hsg_{self.name}"

    @property
    def compute_capability(self) -> tuple[int, int]:
        return arch_capability(self.arch)

    @property
    def wgmma(self) -> bool:
        """The Hopper-only kernel family (sm_90a: wgmma.mma_async.sp, TMA-style bulk copies)."""
        return self.family == "wgmma"

    @property
    def entry_points(self) -> dict[str, str]:
        """C symbol -> what it does (recorded in the manifest)."""
        s = self.symbol
        if self.kind == "runtime":
            return {"hsg_device_count": "number of CUDA devices (cudaError_t)",
                    "hsg_error_string": "cudaGetErrorString",
                    "hsg_runtime_version": "CUDA runtime version linked in"}
        if self.kind == "prefill" and self.wgmma:
            what = {"sparse24": "all-2:4 K and V", "dense": "dense K (TMA) and 2:4 V",
                    "mixed": "the cache's block tables (dense and 2:4 blocks)"}[self.tier.k]
            return {s: f"causal prefill of whole prompts over {what} (wgmma, sm_90a)",
                    f"{s}_smem_bytes": "dynamic shared memory per CTA"}
        if self.kind == "prefill":
            return {s: "causal prefill of a query chunk (bottom-right aligned) over block tables",
                    f"{s}_smem_bytes": "dynamic shared memory per CTA"}
        if self.kind == "decode" and self.block_size:
            return {s: "split-KV decode over the block table (dense and 2:4 blocks) + combine",
                    f"{s}_smem_bytes": "dynamic shared memory per CTA",
                    f"{s}_threads": "threads per CTA"}
        if self.kind == "decode" and self.tier.e4m3:
            return {s: f"split-KV decode attention + combine (K {self.tier.k_storage}, V {self.tier.v_storage})",
                    f"{s}_smem_bytes": "dynamic shared memory per CTA",
                    f"{s}_threads": "threads per CTA"}
        if self.kind == "decode":
            return {s: "split-KV decode attention + combine",
                    f"{s}_smem_bytes": "dynamic shared memory per CTA",
                    f"{s}_threads": "threads per CTA"}
        e4m3 = {f"{s}_k8": "pack K 2:4 in e4m3 with per-token scales", f"{s}_v8": "pack V 2:4 in e4m3",
                 f"{s}_kd8": "pack K dense in e4m3", f"{s}_vd8": "pack V dense in e4m3",
                 f"{s}_fill_k8": "write K blocks into a cache with e4m3 pools by the block table",
                 f"{s}_fill_v8": "write V blocks into a cache with e4m3 pools by the block table",
                 f"{s}_append8": "one decode step into a cache with e4m3 pools"} if self.fp8 else {}
        return {**e4m3, f"{s}_k": "compress K (2:4 along head_dim)",
                f"{s}_v": "compress V (2:4 along tokens)",
                f"{s}_fill_k": "write K blocks into the cache pools by the block table",
                f"{s}_fill_v": "write V blocks into the cache pools by the block table",
                f"{s}_select": "choose each head's 2:4 blocks and fill the block table",
                f"{s}_score_k": "2:4 prune loss of K per cache block",
                f"{s}_score_v": "2:4 prune loss of V per cache block",
                f"{s}_token_mass": "attention mass per key of a prompt's last queries (the query-aware selection)",
                f"{s}_append": "one decode step into the cache: append K/V rows, re-tier a block leaving the window"}

    @property
    def spec_values(self) -> dict:
        """The spec values this variant came from (written into the generated header)."""
        values = {"kind": self.kind, "head_dim": self.head_dim, "dtype": self.dtype, "arch": self.arch}
        if self.kind == "prefill":
            values.update(group=self.group, k_tier=self.tier.k, v_tier=self.tier.v, **self.tiles)
            if self.block_size:
                values["block_size"] = self.block_size
        if self.kind == "decode":
            values.update(group=self.group, k_tier=self.tier.k, v_tier=self.tier.v, **self.tiles)
            if self.tier.e4m3:
                values.update(k_storage=self.tier.k_storage, v_storage=self.tier.v_storage)
            if self.block_size:
                values["block_size"] = self.block_size
        return values

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "arch": self.arch, "dtype": self.dtype,
                "head_dim": self.head_dim, "group": self.group or None,
                "tier": dict(zip(("k", "v", "k_storage", "v_storage"), self.tier.key)) if self.tier else None,
                "tiles": dict(self.tiles), "template": self.template, "block_size": self.block_size or None,
                "family": self.family, "abi": self.abi, "entry_points": self.entry_points}


def expand(spec: Spec) -> list[Variant]:
    """All variants of a spec, in a stable order, without duplicates."""
    # host-only helpers (device count, error strings), compiled once for the first arch
    runtime = Variant("runtime", "runtime.cu.j2", spec.archs[0], spec.dtypes[0], 0, family="host")
    out: dict[str, Variant] = {runtime.name: runtime}
    head_dims = sorted({s.head_dim for s in spec.shapes})
    groups = sorted({(s.head_dim, s.group) for s in spec.shapes})
    for arch in spec.archs:
        if arch.endswith("a"):
            _arch_specific(spec, arch, groups, out)
            if arch[:-1] in spec.archs:
                continue  # the warp-level kernels of sm_90 already run there
        _warp_level(spec, arch, head_dims, groups, out)
    return list(out.values())


#: cache block size the sm_90a block-table prefill reads (a block is one 64-key slab of the kernel)
SM90_TABLE_BLOCK = 64


def _arch_specific(spec: Spec, arch: str, groups, out: dict) -> None:
    """Kernels only an arch-specific target has: sm_90a's wgmma prefill over all-2:4 K and V and, as the
    warp-level family does for an all-2:4 tier, the balanced one (dense K rows, 2:4 V); over the cache's
    block tables when the spec has the mixed tier with 64-token blocks."""
    if "prefill" not in spec.phases:
        return
    tiers = []
    if any(t.k == t.v == "sparse24" and not t.e4m3 for t in spec.tiers):
        tiers += [(Tier("sparse24", "sparse24"), 0), (Tier("dense", "sparse24"), 0)]
    if any(t.k == "mixed" for t in spec.tiers) and spec.cache.block_size == SM90_TABLE_BLOCK:
        tiers.append((Tier("mixed", "mixed"), SM90_TABLE_BLOCK))
    for dtype in spec.dtypes:
        for d, g in groups:
            if d in SM90_PREFILL_HEAD_DIMS:
                for tier, block in tiers:
                    v = Variant("prefill", SM90_PREFILL_TEMPLATE, arch, dtype, d, g, tier, block_size=block,
                                tiles={"stages": wgmma_prefill_stages(tier.k)}, family="wgmma")
                    out.setdefault(v.name, v)


def _warp_level(spec: Spec, arch: str, head_dims, groups, out: dict) -> None:
    """The mma.sp kernels (any sm_80+ arch): compression, decode, prefill."""
    fp8 = any(t.e4m3 for t in spec.tiers)  # (the spec refuses e4m3 below sm_89)
    for dtype in spec.dtypes:
        for d in head_dims:
            v = Variant("compress", "compress.cu.j2", arch, dtype, d, fp8=fp8)
            out.setdefault(v.name, v)
        if "decode" in spec.phases:
            for d, g in groups:
                for tier in spec.tiers:
                    mixed = tier.k == "mixed"
                    try:
                        tiles = decode_tiles(d, g, arch, spec.decode.warps, spec.decode.stages,
                                             spec.decode.chunk_tokens, mixed=mixed, tier=tier)
                    except TileError as e:
                        raise SpecError(f"{spec.source}: decode: {e}") from None
                    v = Variant("decode", "decode_mixed.cu.j2" if mixed else "decode.cu.j2", arch, dtype,
                                d, g, tier, tiles=tiles.as_dict(),
                                block_size=spec.cache.block_size if mixed else 0)
                    out.setdefault(v.name, v)
        if "prefill" in spec.phases:
            for d, g in groups:
                for tier in _prefill_tiers(spec.tiers):
                    mixed = tier.k == "mixed"
                    try:
                        tiles = prefill_tiles(d, arch, tier.k, tier.v, **dataclasses.asdict(spec.prefill))
                    except TileError as e:
                        raise SpecError(f"{spec.source}: prefill: {e}") from None
                    v = Variant("prefill", "prefill.cu.j2", arch, dtype, d, g, tier, tiles=tiles.as_dict(),
                                block_size=spec.cache.block_size if mixed else 0)
                    out.setdefault(v.name, v)


def _prefill_tiers(tiers) -> list[Tier]:
    """Prefill kernels per spec tier: all-2:4 flat tensors also get the balanced kernel (dense K,
    2:4 V); the cache's mixed tiers get one table kernel (which also reads dense chunk rows); e4m3 tiers
    none yet (their kernels are decode's)."""
    out: list[Tier] = []
    for tier in tiers:
        if tier.e4m3:
            continue  # decode only, for now
        if tier.k == tier.v == "sparse24":
            out += [tier, Tier("dense", "sparse24")]
        else:
            out.append(tier)
    return out
