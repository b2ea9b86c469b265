"""Compile rendered variants with nvcc and link one plain C-ABI shared library + manifest.

* One variant per translation unit, compiled in parallel; objects are named by a content
  hash of everything that changes the binary (source, flags, nvcc and CUTLASS versions,
  arch), so an unchanged variant is never recompiled and a changed tile recompiles only
  the variants it touches. Modification times play no part.
* A cross-process file lock serialises builds of one output folder; every file is written
  under a temporary name and renamed into place, so readers never see half a file.
* cudart is linked statically and only the ``extern "C"`` launchers are exported: the
  library loads with ctypes next to any torch build.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import BuildNotFoundError, CompileError, ToolchainError
from .render import render
from .spec import Spec, find_spec_file, load_spec
from .variants import Variant, expand

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def build_dir(spec: Spec | str) -> Path:
    """Where a spec (or a spec name) is built unless told otherwise: ``generated/<name>`` under the
    current folder. ``build``, the CLI and ``load(spec, rebuild=False)`` all take it from here."""
    return Path("generated") / (spec.name if isinstance(spec, Spec) else spec)


@dataclass(frozen=True)
class Toolchain:
    nvcc: str
    nvcc_version: str
    cutlass_root: str
    cutlass_version: str
    ccache: str | None

    @property
    def includes(self) -> list[str]:
        return [f"-I{self.cutlass_root}/include", f"-I{self.cutlass_root}/tools/util/include"]


def find_nvcc() -> str:
    """nvcc from $CUDA_HOME / $CUDA_PATH, then PATH, then /usr/local/cuda."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.access(Path(root) / "bin" / "nvcc", os.X_OK):
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        return "/usr/local/cuda/bin/nvcc"
    raise ToolchainError("nvcc not found: install the CUDA toolkit (12.4 or newer) and put its bin/ "
                         "on PATH, or set CUDA_HOME to its root")


@lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ToolchainError(f"could not run {nvcc} --version: {e}. Fix: install the CUDA toolkit (nvcc >= 12.4) or "
                             f"set CUDA_HOME to it") from None
    m = re.search(r"V(\d+\.\d+\.\d+)", text)
    if not m:
        raise ToolchainError(f"unrecognised `nvcc --version` output:\n{text}\nFix: point CUDA_HOME (or PATH) at a CUDA "
                             f"toolkit's nvcc >= 12.4")
    return m.group(1)


def find_cutlass() -> tuple[str, str]:
    """(root of the CUTLASS source tree, version) from the nvidia-cutlass wheel."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainError("CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0 "
                             "(it is a dependency of hierasparse-gen)")
    root = Path(list(spec.submodule_search_locations)[0]) / "source"
    if not (root / "include" / "cutlass" / "cutlass.h").is_file():
        raise ToolchainError(f"the nvidia-cutlass package has no C++ headers under {root}")
    try:
        version = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return str(root), version


def find_toolchain() -> Toolchain:
    nvcc = find_nvcc()
    root, version = find_cutlass()
    ccache = None if os.environ.get("HIERASPARSE_NO_CCACHE") else shutil.which("ccache")
    return Toolchain(nvcc, _nvcc_version(nvcc), root, version, ccache)


def nvcc_flags(arch: str) -> list[str]:
    """Flags that shape the binary (all of them enter the variant hash)."""
    n = arch.removeprefix("sm_")
    return ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
            "-Xcompiler", "-fPIC,-fvisibility=hidden",
            # explicit gencode pair: one cubin, no extra PTX pass (docs/hopper.md, section 1)
            "-gencode", f"arch=compute_{n},code=sm_{n}",
            "--resource-usage", "-Xptxas", "-warn-spills"]


LINK_FLAGS = ["-shared", "-cudart", "static", "-Xlinker", "--exclude-libs=ALL"]


def variant_hash(source: str, flags: list[str], tools: Toolchain, arch: str) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(flags), tools.nvcc_version, tools.cutlass_version, arch):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def default_jobs() -> int:
    """Parallel nvcc jobs: one per core, at most one per 3 GiB of memory."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 8 << 30
    return max(1, min(os.cpu_count() or 1, mem // (3 << 30)))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    _write_atomic(path, text.encode())
    return True


@contextmanager
def build_lock(out_dir: Path):
    """Exclusive cross-process lock on one build folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class BuiltVariant:
    variant: Variant
    hash: str
    source: Path
    obj: Path
    compiled: bool = False
    seconds: float = 0.0


@dataclass
class BuildReport:
    out_dir: Path
    library: Path
    manifest: Path
    variants: list[BuiltVariant] = field(default_factory=list)
    linked: bool = False
    seconds: float = 0.0

    @property
    def compiled(self) -> list[BuiltVariant]:
        return [v for v in self.variants if v.compiled]


def _compile(bv: BuiltVariant, tools: Toolchain, flags: list[str]) -> float:
    tmp = bv.obj.with_name(f".{bv.obj.name}.{os.getpid()}.tmp.o")
    cmd = ([tools.ccache] if tools.ccache else []) + \
        [tools.nvcc, *flags, *tools.includes, "-c", str(bv.source), "-o", str(tmp)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        err = (proc.stderr or proc.stdout).strip().splitlines()
        tail = "\n".join(err[-40:])
        raise CompileError(f"nvcc failed on variant {bv.variant.name} (exit {proc.returncode})\n"
                           f"command: {' '.join(cmd)}\n{tail}")
    _write_atomic(bv.obj.with_suffix(".log"), (proc.stdout + proc.stderr).encode())
    os.replace(tmp, bv.obj)
    return elapsed


def build(spec: Spec | str | Path, out_dir: str | Path | None = None, jobs: int | None = None,
          log: Callable[[str], None] | None = print) -> BuildReport:
    """Build every variant of a spec into ``out_dir`` (default :func:`build_dir`: ``generated/<name>``).
    A spec path that does not exist may name a spec shipped with the package (:func:`find_spec_file`)."""
    t_start = time.monotonic()
    say = log or (lambda _msg: None)
    if not isinstance(spec, Spec):
        spec = load_spec(find_spec_file(spec, log=say))
    out = Path(out_dir) if out_dir else build_dir(spec)
    tools = find_toolchain()
    variants = expand(spec)
    jobs = jobs or default_jobs()

    with build_lock(out):
        (out / "src").mkdir(exist_ok=True)
        (out / "obj").mkdir(exist_ok=True)
        built = []
        for v in variants:
            source = render(v, spec)
            flags = nvcc_flags(v.arch)
            digest = variant_hash(source, flags, tools, v.arch)
            src = out / "src" / f"{v.name}.cu"
            _write_if_changed(src, source)
            built.append(BuiltVariant(v, digest, src, out / "obj" / f"{v.name}-{digest[:16]}.o"))

        todo = [bv for bv in built if not bv.obj.is_file()]
        if todo:
            say(f"compiling {len(todo)} of {len(built)} variants with {min(jobs, len(todo))} "
                f"parallel nvcc jobs{' (ccache)' if tools.ccache else ''}")
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(todo) or 1))) as pool:
            futures = {}
            for bv in todo:
                futures[pool.submit(_compile, bv, tools, nvcc_flags(bv.variant.arch))] = bv
            for done, fut in enumerate(as_completed(futures), 1):
                bv = futures[fut]
                try:
                    bv.seconds = fut.result()
                except CompileError:
                    for f in futures:
                        f.cancel()
                    raise
                bv.compiled = True
                say(f"  [{done}/{len(todo)}] {bv.variant.name}: {bv.seconds:.1f}s "
                    f"({len(todo) - done} left, {time.monotonic() - t_start:.0f}s elapsed)")

        library = out / f"libhierasparse_{spec.name}.so"
        lib_hash = hashlib.sha256("\0".join(
            [bv.hash for bv in built] + LINK_FLAGS + [tools.nvcc_version]).encode()).hexdigest()
        manifest_path = out / MANIFEST
        old = _read_manifest(manifest_path)
        report = BuildReport(out, library, manifest_path, built)
        if not (library.is_file() and old.get("library_hash") == lib_hash):
            tmp = library.with_name(f".{library.name}.{os.getpid()}.tmp")
            cmd = [tools.nvcc, *LINK_FLAGS, *[str(bv.obj) for bv in built], "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise CompileError(f"linking {library.name} failed\ncommand: {' '.join(cmd)}\n"
                                   f"{proc.stderr.strip()}")
            os.replace(tmp, library)
            report.linked = True

        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "generator": f"hierasparse-gen {__version__}",
            "spec": spec.to_dict(),
            "spec_source": spec.source,
            "library": library.name,
            "library_hash": lib_hash,
            "tools": {"nvcc": tools.nvcc_version, "cutlass": tools.cutlass_version},
            "variants": [dict(bv.variant.describe(), hash=bv.hash, source=f"src/{bv.source.name}",
                              object=f"obj/{bv.obj.name}", flags=nvcc_flags(bv.variant.arch))
                         for bv in built],
        }
        text = json.dumps(manifest, indent=2) + "\n"
        _write_if_changed(manifest_path, text)
        # objects of variants that no longer exist or changed are stale now
        keep = {bv.obj.name for bv in built} | {bv.obj.with_suffix(".log").name for bv in built}
        for f in (out / "obj").iterdir():
            if f.name not in keep and not f.name.startswith("."):
                f.unlink(missing_ok=True)
        for f in (out / "src").iterdir():
            if f.name not in {bv.source.name for bv in built}:
                f.unlink(missing_ok=True)
    report.seconds = time.monotonic() - t_start
    return report


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def clean(out_dir: str | Path) -> list[Path]:
    """Remove a build folder made by :func:`build` (refuses folders without a manifest)."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file() and not (out / "obj").is_dir():
        raise BuildNotFoundError(f"{out} is not a hierasparse-gen build folder (no {MANIFEST}). Fix: pass a folder "
                                 f"written by `hierasparse-gen build`")
    with build_lock(out):
        removed = sorted(p for p in out.iterdir() if p.name != ".lock")
        for p in removed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / ".lock").unlink(missing_ok=True)
    try:
        out.rmdir()
    except OSError:
        pass
    return removed
