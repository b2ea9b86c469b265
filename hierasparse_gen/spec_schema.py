"""What a spec may hold: the allowed values and the validated spec objects.

Standard library only (no PyYAML, no torch); :mod:`hierasparse_gen.spec` loads and checks specs
into these objects and re-exports every name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

# --------------------------------------------------------------------------
# Allowed values
# --------------------------------------------------------------------------

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")

HEAD_DIMS: tuple[int, ...] = tuple(range(64, 257, 32))
MAX_GROUP = 16

DTYPES: tuple[str, ...] = ("float16", "bfloat16")
DTYPE_ALIASES: dict[str, str] = {
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}

ARCHS: tuple[str, ...] = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
PHASES: tuple[str, ...] = ("decode", "prefill")
#: sparse24: every block 2:4 (flat packed tensors); mixed: per-block dense or 2:4, read
#: through the hierarchical cache's block table.
TIER_KINDS: tuple[str, ...] = ("sparse24", "mixed")
#: "dense" (every block dense) is a tier only of an e4m3 tensor (E4M3_TIER_MIXES): a dense model-dtype
#: tensor is what the dense attention kernels read.
#: (k, v) tier mixes that a decode template exists for.
TIER_MIXES: tuple[tuple[str, str], ...] = (("sparse24", "sparse24"), ("mixed", "mixed"))

BLOCK_SIZES: tuple[int, ...] = tuple(range(32, 257, 32))
WARPS_RANGE = (1, 8)
STAGES_RANGE = (2, 8)
CHUNK_TOKENS: tuple[int, ...] = (32, 64)

TOP_KEYS = ("name", "shapes", "dtypes", "archs", "phases", "tiers", "cache", "decode", "prefill")
REQUIRED_TOP_KEYS = ("name", "shapes", "archs")
SHAPE_KEYS = ("head_dim", "num_qo_heads", "num_kv_heads")
TIER_KEYS = ("k", "v")
#: optional per tensor: how its 2:4 (or eligible) blocks are stored
TIER_STORAGE_KEYS = ("k_storage", "v_storage")
#: "model": the model's dtype; "float8_e4m3": e4m3 with one float16 scale per token and KV head (format_fp8)
TIER_STORAGES: tuple[str, ...] = ("model", "float8_e4m3")
#: tier mixes whose kernels read e4m3 storage (decode: flat tensors, where a dense tensor must be e4m3, and the
#: cache's block tables)
E4M3_TIER_MIXES: tuple[tuple[str, str], ...] = (("sparse24", "sparse24"), ("dense", "dense"), ("dense", "sparse24"),
                                                ("mixed", "mixed"))
#: the first arch with e4m3 conversions (cvt ... e4m3x2) and FP8 tensor cores
E4M3_MIN_ARCH = (8, 9)
CACHE_KEYS = ("block_size", "sink", "local_window")
DECODE_KEYS = ("warps", "stages", "chunk_tokens")
PREFILL_KEYS = ("warp_queries", "stages", "chunk_tokens", "step_keys")
WARP_QUERIES: tuple[int, ...] = (16, 24, 32)
STEP_KEYS: tuple[int, ...] = (32, 64)
PREFILL_CHUNK_TOKENS: tuple[int, ...] = (32, 64, 128)


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    head_dim: int
    num_qo_heads: int
    num_kv_heads: int

    @property
    def group(self) -> int:
        """GQA group size: query heads per KV head."""
        return self.num_qo_heads // self.num_kv_heads


@dataclass(frozen=True)
class Tier:
    k: str  # "sparse24" or "mixed"
    v: str
    k_storage: str = "model"  # "model" or "float8_e4m3"
    v_storage: str = "model"

    @property
    def e4m3(self) -> bool:
        return "float8_e4m3" in (self.k_storage, self.v_storage)

    @property
    def key(self) -> tuple[str, ...]:
        """How the registry names this tier mix: (k, v), plus the two storages when one is e4m3."""
        return (self.k, self.v, self.k_storage, self.v_storage) if self.e4m3 else (self.k, self.v)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 64
    sink: int = 64
    local_window: int = 256


@dataclass(frozen=True)
class DecodeTiles:
    """Decode tile parameters; ``None`` means the tile oracle decides."""

    warps: int | None = None
    stages: int | None = None
    chunk_tokens: int | None = None


@dataclass(frozen=True)
class PrefillTiles:
    """Prefill tile parameters; ``None`` means the tile oracle decides."""

    warp_queries: int | None = None
    stages: int | None = None
    chunk_tokens: int | None = None
    step_keys: int | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    shapes: tuple[Shape, ...]
    dtypes: tuple[str, ...]
    archs: tuple[str, ...]
    phases: tuple[str, ...]
    tiers: tuple[Tier, ...]
    cache: CacheConfig
    decode: DecodeTiles
    prefill: PrefillTiles = PrefillTiles()
    source: str = "<spec>"

    def to_dict(self) -> dict:
        """Normalized plain dict (JSON-serializable), without ``source``.

        ``parse_spec(spec.to_dict())`` gives back an equal spec.
        """
        return {
            "name": self.name,
            "shapes": [dataclasses.asdict(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "archs": list(self.archs),
            "phases": list(self.phases),
            "tiers": [{"k": t.k, "v": t.v, **({"k_storage": t.k_storage, "v_storage": t.v_storage} if t.e4m3 else {})}
                      for t in self.tiers],
            "cache": dataclasses.asdict(self.cache),
            "decode": dataclasses.asdict(self.decode),
            "prefill": dataclasses.asdict(self.prefill),
        }
