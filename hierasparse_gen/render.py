"""Render variants into CUDA C++ sources from the Jinja2 templates in ``templates/``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import jinja2

from . import __version__
from .spec import Spec
from .variants import Variant


def templates_dir() -> Path:
    """The templates folder: $HIERASPARSE_TEMPLATES, else ``templates/`` beside the package."""
    env = os.environ.get("HIERASPARSE_TEMPLATES")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "templates"
    if not (path / "decode.cu.j2").is_file():
        raise FileNotFoundError(
            f"kernel templates not found in {path}; install hierasparse-gen from its source tree "
            f"(pip install -e .) or set HIERASPARSE_TEMPLATES to the templates folder")
    return path


@lru_cache(maxsize=None)
def _environment(*paths: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(paths)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=False, lstrip_blocks=False, autoescape=False)


def render(variant: Variant, spec: Spec) -> str:
    """The complete source of one translation unit (deterministic for equal inputs)."""
    name = variant.template
    env = _environment(str(templates_dir()))
    return env.get_template(name).render(
        variant=variant, spec=spec, template=name,
        generator_version=__version__, namespace=f"{variant.name}_impl", symbol=variant.symbol,
        head_dim=variant.head_dim, group=variant.group, block_size=variant.block_size, n_tiles=variant.n_tiles,
        k_tier=variant.tier.k if variant.tier else None, v_tier=variant.tier.v if variant.tier else None,
        **variant.tiles)
