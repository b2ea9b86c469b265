"""Validation of a parsed spec, section by section (:func:`hierasparse_gen.spec.parse_spec` runs it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .spec_messages import ROOT, _EXAMPLES, _Checks, _describe, _join, _show, _with_suggestion
from .spec_schema import (
    ARCHS, BLOCK_SIZES, CACHE_KEYS, CHUNK_TOKENS, DECODE_KEYS, DTYPE_ALIASES, DTYPES, HEAD_DIMS, MAX_GROUP, NAME_RE,
    PHASES, PREFILL_CHUNK_TOKENS, PREFILL_KEYS, REQUIRED_TOP_KEYS, SHAPE_KEYS, STAGES_RANGE,
    STEP_KEYS, TIER_KEYS, TIER_KINDS, TIER_MIXES, TOP_KEYS, WARP_QUERIES, WARPS_RANGE, CacheConfig, DecodeTiles,
    E4M3_MIN_ARCH, E4M3_TIER_MIXES, TIER_STORAGE_KEYS, TIER_STORAGES, PrefillTiles, Shape, Spec, Tier,
)


class _Checker(_Checks):
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

    @staticmethod
    def _show_tier(tier: Tier) -> str:
        extra = f", k_storage: {tier.k_storage}, v_storage: {tier.v_storage}" if tier.e4m3 else ""
        return f"{{k: {tier.k}, v: {tier.v}{extra}}}"

    def _storage(self, raw: Any, path: str, archs: tuple[str, ...]) -> str:
        value = self.string(raw, path, f"use one of {_join(TIER_STORAGES)}").strip().lower()
        if value not in TIER_STORAGES:
            self.fail(path, f"{_show(raw)} is not a storage",
                      _with_suggestion(value, TIER_STORAGES, f"use one of {_join(TIER_STORAGES)}"))
        if value == "model":
            return value
        old = [a for a in archs if tuple(divmod(int(a[3:].rstrip("a")), 10)) < E4M3_MIN_ARCH]
        if old:
            self.fail(path, f"float8_e4m3 needs sm_89 or newer (e4m3 conversions and FP8 tensor cores); archs has "
                            f"{_join(old)}", f"drop {_join(old)} from archs, or keep this tier in the model dtype "
                                             f"(storage model)")
        return value

    def tiers(self, value: Any, archs: tuple[str, ...] = ()) -> tuple[Tier, ...]:
        items = self.seq(
            value, "tiers", example="[{k: sparse24, v: sparse24}]",
            default="[{k: sparse24, v: sparse24}]",
        )
        tiers: list[Tier] = []
        seen: dict[Tier, int] = {}
        for i, item in enumerate(items):
            path = f"tiers[{i}]"
            item = self.mapping(item, path, TIER_KEYS + TIER_STORAGE_KEYS, TIER_KEYS,
                                example="{k: sparse24, v: sparse24}")
            kinds = {}
            for key in TIER_KEYS:
                kpath = f"{path}.{key}"
                raw = self.string(item[key], kpath, f"use one of {_join(TIER_KINDS)}")
                kind = raw.strip().lower()
                e4m3 = str(item.get(f"{key}_storage", "")).strip().lower() == "float8_e4m3"
                if kind == "dense" and e4m3:
                    pass  # dense e4m3 blocks: decode's like-for-like FP8 cache (a model-dtype one is SDPA's)
                elif kind == "dense":
                    self.fail(kpath, f"{_show(raw)} is supported only with {key}_storage: float8_e4m3 (the dense "
                                     f"e4m3 cache; a dense model-dtype tensor is what SDPA reads)",
                              f"set {key}_storage: float8_e4m3, or {kpath} to {TIER_KINDS[0]}")
                if kind not in TIER_KINDS and not (kind == "dense" and e4m3):
                    self.fail(
                        kpath,
                        f"{_show(raw)} is not a known tier",
                        _with_suggestion(kind, TIER_KINDS, f"use one of {_join(TIER_KINDS)}"),
                    )
                kinds[key] = kind
            if (kinds["k"], kinds["v"]) not in TIER_MIXES + E4M3_TIER_MIXES:
                mixes = ", ".join(f"{{k: {k}, v: {v}}}" for k, v in dict.fromkeys(TIER_MIXES + E4M3_TIER_MIXES))
                self.fail(path, f"no template supports the tier mix {{k: {kinds['k']}, v: {kinds['v']}}} yet",
                          f"use one of {mixes} (mixed reads dense and 2:4 blocks through the block table; dense "
                          f"needs float8_e4m3 storage)")
            for key in TIER_STORAGE_KEYS:
                kinds[key] = self._storage(item.get(key, "model"), f"{path}.{key}", archs)
            tier = Tier(**kinds)
            if tier in seen:
                self.fail(
                    path,
                    f"duplicate tier {self._show_tier(tier)} is the same as tiers[{seen[tier]}]",
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
        tiers = self.tiers(optional("tiers", [{"k": "sparse24", "v": "sparse24"}]), archs)
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
