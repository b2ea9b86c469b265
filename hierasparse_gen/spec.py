"""Loading and validating a kernel spec (YAML).

A spec names the attention shapes, dtypes, GPU architectures, phases and tier
mixes to generate kernels for.  See ``docs/specs.md`` for the schema.

This module must stay light: it imports only the standard library and PyYAML
(no torch), so that ``hierasparse_gen`` commands that only read specs start
fast.

Every problem is reported as a :class:`SpecError` whose ``str()`` is the whole
user-facing message, in the form::

    <source>: <key path>: <problem>. Fix: <what to do>

e.g. ``specs/x.yaml: shapes[0].head_dim: 100 is not supported (head_dim must be
a multiple of 32 between 64 and 256). Fix: use one of 64, 96, 128, 160, 192,
224, 256.``
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from .errors import SpecError

__all__ = [
    "SpecError",
    "Shape",
    "Tier",
    "CacheConfig",
    "DecodeTiles",
    "Spec",
    "load_spec",
    "parse_spec",
]


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
#: Tier names that are part of the design but have no kernel template yet.
PLANNED_TIER_KINDS: tuple[str, ...] = ("dense",)
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
CACHE_KEYS = ("block_size", "sink", "local_window")
DECODE_KEYS = ("warps", "stages", "chunk_tokens")
PREFILL_KEYS = ("warp_queries", "stages", "chunk_tokens", "step_keys")
WARP_QUERIES: tuple[int, ...] = (16, 24, 32)
STEP_KEYS: tuple[int, ...] = (32, 64)
PREFILL_CHUNK_TOKENS: tuple[int, ...] = (32, 64, 128)

ROOT = "<top level>"

# Example values used in "Fix:" hints for missing keys.
_EXAMPLES = {
    "name": "llama3",
    "shapes": "[{head_dim: 128, num_qo_heads: 32, num_kv_heads: 8}]",
    "archs": "[sm_80, sm_90]",
    "head_dim": "128",
    "num_qo_heads": "32",
    "num_kv_heads": "8",
    "k": "sparse24",
    "v": "sparse24",
}


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
            "tiers": [dataclasses.asdict(t) for t in self.tiers],
            "cache": dataclasses.asdict(self.cache),
            "decode": dataclasses.asdict(self.decode),
            "prefill": dataclasses.asdict(self.prefill),
        }


# --------------------------------------------------------------------------
# Message helpers
# --------------------------------------------------------------------------


def _show(value: Any) -> str:
    """Render a value the way it reads in YAML, shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def _describe(value: Any) -> str:
    """'a boolean (true)', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, (list, tuple)):
        return "a list"
    elif isinstance(value, Mapping):
        return "a mapping"
    else:
        kind = f"a {type(value).__name__}"
    return f"{kind} ({_show(value)})"


def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def _child(path: str, key: Any) -> str:
    key_text = key if isinstance(key, str) else _show(key)
    return key_text if path == ROOT else f"{path}.{key_text}"


def _closest(word: Any, candidates) -> str | None:
    if not isinstance(word, str):
        word = str(word)
    lowered = word.strip().lower()
    for cand in candidates:
        if cand.lower() == lowered:
            return cand
    matches = difflib.get_close_matches(lowered, list(candidates), n=1)
    return matches[0] if matches else None


def _with_suggestion(word: Any, candidates, fix: str) -> str:
    """Prefix ``fix`` with "did you mean 'x'?" when ``word`` is close to a candidate."""
    match = _closest(word, candidates)
    return f"did you mean '{match}'? Otherwise {fix}" if match else fix


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class _Checker:
    def __init__(self, source: str):
        self.source = source

    # -- reporting ---------------------------------------------------------

    def fail(self, path: str, problem: str, fix: str) -> NoReturn:
        fix = fix.strip()
        if not fix.endswith((".", "?", "!")):
            fix += "."
        raise SpecError(f"{self.source}: {path}: {problem}. Fix: {fix}")

    # -- generic shape checks ----------------------------------------------

    def mapping(self, value: Any, path: str, valid, required=(), *, example: str) -> Mapping:
        if not isinstance(value, Mapping):
            where = "the spec" if path == ROOT else path
            self.fail(
                path,
                f"expected a mapping, found {_describe(value)}",
                f"write {where} as 'key: value' pairs, e.g. {example}",
            )
        where = "at the top level" if path == ROOT else f"in {path}"
        for key in value:
            if not (isinstance(key, str) and key in valid):
                match = _closest(key, valid)
                hint = f"did you mean '{match}'?" if match else "remove it."
                self.fail(
                    _child(path, key),
                    f"unknown key {_show(key)}",
                    f"{hint} Valid keys {where}: {_join(valid)}.",
                )
        for key in required:
            if key not in value:
                self.fail(
                    _child(path, key),
                    "required key is missing",
                    f"add it {where}, e.g. {key}: {_EXAMPLES.get(key, '...')}",
                )
        return value

    def seq(self, value: Any, path: str, *, example: str, default: str | None = None) -> list:
        or_default = f" (or remove the key to use the default {default})" if default else ""
        if not _is_list(value):
            self.fail(
                path,
                f"expected a list, found {_describe(value)}",
                f"write {path} as a list, e.g. {path}: {example}{or_default}",
            )
        if len(value) == 0:
            self.fail(
                path,
                "the list is empty",
                f"list at least one entry, e.g. {path}: {example}{or_default}",
            )
        return list(value)

    def integer(self, value: Any, path: str, fix: str) -> int:
        if not _is_int(value):
            if isinstance(value, float) and value.is_integer():
                fix = f"write {int(value)} (an integer, without the decimal point)"
            elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
                fix = f"write {int(value)} without quotes"
            self.fail(path, f"expected an integer, found {_describe(value)}", fix)
        return value

    def string(self, value: Any, path: str, fix: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, found {_describe(value)}", fix)
        return value

    # -- sections ------------------------------------------------------------

    def name(self, value: Any) -> str:
        path = "name"
        self.string(value, path, "write the name as a string such as llama3 (quote it if it is all digits)")
        if not NAME_RE.fullmatch(value):
            suggestion = re.sub(r"[^a-z0-9_-]+", "-", value.strip().lower()).strip("-_")
            if suggestion and NAME_RE.fullmatch(suggestion):
                fix = f"use e.g. '{suggestion}'"
            else:
                fix = "use e.g. 'llama3'"
            self.fail(
                path,
                f"{_show(value)} is not a valid name (the name becomes part of file names: "
                "use lowercase letters, digits, '_' and '-', starting with a letter or digit)",
                fix,
            )
        return value

    def shapes(self, value: Any) -> tuple[Shape, ...]:
        items = self.seq(
            value, "shapes", example="[{head_dim: 128, num_qo_heads: 32, num_kv_heads: 8}]"
        )
        shapes: list[Shape] = []
        seen: dict[Shape, int] = {}
        for i, item in enumerate(items):
            path = f"shapes[{i}]"
            item = self.mapping(
                item,
                path,
                SHAPE_KEYS,
                SHAPE_KEYS,
                example="{head_dim: 128, num_qo_heads: 32, num_kv_heads: 8}",
            )
            hd_path = f"{path}.head_dim"
            head_dim = self.integer(item["head_dim"], hd_path, f"use one of {_join(HEAD_DIMS)}")
            if head_dim not in HEAD_DIMS:
                self.fail(
                    hd_path,
                    f"{head_dim} is not supported (head_dim must be a multiple of 32 "
                    f"between {HEAD_DIMS[0]} and {HEAD_DIMS[-1]})",
                    f"use one of {_join(HEAD_DIMS)}",
                )
            heads = {}
            for key in ("num_qo_heads", "num_kv_heads"):
                kpath = f"{path}.{key}"
                n = self.integer(item[key], kpath, f"write {key} as a positive integer such as {_EXAMPLES[key]}")
                if n < 1:
                    self.fail(
                        kpath,
                        f"{n} is not allowed ({key} must be an integer >= 1)",
                        f"use a positive head count such as {_EXAMPLES[key]}",
                    )
                heads[key] = n
            qo, kv = heads["num_qo_heads"], heads["num_kv_heads"]
            kv_path = f"{path}.num_kv_heads"
            good_kv = [d for d in range(1, qo + 1) if qo % d == 0 and qo // d <= MAX_GROUP]
            if len(good_kv) > 10:
                good_kv_text = _join(good_kv[:10]) + ", ..."
            else:
                good_kv_text = _join(good_kv)
            kv_fix = (
                f"set num_kv_heads to a divisor of num_qo_heads ({qo}) that keeps the group "
                f"num_qo_heads/num_kv_heads <= {MAX_GROUP}: {good_kv_text}"
            )
            if qo % kv != 0:
                swapped = "; are num_qo_heads and num_kv_heads swapped?" if kv > qo and kv % qo == 0 else ""
                self.fail(
                    kv_path,
                    f"num_qo_heads ({qo}) is not divisible by num_kv_heads ({kv}){swapped}",
                    kv_fix,
                )
            group = qo // kv
            if group > MAX_GROUP:
                self.fail(
                    kv_path,
                    f"the GQA group num_qo_heads/num_kv_heads = {qo}/{kv} = {group} is larger "
                    f"than {MAX_GROUP} (groups 1..{MAX_GROUP} are supported)",
                    kv_fix,
                )
            shape = Shape(head_dim=head_dim, num_qo_heads=qo, num_kv_heads=kv)
            if shape in seen:
                self.fail(
                    path,
                    f"duplicate shape (head_dim {head_dim}, num_qo_heads {qo}, num_kv_heads {kv}) "
                    f"is the same as shapes[{seen[shape]}]",
                    f"remove {path}",
                )
            seen[shape] = i
            shapes.append(shape)
        return tuple(shapes)

    def _enum_list(self, value, key, *, example, default, normalize, check) -> tuple[str, ...]:
        """A non-empty list of strings; ``normalize`` maps to canonical form,
        ``check(item, canonical, path)`` raises for values that are not allowed."""
        items = self.seq(value, key, example=example, default=default)
        out: list[str] = []
        seen: dict[str, tuple[int, Any]] = {}
        for i, item in enumerate(items):
            path = f"{key}[{i}]"
            canonical = normalize(item, path)
            check(item, canonical, path)
            if canonical in seen:
                first, first_raw = seen[canonical]
                same = "" if item == first_raw else f" (both mean {canonical})"
                self.fail(
                    path,
                    f"{_show(item)} is a duplicate of {key}[{first}]{same}",
                    f"remove {path}",
                )
            seen[canonical] = (i, item)
            out.append(canonical)
        return tuple(out)

    def dtypes(self, value: Any) -> tuple[str, ...]:
        allowed_text = (
            f"{_join(DTYPES)} (aliases: fp16, f16, half -> float16; bf16 -> bfloat16)"
        )

        def normalize(item, path):
            self.string(item, path, f"use one of {allowed_text}")
            low = item.strip().lower()
            return DTYPE_ALIASES.get(low, low)

        def check(item, canonical, path):
            if canonical not in DTYPES:
                self.fail(
                    path,
                    f"{_show(item)} is not a supported dtype "
                    "(the 2:4 sparse mma.sp kernels take 16-bit inputs)",
                    _with_suggestion(item, DTYPES + tuple(DTYPE_ALIASES), f"use one of {allowed_text}"),
                )

        return self._enum_list(
            value, "dtypes", example="[float16, bfloat16]", default="[float16]",
            normalize=normalize, check=check,
        )

    def archs(self, value: Any) -> tuple[str, ...]:
        def normalize(item, path):
            self.string(item, path, f"use one of {_join(ARCHS)}")
            return item.strip().lower()

        def check(item, canonical, path):
            if canonical not in ARCHS:
                fix = f"use one of {_join(ARCHS)}"
                m = re.fullmatch(r"sm_?(\d+)", canonical)
                if m and int(m.group(1)) < 80:
                    why = " (2:4 sparse tensor cores need sm_80 or newer)"
                else:
                    why = ""
                    fix = _with_suggestion(canonical, ARCHS, fix)
                self.fail(path, f"{_show(item)} is not a supported architecture{why}", fix)

        return self._enum_list(
            value, "archs", example="[sm_80, sm_90]", default=None,
            normalize=normalize, check=check,
        )

    def phases(self, value: Any) -> tuple[str, ...]:
        def normalize(item, path):
            self.string(item, path, f"use one of {_join(PHASES)}")
            return item.strip().lower()

        def check(item, canonical, path):
            if canonical not in PHASES:
                self.fail(
                    path,
                    f"{_show(item)} is not a known phase",
                    _with_suggestion(canonical, PHASES, f"use one of {_join(PHASES)}"),
                )

        return self._enum_list(
            value, "phases", example="[decode]", default="[decode]",
            normalize=normalize, check=check,
        )

    def tiers(self, value: Any) -> tuple[Tier, ...]:
        items = self.seq(
            value, "tiers", example="[{k: sparse24, v: sparse24}]",
            default="[{k: sparse24, v: sparse24}]",
        )
        tiers: list[Tier] = []
        seen: dict[Tier, int] = {}
        for i, item in enumerate(items):
            path = f"tiers[{i}]"
            item = self.mapping(item, path, TIER_KEYS, TIER_KEYS, example="{k: sparse24, v: sparse24}")
            kinds = {}
            for key in TIER_KEYS:
                kpath = f"{path}.{key}"
                raw = self.string(item[key], kpath, f"use one of {_join(TIER_KINDS)}")
                kind = raw.strip().lower()
                if kind in PLANNED_TIER_KINDS:
                    self.fail(
                        kpath,
                        f"{_show(raw)} is recognized but no template supports this tier yet; "
                        f"use {TIER_KINDS[0]}",
                        f"set {kpath} to {TIER_KINDS[0]}",
                    )
                if kind not in TIER_KINDS:
                    self.fail(
                        kpath,
                        f"{_show(raw)} is not a known tier",
                        _with_suggestion(kind, TIER_KINDS, f"use one of {_join(TIER_KINDS)}"),
                    )
                kinds[key] = kind
            if (kinds["k"], kinds["v"]) not in TIER_MIXES:
                mixes = ", ".join(f"{{k: {k}, v: {v}}}" for k, v in TIER_MIXES)
                self.fail(path, f"no template supports the tier mix {{k: {kinds['k']}, v: {kinds['v']}}} yet",
                          f"use one of {mixes} (mixed reads dense and 2:4 blocks through the block table)")
            tier = Tier(**kinds)
            if tier in seen:
                self.fail(
                    path,
                    f"duplicate tier {{k: {tier.k}, v: {tier.v}}} is the same as tiers[{seen[tier]}]",
                    f"remove {path}",
                )
            seen[tier] = i
            tiers.append(tier)
        return tuple(tiers)

    def cache(self, value: Any) -> CacheConfig:
        if value is None:  # an empty `cache:` section
            value = {}
        item = self.mapping(value, "cache", CACHE_KEYS, example="{block_size: 64, sink: 64, local_window: 256}")
        defaults = CacheConfig()

        bs_given = "block_size" in item
        block_size = defaults.block_size
        if bs_given:
            block_size = self.integer(item["block_size"], "cache.block_size", f"use one of {_join(BLOCK_SIZES)}")
            if block_size not in BLOCK_SIZES:
                self.fail(
                    "cache.block_size",
                    f"{block_size} is not supported (block_size must be a multiple of 32 "
                    f"between {BLOCK_SIZES[0]} and {BLOCK_SIZES[-1]})",
                    f"use one of {_join(BLOCK_SIZES)}",
                )

        out = {"block_size": block_size}
        bs_text = f"cache.block_size ({block_size}{'' if bs_given else ', the default'})"
        for key in ("sink", "local_window"):
            path = f"cache.{key}"
            n = getattr(defaults, key)
            if key in item:
                n = self.integer(item[key], path, f"use a non-negative multiple of {block_size}")
                if n < 0:
                    self.fail(
                        path,
                        f"{n} is negative ({key} must be an integer >= 0 and a multiple of cache.block_size)",
                        f"use 0 or a positive multiple of {block_size}",
                    )
            if n % block_size != 0:
                lower = n // block_size * block_size
                self.fail(
                    path,
                    f"{n} is not a multiple of {bs_text}",
                    f"use a multiple of {block_size}, e.g. {lower} or {lower + block_size}",
                )
            out[key] = n
        return CacheConfig(**out)

    def decode(self, value: Any) -> DecodeTiles:
        if value is None:  # an empty `decode:` section
            value = {}
        item = self.mapping(value, "decode", DECODE_KEYS, example="{warps: 4, stages: 3, chunk_tokens: 32}")
        oracle = "or omit it to let the tile oracle decide"
        out: dict[str, int | None] = {}
        for key, (lo, hi) in (("warps", WARPS_RANGE), ("stages", STAGES_RANGE)):
            path = f"decode.{key}"
            v = item.get(key)
            if v is not None:
                self.integer(v, path, f"use an integer from {lo} to {hi}, {oracle}")
                if not lo <= v <= hi:
                    self.fail(
                        path,
                        f"{v} is out of range ({key} must be between {lo} and {hi})",
                        f"use an integer from {lo} to {hi}, {oracle}",
                    )
            out[key] = v
        path = "decode.chunk_tokens"
        v = item.get("chunk_tokens")
        allowed = " or ".join(str(c) for c in CHUNK_TOKENS)
        if v is not None:
            self.integer(v, path, f"use {allowed}, {oracle}")
            if v not in CHUNK_TOKENS:
                self.fail(
                    path,
                    f"{v} is not supported (chunk_tokens must be {allowed})",
                    f"use {allowed}, {oracle}",
                )
        out["chunk_tokens"] = v
        return DecodeTiles(**out)

    def prefill(self, value: Any) -> PrefillTiles:
        if value is None:  # an empty `prefill:` section
            value = {}
        item = self.mapping(value, "prefill", PREFILL_KEYS,
                            example="{warp_queries: 24, stages: 3, chunk_tokens: 64, step_keys: 32}")
        oracle = "or omit it to let the tile oracle decide"
        out: dict[str, int | None] = {}
        for key, allowed in (("warp_queries", WARP_QUERIES), ("stages", tuple(range(2, 5))),
                             ("chunk_tokens", PREFILL_CHUNK_TOKENS), ("step_keys", STEP_KEYS)):
            path, v = f"prefill.{key}", item.get(key)
            text = ", ".join(str(a) for a in allowed)
            if v is not None:
                self.integer(v, path, f"use one of {text}, {oracle}")
                if v not in allowed:
                    self.fail(path, f"{v} is not supported ({key} must be one of {text})", f"use one of {text}, {oracle}")
            out[key] = v
        if out["step_keys"] and out["chunk_tokens"] and out["step_keys"] > out["chunk_tokens"]:
            self.fail("prefill.step_keys", f"{out['step_keys']} keys a softmax step exceed the "
                      f"{out['chunk_tokens']}-token stage (prefill.chunk_tokens)",
                      "use step_keys <= chunk_tokens")
        return PrefillTiles(**out)

    # -- whole spec ----------------------------------------------------------

    def spec(self, data: Any) -> Spec:
        if data is None:
            self.fail(
                ROOT,
                "the spec is empty",
                f"write a mapping with at least the keys {_join(REQUIRED_TOP_KEYS)} (see docs/specs.md)",
            )
        if not isinstance(data, Mapping):
            self.fail(
                ROOT,
                f"expected a mapping of spec keys, found {_describe(data)}",
                f"write the spec as 'key: value' pairs with at least the keys "
                f"{_join(REQUIRED_TOP_KEYS)} (see docs/specs.md)",
            )
        self.mapping(data, ROOT, TOP_KEYS, REQUIRED_TOP_KEYS, example="name: llama3")

        def optional(key, default):
            return data[key] if key in data else default

        name = self.name(data["name"])
        shapes = self.shapes(data["shapes"])
        dtypes = self.dtypes(optional("dtypes", ["float16"]))
        archs = self.archs(data["archs"])
        phases = self.phases(optional("phases", ["decode"]))
        tiers = self.tiers(optional("tiers", [{"k": "sparse24", "v": "sparse24"}]))
        cache = self.cache(optional("cache", {}))
        decode = self.decode(optional("decode", {}))
        prefill = self.prefill(optional("prefill", {}))
        return Spec(
            name=name,
            shapes=shapes,
            dtypes=dtypes,
            archs=archs,
            phases=phases,
            tiers=tiers,
            cache=cache,
            decode=decode,
            prefill=prefill,
            source=self.source,
        )


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
