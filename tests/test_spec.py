"""Tests for hierasparse_gen.spec: loading, normalization and error messages."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hierasparse_gen.spec import (  # noqa: E402
    CacheConfig,
    DecodeTiles,
    Shape,
    Spec,
    SpecError,
    Tier,
    load_spec,
    parse_spec,
)

LLAMA3 = ROOT / "specs" / "llama3.yaml"

BASE = {
    "name": "demo",
    "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}],
    "dtypes": ["float16", "bfloat16"],
    "archs": ["sm_80", "sm_90"],
    "phases": ["decode"],
    "tiers": [{"k": "sparse24", "v": "sparse24"}],
    "cache": {"block_size": 64, "sink": 64, "local_window": 256},
    "decode": {"warps": 4, "stages": 3, "chunk_tokens": 32},
}


def base() -> dict:
    return copy.deepcopy(BASE)


def spec_error(data, source="bad.yaml") -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source=source)
    return str(info.value)


# ---------------------------------------------------------------------------
# Good specs
# ---------------------------------------------------------------------------


def test_llama3_spec_loads_and_normalizes():
    spec = load_spec(LLAMA3)
    assert isinstance(spec, Spec)
    assert spec.name == "llama3"
    assert spec.shapes == (Shape(head_dim=128, num_qo_heads=32, num_kv_heads=8),)
    assert spec.shapes[0].group == 4
    assert spec.dtypes == ("float16", "bfloat16")
    assert spec.archs == ("sm_80", "sm_90", "sm_90a")
    assert spec.phases == ("decode", "prefill")
    assert spec.tiers == (Tier(k="sparse24", v="sparse24"), Tier(k="mixed", v="mixed"))
    assert spec.cache == CacheConfig(block_size=64, sink=64, local_window=256)
    assert spec.decode == DecodeTiles(warps=None, stages=None, chunk_tokens=32)
    assert spec.source == str(LLAMA3)


def test_llama3_spec_accepts_str_path_and_records_source():
    spec = load_spec(str(LLAMA3))
    assert spec.source == str(LLAMA3)
    assert spec == load_spec(LLAMA3)


def test_spec_is_frozen():
    spec = load_spec(LLAMA3)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.shapes[0].head_dim = 64  # type: ignore[misc]


def test_aliases_normalize():
    data = base()
    data["dtypes"] = ["fp16", "BF16"]
    spec = parse_spec(data)
    assert spec.dtypes == ("float16", "bfloat16")
    for alias in ("fp16", "f16", "half", "float16"):
        data["dtypes"] = [alias]
        assert parse_spec(data).dtypes == ("float16",)
    data["dtypes"] = ["bf16"]
    assert parse_spec(data).dtypes == ("bfloat16",)


def test_defaults_fill_in():
    spec = parse_spec(
        {
            "name": "tiny",
            "shapes": [{"head_dim": 64, "num_qo_heads": 12, "num_kv_heads": 1}],
            "archs": ["sm_86"],
        }
    )
    assert spec.source == "<spec>"
    assert spec.dtypes == ("float16",)
    assert spec.phases == ("decode",)
    assert spec.tiers == (Tier("sparse24", "sparse24"),)
    assert spec.cache == CacheConfig(64, 64, 256)
    assert spec.decode == DecodeTiles(None, None, None)
    assert spec.shapes[0].group == 12  # non-power-of-two groups are fine


def test_partial_sections_and_empty_sections():
    data = base()
    data["cache"] = {"block_size": 32, "sink": 0}
    data["decode"] = {"stages": 4}
    spec = parse_spec(data)
    assert spec.cache == CacheConfig(block_size=32, sink=0, local_window=256)
    assert spec.decode == DecodeTiles(warps=None, stages=4, chunk_tokens=None)
    data["cache"] = None  # an empty `cache:` section means defaults
    data["decode"] = None
    spec = parse_spec(data)
    assert spec.cache == CacheConfig()
    assert spec.decode == DecodeTiles()


def test_default_sink_checked_against_custom_block_size():
    data = base()
    data["cache"] = {"block_size": 128}
    msg = spec_error(data)
    assert "cache.sink: 64 is not a multiple of cache.block_size (128)" in msg
    assert "Fix: use a multiple of 128, e.g. 0 or 128." in msg


def test_sm90a_is_accepted_and_normalized():
    data = base()
    data["archs"] = ["SM_90A", "sm_90"]
    assert parse_spec(data).archs == ("sm_90a", "sm_90")


def test_to_dict_round_trips():
    spec = load_spec(LLAMA3)
    d = spec.to_dict()
    assert "source" not in d
    assert json.loads(json.dumps(d)) == d  # plain JSON-serializable data
    assert d == {
        "name": "llama3",
        "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}],
        "dtypes": ["float16", "bfloat16"],
        "archs": ["sm_80", "sm_90", "sm_90a"],
        "phases": ["decode", "prefill"],
        "tiers": [{"k": "sparse24", "v": "sparse24"}, {"k": "mixed", "v": "mixed"}],
        "cache": {"block_size": 64, "sink": 64, "local_window": 256},
        "decode": {"warps": None, "stages": None, "chunk_tokens": 32},
        "prefill": {"warp_queries": None, "stages": None, "chunk_tokens": None, "step_keys": None},
    }
    again = parse_spec(d, source=spec.source)
    assert again == spec
    assert again.to_dict() == d


def test_to_dict_round_trips_with_defaults_and_aliases():
    data = {
        "name": "mixed-shapes_2",
        "shapes": [
            {"head_dim": 256, "num_qo_heads": 48, "num_kv_heads": 4},
            {"head_dim": 96, "num_qo_heads": 7, "num_kv_heads": 7},
        ],
        "dtypes": ["half", "bf16"],
        "archs": ["sm_89"],
        "decode": {"chunk_tokens": 64},
    }
    spec = parse_spec(data)
    assert [s.group for s in spec.shapes] == [12, 1]
    d = spec.to_dict()
    assert d["dtypes"] == ["float16", "bfloat16"]
    assert d["decode"] == {"warps": None, "stages": None, "chunk_tokens": 64}
    assert parse_spec(d) == spec


def test_spec_module_does_not_import_torch():
    code = (
        "import sys; import hierasparse_gen.spec; "
        "assert 'torch' not in sys.modules, 'spec.py imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_spec_error_is_value_error():
    assert issubclass(SpecError, ValueError)


# ---------------------------------------------------------------------------
# Bad specs (dicts built from a valid base)
# ---------------------------------------------------------------------------


def _set(path, value):
    """Mutator that sets base()[path...] = value (path: tuple of keys/indices)."""

    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _drop(*path):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _shape(**kw):
    shape = {"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}
    shape.update(kw)
    return _set(("shapes", 0), shape)


BAD_DICTS = [
    # --- name
    ("name-missing", _drop("name"), ["name: required key is missing", "Fix: add it at the top level, e.g. name: llama3"]),
    ("name-uppercase", _set(("name",), "Llama3"), ["name: 'Llama3' is not a valid name", "file names", "Fix: use e.g. 'llama3'"]),
    ("name-space", _set(("name",), "my model"), ["name: 'my model' is not a valid name", "Fix: use e.g. 'my-model'"]),
    ("name-trailing-newline", _set(("name",), "llama3\n"), ["name: 'llama3\\n' is not a valid name"]),
    ("name-int", _set(("name",), 3), ["name: expected a string, found an integer (3)", "Fix: write the name as a string"]),
    # --- unknown keys
    ("top-typo", lambda d: d.update(shape=d.pop("shapes")), ["bad.yaml: shape: unknown key 'shape'", "Fix: did you mean 'shapes'?", "Valid keys at the top level: name, shapes, dtypes, archs, phases, tiers, cache, decode"]),
    ("top-unknown-no-suggestion", _set(("zzz",), 1), ["bad.yaml: zzz: unknown key 'zzz'. Fix: remove it. Valid keys at the top level:"]),
    ("shape-typo", _shape(head_dm=128), ["shapes[0].head_dm: unknown key 'head_dm'", "Fix: did you mean 'head_dim'?", "Valid keys in shapes[0]: head_dim, num_qo_heads, num_kv_heads"]),
    ("cache-typo", _set(("cache", "blocksize"), 64), ["cache.blocksize: unknown key 'blocksize'", "did you mean 'block_size'?", "Valid keys in cache: block_size, sink, local_window"]),
    ("decode-typo", _set(("decode", "warp"), 4), ["decode.warp: unknown key 'warp'", "did you mean 'warps'?"]),
    ("tier-typo", _set(("tiers", 0, "kk"), "sparse24"), ["tiers[0].kk: unknown key 'kk'", "Valid keys in tiers[0]: k, v"]),
    # --- shapes
    ("shapes-missing", _drop("shapes"), ["shapes: required key is missing", "Fix: add it at the top level, e.g. shapes:"]),
    ("shapes-empty", _set(("shapes",), []), ["shapes: the list is empty", "Fix: list at least one entry"]),
    ("shapes-not-list", _set(("shapes",), {"head_dim": 128}), ["shapes: expected a list, found a mapping", "Fix: write shapes as a list"]),
    ("shape-not-mapping", _set(("shapes", 0), 128), ["shapes[0]: expected a mapping, found an integer (128)"]),
    ("head-dim-100", _shape(head_dim=100), ["bad.yaml: shapes[0].head_dim: 100 is not supported (head_dim must be a multiple of 32 between 64 and 256). Fix: use one of 64, 96, 128, 160, 192, 224, 256."]),
    ("head-dim-32", _shape(head_dim=32), ["shapes[0].head_dim: 32 is not supported"]),
    ("head-dim-288", _shape(head_dim=288), ["shapes[0].head_dim: 288 is not supported"]),
    ("head-dim-bool", _shape(head_dim=True), ["shapes[0].head_dim: expected an integer, found a boolean (true)"]),
    ("head-dim-float", _shape(head_dim=128.0), ["shapes[0].head_dim: expected an integer, found a float (128.0)", "Fix: write 128 (an integer, without the decimal point)"]),
    ("head-dim-string", _shape(head_dim="128"), ["shapes[0].head_dim: expected an integer, found a string ('128')", "Fix: write 128 without quotes"]),
    ("kv-heads-missing", lambda d: d["shapes"][0].pop("num_kv_heads"), ["shapes[0].num_kv_heads: required key is missing", "Fix: add it in shapes[0], e.g. num_kv_heads: 8"]),
    ("qo-heads-zero", _shape(num_qo_heads=0), ["shapes[0].num_qo_heads: 0 is not allowed (num_qo_heads must be an integer >= 1)"]),
    ("kv-heads-negative", _shape(num_kv_heads=-2), ["shapes[0].num_kv_heads: -2 is not allowed"]),
    ("not-divisible", _shape(num_qo_heads=30, num_kv_heads=8), ["shapes[0].num_kv_heads: num_qo_heads (30) is not divisible by num_kv_heads (8)", "Fix: set num_kv_heads to a divisor of num_qo_heads (30)", "2, 3, 5, 6, 10, 15, 30"]),
    ("swapped-heads", _shape(num_qo_heads=8, num_kv_heads=32), ["num_qo_heads (8) is not divisible by num_kv_heads (32); are num_qo_heads and num_kv_heads swapped?"]),
    ("group-too-big", _shape(num_qo_heads=64, num_kv_heads=2), ["shapes[0].num_kv_heads: the GQA group num_qo_heads/num_kv_heads = 64/2 = 32 is larger than 16", "Fix: set num_kv_heads to a divisor of num_qo_heads (64)", ": 4, 8, 16, 32, 64."]),
    ("duplicate-shape", lambda d: d["shapes"].append(dict(d["shapes"][0])), ["shapes[1]: duplicate shape (head_dim 128, num_qo_heads 32, num_kv_heads 8) is the same as shapes[0]. Fix: remove shapes[1]."]),
    # --- dtypes
    ("dtypes-scalar", _set(("dtypes",), "fp16"), ["dtypes: expected a list, found a string ('fp16')", "Fix: write dtypes as a list", "default [float16]"]),
    ("dtypes-empty", _set(("dtypes",), []), ["dtypes: the list is empty"]),
    ("dtypes-null", _set(("dtypes",), None), ["dtypes: expected a list, found null"]),
    ("dtype-float32", _set(("dtypes",), ["float32"]), ["dtypes[0]: 'float32' is not a supported dtype", "Fix: did you mean 'float16'? Otherwise use one of float16, bfloat16"]),
    ("dtype-int8", _set(("dtypes",), ["int8"]), ["dtypes[0]: 'int8' is not a supported dtype", "Fix: use one of float16, bfloat16 (aliases: fp16, f16, half -> float16; bf16 -> bfloat16)."]),
    ("dtype-duplicate-alias", _set(("dtypes",), ["float16", "fp16"]), ["dtypes[1]: 'fp16' is a duplicate of dtypes[0] (both mean float16). Fix: remove dtypes[1]."]),
    ("dtype-duplicate-exact", _set(("dtypes",), ["bf16", "bfloat16", "bfloat16"]), ["dtypes[1]: 'bfloat16' is a duplicate of dtypes[0] (both mean bfloat16)"]),
    ("dtype-not-string", _set(("dtypes",), [16]), ["dtypes[0]: expected a string, found an integer (16)"]),
    # --- archs
    ("archs-missing", _drop("archs"), ["archs: required key is missing", "e.g. archs: [sm_80, sm_90]"]),
    ("arch-sm75", _set(("archs",), ["sm_75"]), ["archs[0]: 'sm_75' is not a supported architecture (2:4 sparse tensor cores need sm_80 or newer). Fix: use one of sm_80, sm_86, sm_89, sm_90, sm_90a."]),
    ("arch-typo", _set(("archs",), ["sm80"]), ["archs[0]: 'sm80' is not a supported architecture", "Fix: did you mean 'sm_80'?", "sm_80, sm_86, sm_89, sm_90"]),
    ("arch-int", _set(("archs",), [80]), ["archs[0]: expected a string, found an integer (80)", "Fix: use one of sm_80, sm_86, sm_89, sm_90"]),
    ("arch-duplicate", _set(("archs",), ["sm_90", "sm_80", "sm_90"]), ["archs[2]: 'sm_90' is a duplicate of archs[0]. Fix: remove archs[2]."]),
    # --- phases
    ("phase-unknown", _set(("phases",), ["decode", "prefil"]), ["phases[1]: 'prefil' is not a known phase", "did you mean 'prefill'?"]),
    ("phase-unknown", _set(("phases",), ["decoding"]), ["phases[0]: 'decoding' is not a known phase", "did you mean 'decode'?"]),
    ("phases-empty", _set(("phases",), []), ["phases: the list is empty", "default [decode]"]),
    # --- tiers
    ("tier-dense", _set(("tiers", 0, "k"), "dense"), ["tiers[0].k: 'dense' is supported only with k_storage: float8_e4m3", "Fix: set k_storage: float8_e4m3, or tiers[0].k to sparse24."]),
    ("e4m3-v-dense", _set(("tiers", 0), {"k": "sparse24", "v": "dense", "v_storage": "float8_e4m3"}), ["tiers[0]: no template supports the tier mix {k: sparse24, v: dense} yet", "{k: dense, v: sparse24}"]),
    ("tier-mix-unsupported", _set(("tiers",), [{"k": "sparse24", "v": "sparse24"}, {"k": "sparse24", "v": "mixed"}]), ["tiers[1]: no template supports the tier mix {k: sparse24, v: mixed} yet", "Fix: use one of {k: sparse24, v: sparse24}, {k: mixed, v: mixed}"]),
    ("tier-unknown", _set(("tiers", 0, "v"), "sparse"), ["tiers[0].v: 'sparse' is not a known tier", "Fix: did you mean 'sparse24'?"]),
    ("tier-missing-v", _drop("tiers", 0, "v"), ["tiers[0].v: required key is missing", "e.g. v: sparse24"]),
    ("tier-duplicate", _set(("tiers",), [{"k": "sparse24", "v": "sparse24"}] * 2), ["tiers[1]: duplicate tier {k: sparse24, v: sparse24} is the same as tiers[0]. Fix: remove tiers[1]."]),
    ("tiers-strings", _set(("tiers",), ["sparse24"]), ["tiers[0]: expected a mapping, found a string ('sparse24')"]),
    # --- cache
    ("block-size-48", _set(("cache", "block_size"), 48), ["cache.block_size: 48 is not supported (block_size must be a multiple of 32 between 32 and 256). Fix: use one of 32, 64, 96, 128, 160, 192, 224, 256."]),
    ("block-size-512", _set(("cache", "block_size"), 512), ["cache.block_size: 512 is not supported"]),
    ("sink-not-multiple", _set(("cache", "sink"), 100), ["cache.sink: 100 is not a multiple of cache.block_size (64). Fix: use a multiple of 64, e.g. 64 or 128."]),
    ("sink-negative", _set(("cache", "sink"), -64), ["cache.sink: -64 is negative", "Fix: use 0 or a positive multiple of 64"]),
    ("window-not-multiple", _set(("cache", "local_window"), 200), ["cache.local_window: 200 is not a multiple of cache.block_size (64)", "e.g. 192 or 256"]),
    ("window-default-bs", _set(("cache",), {"local_window": 96}), ["cache.local_window: 96 is not a multiple of cache.block_size (64, the default)"]),
    ("cache-list", _set(("cache",), [64]), ["cache: expected a mapping, found a list", "Fix: write cache as 'key: value' pairs"]),
    ("cache-bool", _set(("cache", "sink"), False), ["cache.sink: expected an integer, found a boolean (false)"]),
    # --- decode
    ("warps-0", _set(("decode", "warps"), 0), ["decode.warps: 0 is out of range (warps must be between 1 and 8)", "or omit it to let the tile oracle decide"]),
    ("warps-16", _set(("decode", "warps"), 16), ["decode.warps: 16 is out of range"]),
    ("stages-1", _set(("decode", "stages"), 1), ["decode.stages: 1 is out of range (stages must be between 2 and 8). Fix: use an integer from 2 to 8, or omit it to let the tile oracle decide."]),
    ("chunk-48", _set(("decode", "chunk_tokens"), 48), ["decode.chunk_tokens: 48 is not supported (chunk_tokens must be 32 or 64). Fix: use 32 or 64"]),
    ("chunk-float", _set(("decode", "chunk_tokens"), 32.0), ["decode.chunk_tokens: expected an integer, found a float (32.0)", "Fix: write 32"]),
    ("decode-scalar", _set(("decode",), 4), ["decode: expected a mapping, found an integer (4)"]),
    # --- e4m3 storage (BASE has sm_80)
    ("e4m3-sm80", _set(("tiers", 0, "v_storage"), "float8_e4m3"), ["tiers[0].v_storage: float8_e4m3 needs sm_89 or newer", "archs has sm_80. Fix: drop sm_80 from archs, or keep this tier in the model dtype"]),
    ("storage-typo", _set(("tiers", 0, "k_storage"), "float8_e5m2"), ["tiers[0].k_storage: 'float8_e5m2' is not a storage", "use one of model, float8_e4m3"]),
    ("storage-key-typo", _set(("tiers", 0, "v_store"), "model"), ["tiers[0].v_store: unknown key", "did you mean 'v_storage'?"]),
]


@pytest.mark.parametrize(
    "mutate, fragments",
    [pytest.param(m, f, id=i) for i, m, f in BAD_DICTS],
)
def test_bad_spec_dicts(mutate, fragments):
    data = base()
    mutate(data)
    msg = spec_error(data)
    assert msg.startswith("bad.yaml: "), msg
    assert ". Fix: " in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_e4m3_tiers():
    data = base()
    data["archs"] = ["sm_89", "sm_90a"]
    data["tiers"] = [{"k": "sparse24", "v": "sparse24"}, {"k": "sparse24", "v": "sparse24", "v_storage": "FLOAT8_E4M3"}]
    spec = parse_spec(data)
    plain, fp8 = spec.tiers
    assert (plain.k_storage, plain.v_storage, plain.e4m3, plain.key) == ("model", "model", False, ("sparse24", "sparse24"))
    assert fp8.key == ("sparse24", "sparse24", "model", "float8_e4m3") and fp8.e4m3
    # the plain tier's dict keeps today's two keys (manifests and hashes of existing builds unchanged)
    assert spec.to_dict()["tiers"] == [{"k": "sparse24", "v": "sparse24"},
                                       {"k": "sparse24", "v": "sparse24", "k_storage": "model",
                                        "v_storage": "float8_e4m3"}]
    assert parse_spec(spec.to_dict()) == spec
    data["tiers"].append({"k": "mixed", "v": "mixed", "k_storage": "float8_e4m3", "v_storage": "float8_e4m3"})
    assert parse_spec(data).tiers[2].key == ("mixed", "mixed", "float8_e4m3", "float8_e4m3")  # the cache's tables
    data["tiers"].append({"k": "sparse24", "v": "sparse24", "v_storage": "float8_e4m3", "k_storage": "model"})
    assert "tiers[3]: duplicate tier {k: sparse24, v: sparse24, k_storage: model, v_storage: float8_e4m3}" in \
        spec_error(data)


def test_base_is_valid():
    # the table above only means something if the unmodified base passes
    assert parse_spec(base()).name == "demo"


def test_first_problem_is_reported():
    data = base()
    data["shapes"][0]["head_dim"] = 100
    data["archs"] = ["sm_75"]
    msg = spec_error(data)
    assert "shapes[0].head_dim" in msg
    assert "archs" not in msg


@pytest.mark.parametrize(
    "data, fragment",
    [
        (None, "<top level>: the spec is empty"),
        ([1, 2], "<top level>: expected a mapping of spec keys, found a list"),
        ("name: x", "<top level>: expected a mapping of spec keys, found a string ('name: x')"),
    ],
    ids=["none", "list", "string"],
)
def test_bad_top_level_objects(data, fragment):
    msg = spec_error(data, source="<spec>")
    assert msg.startswith("<spec>: "), msg
    assert fragment in msg
    assert "Fix: " in msg


# ---------------------------------------------------------------------------
# Bad files (raw YAML text)
# ---------------------------------------------------------------------------

GOOD_YAML = """\
name: demo
shapes:
  - {head_dim: 128, num_qo_heads: 32, num_kv_heads: 8}
archs: [sm_80]
"""

BAD_FILES = [
    (
        "unclosed-bracket",
        "name: demo\narchs: [sm_80, sm_90\nshapes: []\n",
        ["invalid YAML", "line 3, column", "Fix: correct the YAML syntax near line 3"],
    ),
    (
        "bad-indent",
        "name: demo\nshapes:\n  - head_dim: 128\n   num_qo_heads: 32\n",
        ["invalid YAML", "line 4, column 4"],
    ),
    (
        "tab-indent",
        "name: demo\nshapes:\n\t- head_dim: 128\n",
        ["invalid YAML", "line 3, column 1", "found character '\\t' that cannot start any token"],
    ),
    (
        "duplicate-key",
        GOOD_YAML + "archs: [sm_90]\n",
        ["line 5, column 1: invalid YAML: found duplicate key 'archs'", "Fix: remove or merge the repeated key"],
    ),
    ("empty-file", "", ["<top level>: the spec is empty", "Fix: write a mapping with at least the keys name, shapes, archs"]),
    ("only-comments", "# nothing here\n", ["<top level>: the spec is empty"]),
    ("top-level-list", "- name: demo\n- archs: [sm_80]\n", ["<top level>: expected a mapping of spec keys, found a list"]),
    ("top-level-scalar", "llama3\n", ["<top level>: expected a mapping of spec keys, found a string ('llama3')"]),
    (
        "yaml-bool-head-dim",
        GOOD_YAML.replace("head_dim: 128", "head_dim: yes"),
        ["shapes[0].head_dim: expected an integer, found a boolean (true)"],
    ),
]


@pytest.mark.parametrize(
    "text, fragments",
    [pytest.param(t, f, id=i) for i, t, f in BAD_FILES],
)
def test_bad_spec_files(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "Fix: " in msg, msg
    assert "Traceback" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_yaml_error_is_not_chained_raw(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_good_yaml_file_loads(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_YAML, encoding="utf-8")
    spec = load_spec(path)
    assert spec.name == "demo"
    assert spec.archs == ("sm_80",)
    assert spec.source == str(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: spec file not found")
    assert "Fix: check the path" in msg


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert "is a directory, not a spec file" in str(info.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "not valid UTF-8" in str(info.value)


def test_prefill_tile_overrides():
    base = {"name": "x", "archs": ["sm_90"], "phases": ["prefill"],
            "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}]}
    spec = parse_spec({**base, "prefill": {"warp_queries": 16, "step_keys": 64}})
    assert (spec.prefill.warp_queries, spec.prefill.step_keys, spec.prefill.stages) == (16, 64, None)
    with pytest.raises(SpecError, match=r"prefill.warp_queries: 20 is not supported \(warp_queries must be one of "
                                        r"16, 24, 32\)\. Fix: use one of 16, 24, 32, or omit it"):
        parse_spec({**base, "prefill": {"warp_queries": 20}})
    with pytest.raises(SpecError, match="prefill.step_keys: 64 keys a softmax step exceed the 32-token stage"):
        parse_spec({**base, "prefill": {"chunk_tokens": 32, "step_keys": 64}})
    with pytest.raises(SpecError, match="prefill.warps_queries: unknown key 'warps_queries'. Fix: did you mean 'warp_queries'"):
        parse_spec({**base, "prefill": {"warps_queries": 16}})
