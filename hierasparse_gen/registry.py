"""Load a built library (manifest + C-ABI .so) and pick the kernel variant for each call.

Dispatch explains itself: when no variant fits a call, the error lists every candidate of
that kind and why it was rejected, and names the spec entry that would add one.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

from .abi import ABIS, SIZE_QUERIES, declare, declare_runtime
from .compiler import MANIFEST, build
from .errors import BuildNotFoundError, CudaError, DispatchError
from .variants import FAMILIES, SM90_PREFILL_HEAD_DIMS, SM90_TABLE_BLOCK, arch_capability

_i32 = ctypes.c_int

#: The table of loaded libraries, by key (the library file's path): the custom ops receive a
#: library's key (a string traces through torch.compile) and look the library up here.
_LIBRARIES: dict[str, "Library"] = {}


def register(lib: "Library") -> None:
    _LIBRARIES[lib.key] = lib


def lookup(key: str) -> "Library":
    """The loaded library of a key (see :attr:`Library.key`)."""
    try:
        return _LIBRARIES[key]
    except KeyError:
        raise DispatchError(f"no library loaded under {key!r}. Fix: load it with hierasparse_gen.load(...) "
                            f"in this process") from None


@dataclass(frozen=True)
class KernelVariant:
    """One variant of a built library, as recorded in its manifest."""
    name: str
    kind: str
    arch: str
    dtype: str
    head_dim: int
    group: int | None
    tier: tuple[str, ...] | None  # (k, v), or (k, v, k_storage, v_storage) for e4m3 (spec_schema.Tier.key)
    tiles: dict
    symbol: str
    family: str              # "mma_sp" (warp-level), "wgmma" (sm_90a) or "host" (see variants.FAMILIES)
    abi: str                 # the C signature set of its entry points (see abi.py)
    block_size: int = 0      # kernels over the block table (mixed tiers): cache block size
    smem_bytes: int = 0      # decode: dynamic shared memory per CTA (read from the library)
    threads: int = 0         # decode: threads per CTA

    @property
    def compute_capability(self) -> tuple[int, int]:
        return arch_capability(self.arch)

    @property
    def arch_specific(self) -> bool:
        """Built for an arch-specific target (sm_90a): runs on exactly that compute capability."""
        return self.arch.endswith("a")

    @property
    def wgmma(self) -> bool:
        return self.family == "wgmma"

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """A cubin for sm_XY runs on devices of major X and minor >= Y; one for sm_XYa only on X.Y."""
        major, minor = self.compute_capability
        return cc[0] == major and (cc[1] == minor if self.arch_specific else cc[1] >= minor)


def _tier_text(tier: tuple[str, ...]) -> str:
    """k=sparse24, v=sparse24 (and the storages, when e4m3)."""
    return ", ".join(f"{n}={x}" for n, x in zip(("k", "v", "k_storage", "v_storage"), tier))


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
        parts.append("{" + _tier_text(want["tier"]).replace("=", ": ") + "} under `tiers`")
    if "block_size" in want:
        parts.append(f"cache.block_size {want['block_size']}")
    return "; ".join(parts)


class Library:
    """A loaded build: the manifest, the ctypes handle and dispatch (:meth:`select`). The torch ops
    over it live in :mod:`hierasparse_gen.ops`; :func:`hierasparse_gen.load` returns a
    :class:`hierasparse_gen.library.KernelLibrary`, this class with the ops as methods.

    ``cdll`` (tests): an object standing in for the ctypes library; the library file is then not opened.
    """

    def __init__(self, manifest_path: str | Path, *, cdll=None):
        manifest_path = Path(manifest_path)
        self.dir = manifest_path.parent
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise BuildNotFoundError(f"cannot read build manifest {manifest_path}: {e}. Fix: build it with "
                                     f"`hierasparse-gen build SPEC --out {self.dir}`") from None
        rebuild = f"`hierasparse-gen build {self.manifest.get('spec_source', 'SPEC')}`" \
            if isinstance(self.manifest, dict) else "`hierasparse-gen build SPEC`"
        if not (isinstance(self.manifest, dict) and isinstance(self.manifest.get("library"), str)
                and isinstance(self.manifest.get("variants"), list)
                and all(isinstance(v, dict) and {"name", "kind", "arch", "dtype", "head_dim"} <= v.keys()
                        for v in self.manifest["variants"])):
            raise BuildNotFoundError(f"{manifest_path} is not a build manifest of this hierasparse-gen version (no "
                                     f"library or variants). Fix: rebuild with {rebuild}")
        self.path = (self.dir / self.manifest["library"]).resolve()
        if cdll is None and not self.path.is_file():
            raise BuildNotFoundError(f"{self.path} is missing. Fix: rebuild with {rebuild}")
        self._cdll = ctypes.CDLL(str(self.path)) if cdll is None else cdll
        self.variants: list[KernelVariant] = []
        self._picked: dict[tuple, KernelVariant | str] = {}  # dispatch memo (a str: the refusal)
        for v in self.manifest["variants"]:
            if v.get("family") not in FAMILIES or v.get("abi") not in ABIS:
                raise BuildNotFoundError(
                    f"{manifest_path}: variant {v.get('name')!r} has no kernel family or C ABI this version knows "
                    f"(family {v.get('family')!r}, abi {v.get('abi')!r}): the build is from an older "
                    f"hierasparse-gen. Fix: rebuild with {rebuild}")
            tier = v.get("tier")
            symbol = f"hsg_{v['name']}"
            declare(self._cdll, symbol, v["abi"])
            # host-only size queries, answered without a GPU
            sizes = {suffix[1:]: getattr(self._cdll, symbol + suffix)() for suffix in SIZE_QUERIES.get(v["abi"], ())}
            self.variants.append(KernelVariant(
                v["name"], v["kind"], v["arch"], v["dtype"], v["head_dim"], v.get("group"),
                tuple(tier.values()) if tier else None, v.get("tiles") or {}, symbol, v["family"], v["abi"],
                v.get("block_size") or 0, **sizes))
        declare_runtime(self._cdll)
        register(self)

    # --- introspection -------------------------------------------------------------------
    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def spec_name(self) -> str:
        return self.manifest["spec"]["name"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec_name!r}, {len(self.variants)} variants, {self.path})"

    def function(self, symbol: str):
        return getattr(self._cdll, symbol)

    def error_string(self, code: int) -> str:
        return self._cdll.hsg_error_string(code).decode()

    def device_count(self) -> int:
        """Visible CUDA devices, or a CudaError that says why there are none."""
        n = _i32(0)
        code = self._cdll.hsg_device_count(ctypes.byref(n))
        if code != 0:
            raise CudaError(f"no CUDA device available to {self.path.name}: "
                            f"{self.error_string(code)} (cudaError {code}). Fix: run on a machine with an "
                            f"NVIDIA GPU and its driver")
        return n.value

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise CudaError(f"{what} failed: {self.error_string(code)} (cudaError {code})", code)

    # --- dispatch --------------------------------------------------------------------------
    def select(self, kind: str, *, head_dim: int, dtype: str, cc: tuple[int, int],
               group: int | None = None, tier: tuple[str, ...] | None = None,
               block_size: int | None = None, family: str | None = None) -> KernelVariant:
        """The variant for a call, of any family (``family``: only that one, "mma_sp" or "wgmma"), or a
        DispatchError listing every candidate of the kind and why it was rejected.

        Among fitting variants: the newest arch, then the warp-level family (it takes every call shape;
        whether a call is one the sm_90a kernels take is the caller's to say, see ops.prefilling)."""
        key = (kind, head_dim, dtype, cc, group, tier, block_size, family)
        picked = self._picked.get(key)
        if picked is None:
            picked = self._picked[key] = self._select(kind, head_dim, dtype, cc, group, tier, block_size, family)
        if isinstance(picked, str):
            raise DispatchError(picked)
        return picked

    def find(self, kind: str, **want) -> KernelVariant | None:
        """:meth:`select`, or None where no variant fits."""
        try:
            return self.select(kind, **want)
        except DispatchError:
            return None

    def _select(self, kind, head_dim, dtype, cc, group, tier, block_size, family) -> KernelVariant | str:
        fits, reasons = [], []
        for v in self.variants:
            if v.kind != kind:
                continue
            why = []
            if family is not None and v.family != family:
                why.append(f"family {v.family}, not {family}")
            if v.head_dim != head_dim:
                why.append(f"head_dim {v.head_dim} != {head_dim}")
            if group is not None and v.group != group:
                why.append(f"GQA group {v.group} != {group}")
            if v.dtype != dtype:
                why.append(f"dtype {v.dtype} != {dtype}")
            if tier is not None and v.tier != tier:
                why.append(f"tiers {_tier_text(v.tier)} != {_tier_text(tier)}")
            if block_size is not None and v.tier == tier and v.block_size != block_size:
                why.append(f"cache block size {v.block_size} != {block_size}")
            if not v.runs_on(cc):
                why.append(f"built for {v.arch}, device is sm_{cc[0]}{cc[1]}")
            (reasons.append(f"  {v.name}: " + "; ".join(why)) if why else fits.append(v))
        if fits:
            return max(fits, key=lambda v: (v.compute_capability, v.family == "mma_sp"))
        want = dict(head_dim=head_dim, dtype=dtype, cc=cc)
        if group is not None:
            want["group"] = group
        if tier is not None:
            want["tier"] = tier
        if block_size is not None:
            want["block_size"] = block_size
        call = ", ".join(f"{k}={v}" for k, v in want.items()) + (f", family={family}" if family else "")
        listing = "\n".join(reasons) if reasons else f"  (the library has no {kind} kernels)"
        hint = _spec_hint(kind, **want)
        if family == "wgmma":
            hint += ("; sm_90a under `archs` (the wgmma kernels take head_dim "
                     f"{', '.join(map(str, SM90_PREFILL_HEAD_DIMS))}, and cache.block_size {SM90_TABLE_BLOCK} for the "
                     "block-table one)")
        return (f"no {kind} kernel{f' of the {family} family' if family else ''} in {self.path.name} fits this "
                f"call ({call}). Candidates:\n{listing}\nFix: put {hint} in the spec "
                f"({self.manifest.get('spec_source', 'its YAML')}) and rebuild.")


_LOADED: dict[tuple[str, type], Library] = {}


def load(path_or_spec: str | Path, *, rebuild: bool = True, out_dir: str | Path | None = None,
         library_class: type[Library] = Library) -> Library:
    """Load a build folder, a manifest.json, or a spec YAML (built first when needed), as a
    ``library_class`` (hierasparse_gen.load passes the class with the torch ops)."""
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
        raise BuildNotFoundError(f"no {MANIFEST} at {manifest}. Fix: build it first with "
                                 f"`hierasparse-gen build SPEC --out {manifest.parent}`")
    key = (str(manifest.resolve()), library_class)
    if key not in _LOADED:
        _LOADED[key] = library_class(manifest)
    return _LOADED[key]
