"""Load a built library (manifest + C-ABI .so) and pick the kernel variant for each call.

Dispatch explains itself: when no variant fits a call, the error lists every candidate of
that kind and why it was rejected, and names the spec entry that would add one.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

from .compiler import MANIFEST, build
from .errors import CudaError, DispatchError
from .variants import SM90_PREFILL_TEMPLATE, arch_capability

_c = ctypes
_i64, _i32, _f32, _f64, _p = _c.c_longlong, _c.c_int, _c.c_float, _c.c_double, _c.c_void_p

#: C signatures of the entry points, by variant kind and symbol suffix.
SIGNATURES = {
    ("decode", ""): [_p, _i64, _i64, _p, _p, _p, _p, _p, _i32, _i32, _i32, _f32, _i32,
                     _p, _p, _p, _i64, _i64, _p, _p],
    ("decode", "_smem_bytes"): [],
    ("decode", "_threads"): [],
    ("compress", "_k"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p, _p],
    ("compress", "_v"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p, _p],
    ("compress", "_fill_k"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _p, _i32, _i32, _p, _i32, _p, _p, _i32, _p],
    ("compress", "_fill_v"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _p, _i32, _i32, _p, _i32, _p, _p, _i32, _p],
    ("compress", "_select"): [_p, _i32, _i32, _i32, _i32, _i32, _i32, _p, _i32, _p],
    ("compress", "_score_k"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p],
    ("compress", "_score_v"): [_p, _i64, _i64, _i64, _i32, _i32, _i32, _i32, _p, _p],
    # k, its strides, v, its strides, seqlens, ctrl, ctrl_width, batch, heads, max_blocks, block,
    # sink/window blocks, max_len; K then V pools (table, dense, vals, meta, n_dense, n_sparse, ratio)
    ("compress", "_append"): [_p, _i64, _i64, _p, _i64, _i64, _p, _p, *[_i32] * 8,
                              *[_p, _p, _p, _p, _i32, _i32, _f64] * 2, _p],
    ("decode_mixed", ""): [_p, _i64, _i64, _p, _p, _i32, _p, _p, _i32, _i32, _p, _p, _p, _p, _i32, _i32,
                           _p, _i32, _i32, _f32, _i32, _p, _p, _p, _i64, _i64, _p, _p],
    # q, its strides; K then V source (table, max_blocks, block, dense, n_dense, vals, meta,
    # n_sparse, tail, tail strides x3, tail_start); seqlens, qlens, max_len, batch, Hq, Hkv, Lq,
    # scale, out, its strides, lse, stream
    ("prefill", ""): [_p, _i64, _i64, _i64,
                      *[_p, _i32, _i32, _p, _i32, _p, _p, _i32, _p, _i64, _i64, _i64, _p] * 2,
                      _p, _p, _i32, _i32, _i32, _i32, _i32, _f32, _p, _i64, _i64, _i64, _p, _p],
    ("prefill", "_smem_bytes"): [],
    # sm_90a wgmma prefill: q, its strides, K values, K meta, V values, V meta, capacity, batch, Hq, Hkv,
    # queries, scale, out, lse, stream
    ("prefill_sm90", ""): [_p, _i64, _i64, _i64, _p, _p, _p, _p, _i32, _i32, _i32, _i32, _i32, _f32, _p, _p, _p],
    ("prefill_sm90", "_smem_bytes"): [],
    # the same with dense K: q, its strides, K, its strides, K's token count, V values, V meta, capacity, ...
    ("prefill_sm90_kd", ""): [_p, _i64, _i64, _i64, _p, _i64, _i64, _i64, _i32, _p, _p, _i32, _i32, _i32, _i32,
                              _i32, _f32, _p, _p, _p],
    ("prefill_sm90_kd", "_smem_bytes"): [],
    # the same over the cache's block tables: q, its strides, K table, V table, max_blocks; K then V pools (dense,
    # n_dense, values, meta, n_sparse); dense K rows and their strides (or null: K's table); seqlens, qlens (or both
    # null); batch, Hq, Hkv, queries, scale, out, lse, stream
    ("prefill_sm90_table", ""): [_p, _i64, _i64, _i64, _p, _p, _i32, *[_p, _i32, _p, _p, _i32] * 2,
                                 _p, _i64, _i64, _i64, _p, _p, _i32, _i32, _i32, _i32, _f32, _p, _p, _p],
    ("prefill_sm90_table", "_smem_bytes"): [],
    ("decode_mixed", "_smem_bytes"): [],
    ("decode_mixed", "_threads"): [],
}


@dataclass(frozen=True)
class KernelVariant:
    """One variant of a built library, as recorded in its manifest."""
    name: str
    kind: str
    arch: str
    dtype: str
    head_dim: int
    group: int | None
    tier: tuple[str, str] | None
    tiles: dict
    symbol: str
    block_size: int = 0      # kernels over the block table (mixed tiers): cache block size
    smem_bytes: int = 0      # decode: dynamic shared memory per CTA (read from the library)
    threads: int = 0         # decode: threads per CTA
    template: str = ""

    @property
    def compute_capability(self) -> tuple[int, int]:
        return arch_capability(self.arch)

    @property
    def arch_specific(self) -> bool:
        """Built for an arch-specific target (sm_90a): runs on exactly that compute capability."""
        return self.arch.endswith("a")

    @property
    def wgmma(self) -> bool:
        return self.template == SM90_PREFILL_TEMPLATE

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """A cubin for sm_XY runs on devices of major X and minor >= Y; one for sm_XYa only on X.Y."""
        major, minor = self.compute_capability
        return cc[0] == major and (cc[1] == minor if self.arch_specific else cc[1] >= minor)


def _spec_hint(kind: str, **want) -> str:
    parts = []
    if "head_dim" in want:
        if kind == "decode" and "group" in want:
            parts.append(f"a shape with head_dim {want['head_dim']} and num_qo_heads/num_kv_heads "
                         f"= {want['group']} under `shapes`")
        else:
            parts.append(f"a shape with head_dim {want['head_dim']} under `shapes`")
    if "dtype" in want:
        parts.append(f"{want['dtype']} under `dtypes`")
    if "cc" in want:
        major, minor = want["cc"]
        parts.append(f"sm_{major}{minor} under `archs`")
    if "tier" in want:
        parts.append(f"{{k: {want['tier'][0]}, v: {want['tier'][1]}}} under `tiers`")
    if "block_size" in want:
        parts.append(f"cache.block_size {want['block_size']}")
    return "; ".join(parts)


class Library:
    """A loaded build: the manifest, the ctypes handle and dispatch."""

    def __init__(self, manifest_path: str | Path):
        manifest_path = Path(manifest_path)
        self.dir = manifest_path.parent
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot read build manifest {manifest_path}: {e}") from None
        self.path = (self.dir / self.manifest["library"]).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} is missing; rebuild with "
                                    f"`hierasparse-gen build {self.manifest.get('spec_source', 'SPEC')}`")
        self._cdll = ctypes.CDLL(str(self.path))
        self.variants: list[KernelVariant] = []
        self._picked: dict[tuple, KernelVariant] = {}  # dispatch memo: the manifest never changes
        for v in self.manifest["variants"]:
            tier = v.get("tier")
            symbol = f"hsg_{v['name']}"
            kind_key = "decode_mixed" if v["kind"] == "decode" and v.get("block_size") else v["kind"]
            if v.get("template") == SM90_PREFILL_TEMPLATE:
                kind_key = {"dense": "prefill_sm90_kd", "mixed": "prefill_sm90_table"}.get(tier["k"], "prefill_sm90")
            for (kind, suffix), argtypes in SIGNATURES.items():
                if kind == kind_key:
                    fn = getattr(self._cdll, symbol + suffix)
                    fn.argtypes, fn.restype = argtypes, _i32
            sizes = {}
            if v["kind"] == "decode":  # host-only queries, answered without a GPU
                sizes = dict(smem_bytes=getattr(self._cdll, symbol + "_smem_bytes")(),
                             threads=getattr(self._cdll, symbol + "_threads")())
            self.variants.append(KernelVariant(
                v["name"], v["kind"], v["arch"], v["dtype"], v["head_dim"], v.get("group"),
                (tier["k"], tier["v"]) if tier else None, v.get("tiles") or {}, symbol,
                v.get("block_size") or 0, **sizes, template=v.get("template", "")))
        self._cdll.hsg_device_count.argtypes = [_c.POINTER(_i32)]
        self._cdll.hsg_device_count.restype = _i32
        self._cdll.hsg_error_string.argtypes = [_i32]
        self._cdll.hsg_error_string.restype = _c.c_char_p
        from . import ops  # registers the torch custom ops
        ops.register_library(self)

    # --- introspection -------------------------------------------------------------------
    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def spec_name(self) -> str:
        return self.manifest["spec"]["name"]

    def __repr__(self) -> str:
        return f"Library({self.spec_name!r}, {len(self.variants)} variants, {self.path})"

    def function(self, symbol: str):
        return getattr(self._cdll, symbol)

    def error_string(self, code: int) -> str:
        return self._cdll.hsg_error_string(code).decode()

    def device_count(self) -> int:
        """Visible CUDA devices, or a CudaError that says why there are none."""
        n = _i32(0)
        code = self._cdll.hsg_device_count(_c.byref(n))
        if code != 0:
            raise CudaError(f"no CUDA device available to {self.path.name}: "
                            f"{self.error_string(code)} (cudaError {code})")
        return n.value

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise CudaError(f"{what} failed: {self.error_string(code)} (cudaError {code})", code)

    # --- dispatch --------------------------------------------------------------------------
    def find_wgmma_prefill(self, *, head_dim: int, dtype: str, cc: tuple[int, int], group: int,
                           tier: tuple[str, str] = ("sparse24", "sparse24")) -> KernelVariant | None:
        """The sm_90a prefill kernel for a whole-prompt call over these (K, V) tiers (all-2:4, dense K and 2:4 V,
        or the cache's block tables: ("mixed", "mixed")), if the library has one that runs here."""
        key = ("wgmma", head_dim, dtype, cc, group, tier)
        if key not in self._picked:
            self._picked[key] = next((v for v in self.variants if v.wgmma and v.head_dim == head_dim
                                      and v.dtype == dtype and v.group == group and v.tier == tier
                                      and v.runs_on(cc)), None)
        return self._picked[key]

    def select(self, kind: str, *, head_dim: int, dtype: str, cc: tuple[int, int],
               group: int | None = None, tier: tuple[str, str] | None = None,
               block_size: int | None = None) -> KernelVariant:
        """The best general variant for a call (the warp-level family; see find_wgmma_prefill for
        the sm_90a prefill kernel), or a DispatchError listing every rejection."""
        key = (kind, head_dim, dtype, cc, group, tier, block_size)
        if key in self._picked:
            return self._picked[key]
        fits, reasons = [], []
        for v in self.variants:
            if v.kind != kind or v.wgmma:
                continue
            why = []
            if v.head_dim != head_dim:
                why.append(f"head_dim {v.head_dim} != {head_dim}")
            if group is not None and v.group != group:
                why.append(f"GQA group {v.group} != {group}")
            if v.dtype != dtype:
                why.append(f"dtype {v.dtype} != {dtype}")
            if tier is not None and v.tier != tier:
                why.append(f"tiers k={v.tier[0]}, v={v.tier[1]} != k={tier[0]}, v={tier[1]}")
            if block_size is not None and v.tier == tier and v.block_size != block_size:
                why.append(f"cache block size {v.block_size} != {block_size}")
            if not v.runs_on(cc):
                why.append(f"built for {v.arch}, device is sm_{cc[0]}{cc[1]}")
            (reasons.append(f"  {v.name}: " + "; ".join(why)) if why else fits.append(v))
        if fits:
            self._picked[key] = max(fits, key=lambda v: v.compute_capability)
            return self._picked[key]
        want = dict(head_dim=head_dim, dtype=dtype, cc=cc)
        if group is not None:
            want["group"] = group
        if tier is not None:
            want["tier"] = tier
        if block_size is not None:
            want["block_size"] = block_size
        call = ", ".join(f"{k}={v}" for k, v in want.items())
        listing = "\n".join(reasons) if reasons else f"  (the library has no {kind} kernels)"
        raise DispatchError(
            f"no {kind} kernel in {self.path.name} fits this call ({call}). Candidates:\n{listing}\n"
            f"To add one, put {_spec_hint(kind, **want)} in the spec "
            f"({self.manifest.get('spec_source', 'its YAML')}) and rebuild.")

    # --- operations (see ops.py) ---------------------------------------------------------------
    def compress_k(self, k, capacity: int | None = None):
        """Prune K ``[B, Hkv, L, D]`` 2:4 along head_dim and pack it (GPU). Returns a PackedKV."""
        from .ops import compress
        return compress(self, k, "k", capacity)

    def compress_v(self, v, capacity: int | None = None):
        """Prune V ``[B, Hkv, L, D]`` 2:4 along tokens and pack it (GPU). Returns a PackedKV."""
        from .ops import compress
        return compress(self, v, "v", capacity)

    def prefill(self, q, k, v, seqlens=None, *, qlens=None, scale: float | None = None):
        """Causal attention of a query chunk ``q [B, Hq, Lq, D]`` (the last ``qlens[b]`` of
        ``seqlens[b]`` tokens) over packed 2:4 V and K packed (all-2:4) or dense (balanced).
        Returns (out, lse)."""
        from .ops import prefill
        return prefill(self, q, k, v, seqlens, qlens=qlens, scale=scale)

    def decode(self, q, k, v, seqlens=None, *, scale: float | None = None,
               num_splits: int | None = None, check_seqlens: bool = True):
        """Decode attention of ``q [B, Hq, D]`` over packed K and V. Returns (out, lse)."""
        from .ops import decode
        return decode(self, q, k, v, seqlens, scale=scale, num_splits=num_splits,
                      check_seqlens=check_seqlens)


_LOADED: dict[str, Library] = {}


def load(path_or_spec: str | Path, *, rebuild: bool = True, out_dir: str | Path | None = None) -> Library:
    """Load a build folder, a manifest.json, or a spec YAML (built first when needed)."""
    path = Path(path_or_spec)
    if path.suffix in (".yaml", ".yml"):
        if rebuild:
            manifest = build(path, out_dir=out_dir, log=None).manifest
        else:  # where `build` put it: generated/<spec name>/, not generated/
            from .compiler import build_dir
            from .spec import find_spec_file, load_spec
            manifest = Path(out_dir or build_dir(load_spec(find_spec_file(path)))) / MANIFEST
    elif path.is_dir():
        manifest = path / MANIFEST
    else:
        manifest = path
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST} at {manifest}: build it first with "
                                f"`hierasparse-gen build SPEC --out {manifest.parent}`")
    key = str(manifest.resolve())
    if key not in _LOADED:
        _LOADED[key] = Library(manifest)
    return _LOADED[key]
