"""Loading and validating a kernel spec (YAML).

A spec names the attention shapes, dtypes, GPU architectures, phases and tier
mixes to generate kernels for.  See ``docs/specs.md`` for the schema.

The work is split by concern: ``spec_schema`` (allowed values, the spec
objects), ``spec_messages`` (how problems are worded, generic checks),
``spec_check`` (the sections' validation) and this module (YAML reading, the
entry points, the specs shipped with the package). They must stay light: only
the standard library and PyYAML (no torch), so that ``hierasparse_gen``
commands that only read specs start fast.

Every problem is reported as a :class:`SpecError` whose ``str()`` is the whole
user-facing message, in the form::

    <source>: <key path>: <problem>. Fix: <what to do>

e.g. ``specs/x.yaml: shapes[0].head_dim: 100 is not supported (head_dim must be
a multiple of 32 between 64 and 256). Fix: use one of 64, 96, 128, 160, 192,
224, 256.``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import SpecError
from .resources import data_dir
from .spec_check import _Checker
from .spec_messages import _show
# the schema's names stay importable from here, where they were defined before the split
from .spec_schema import (  # noqa: F401
    ARCHS, BLOCK_SIZES, CACHE_KEYS, CHUNK_TOKENS, DECODE_KEYS, DTYPE_ALIASES, DTYPES, HEAD_DIMS, MAX_GROUP, NAME_RE,
    PHASES, PREFILL_CHUNK_TOKENS, PREFILL_KEYS, REQUIRED_TOP_KEYS, SHAPE_KEYS, STAGES_RANGE,
    STEP_KEYS, TIER_KEYS, TIER_KINDS, TIER_MIXES, TOP_KEYS, WARP_QUERIES, WARPS_RANGE, CacheConfig, DecodeTiles,
    E4M3_MIN_ARCH, E4M3_TIER_MIXES, TIER_STORAGE_KEYS, TIER_STORAGES, PrefillTiles, Shape, Spec, Tier,
)

__all__ = [
    "SpecError",
    "Shape",
    "Tier",
    "CacheConfig",
    "DecodeTiles",
    "Spec",
    "find_spec_file",
    "load_spec",
    "parse_spec",
    "shipped_specs",
]


# --------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable; the base class reports it
                    continue
                if duplicate:
                    raise _DuplicateKeyError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {_show(key)}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except _DuplicateKeyError as e:
        where = _where(e.problem_mark)
        raise SpecError(
            f"{source}: {where}: invalid YAML: {e.problem}. "
            "Fix: remove or merge the repeated key (each key may appear once per mapping)."
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _where(mark) if mark is not None else "unknown position"
        problem = e.problem or e.context or "syntax error"
        if e.context and e.problem:
            ctx = e.context
            if e.context_mark is not None and e.context_mark is not mark:
                ctx += f" at {_where(e.context_mark)}"
            problem += f" ({ctx})"
        raise SpecError(
            f"{source}: {where}: invalid YAML: {problem}. "
            f"Fix: correct the YAML syntax near {where} (check the indentation, "
            "that each 'key: value' has a space after the colon, and that brackets and quotes are closed)."
        ) from None
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise SpecError(
            f"{source}: invalid YAML: {detail}. Fix: correct the YAML syntax of the spec file."
        ) from None


def load_spec(path) -> Spec:
    """Read and validate the YAML spec at ``path``; raises :class:`SpecError`."""
    source = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise SpecError(
            f"{source}: spec file not found. Fix: check the path "
            f"(looked for {os.path.abspath(source)})."
        ) from None
    except IsADirectoryError:
        raise SpecError(
            f"{source}: is a directory, not a spec file. Fix: pass the path of a .yaml spec file."
        ) from None
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{source}: spec file is not valid UTF-8 ({e.reason} at byte {e.start}). "
            "Fix: save the spec as UTF-8 text."
        ) from None
    except OSError as e:
        raise SpecError(
            f"{source}: cannot read the spec file ({e.strerror or e}). "
            "Fix: check the path and its permissions."
        ) from None
    data = _load_yaml(text, source)
    return parse_spec(data, source=source)


def parse_spec(data, source: str = "<spec>") -> Spec:
    """Validate an already-parsed spec object (e.g. a dict); raises :class:`SpecError`."""
    return _Checker(source).spec(data)


# --------------------------------------------------------------------------
# Specs shipped with the package
# --------------------------------------------------------------------------


def shipped_specs() -> dict[str, Path]:
    """The example specs that ship with the package (``specs/`` of the repository), by name."""
    folder = data_dir("specs")
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in (".yaml", ".yml") and p.is_file()}


def find_spec_file(path, log: Callable[[str], None] | None = None) -> Path:
    """The spec file ``path`` names: the file itself when it exists, else the spec shipped with the
    package that ``specs/<name>.yaml``, ``<name>.yaml`` or ``<name>`` names (said through ``log``), so
    that ``hierasparse-gen build specs/llama3.yaml`` works from any folder once the package is installed."""
    given = Path(os.fsdecode(path))
    if given.exists():
        return given
    parts = given.parts
    name = given.stem if given.suffix in (".yaml", ".yml") else given.name
    shipped = shipped_specs()
    # only a bare name or specs/<name>: a missing file elsewhere is a typo, never a shipped spec
    if name in shipped and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "specs")):
        if log:
            log(f"{given} is not in {Path.cwd()}; using the spec shipped with hierasparse-gen: {shipped[name]}")
        return shipped[name]
    names = ", ".join(shipped) or "none found in this install"
    raise SpecError(
        f"{given}: spec file not found (looked for {given.absolute()}). Fix: check the path, or name a spec "
        f"shipped with hierasparse-gen as specs/<name>.yaml or <name> (shipped: {names})."
    )
