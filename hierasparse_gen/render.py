"""Render variants into CUDA C++ sources from the Jinja2 templates (``templates/``, shipped in the package)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import jinja2

from . import __version__
from .errors import ToolchainError
from .resources import data_dir
from .spec import Spec
from .variants import Variant


def templates_dir() -> Path:
    """The templates folder: $HIERASPARSE_TEMPLATES, else the one shipped with the package."""
    env = os.environ.get("HIERASPARSE_TEMPLATES")
    path = Path(env) if env else data_dir("templates")
    if path is None or not (path / "decode.cu.j2").is_file():
        where = f"in {path}" if path else "in the installed package"
        # a broken install, like a missing nvcc: the CLI reports it without a traceback
        raise ToolchainError(
            f"kernel templates not found {where}. Fix: reinstall hierasparse-gen (pip install . or its "
            f"wheel ships them as hierasparse_gen/templates), or set HIERASPARSE_TEMPLATES to a templates folder")
    return path


@lru_cache(maxsize=None)
def _environment(*paths: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(paths)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=False, lstrip_blocks=False, autoescape=False)


_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"[^\n]*$', re.M)


def inline_headers(source: str, *folders: Path) -> str:
    """Every ``#include "x"`` naming a file in one of the folders replaced by that file's text (its own such
    includes too, each file once): the build keeps one self-contained translation unit, so the variant's content
    hash covers the plain C++ headers beside the templates and a header change rebuilds what includes it."""
    seen: set[str] = set()

    def expand(text: str) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1)
            path = next((f / name for f in folders if (f / name).is_file()), None)
            if path is None:  # a toolkit or CUTLASS header: left to nvcc's include paths
                return m.group(0)
            if name in seen:
                return f"// {name}: inlined above"
            seen.add(name)
            return f"// ---- {name} ----\n{expand(path.read_text()).rstrip()}\n// ---- end of {name} ----"
        return _LOCAL_INCLUDE.sub(one, text)
    return expand(source)


def render(variant: Variant, spec: Spec) -> str:
    """The complete source of one translation unit (deterministic for equal inputs)."""
    name = variant.template
    env = _environment(str(templates_dir()))
    return inline_headers(env.get_template(name).render(
        variant=variant, spec=spec, template=name,
        generator_version=__version__, namespace=f"{variant.name}_impl", symbol=variant.symbol,
        head_dim=variant.head_dim, group=variant.group, block_size=variant.block_size, n_tiles=variant.n_tiles,
        k_tier=variant.tier.k if variant.tier else None, v_tier=variant.tier.v if variant.tier else None,
        k8=bool(variant.tier and variant.tier.k_storage == "float8_e4m3"),
        v8=bool(variant.tier and variant.tier.v_storage == "float8_e4m3"), fp8=variant.fp8,
        **variant.tiles), templates_dir())
