"""Variants, names, tiles, hashes and rendering: no compiler needed."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hierasparse_gen.compiler import Toolchain, nvcc_flags, variant_hash
from hierasparse_gen.render import render
from hierasparse_gen.spec import SpecError, Tier, load_spec, parse_spec
from hierasparse_gen.tiles import TileError, decode_smem_bytes, decode_tiles
from hierasparse_gen.variants import expand

REPO = Path(__file__).resolve().parent.parent
TOOLS = Toolchain("nvcc", "13.0.88", "/cutlass", "4.2.0.0", None)


@pytest.fixture(scope="module")
def llama3():
    return load_spec(REPO / "specs" / "llama3.yaml")


def test_llama3_variant_names(llama3):
    names = [v.name for v in expand(llama3)]
    # per spec tier: all-2:4 flat tensors get the all-2:4 and balanced (dense K) kernels, the
    # cache's mixed tiers one block-table kernel
    assert [n for n in names if n.startswith("prefill")] == [
        f"prefill_d128_g4_{t}_{tier}_{a}" for a in ("sm80", "sm90") for t in ("f16", "bf16")
        for tier in ("k24_v24", "kd_v24", "km_vm_b64")] + [
        f"prefill_d128_g4_{t}_{tier}_wg_sm90a" for t in ("f16", "bf16")
        for tier in ("k24_v24", "kd_v24", "km_vm_b64")]  # sm_90a: wgmma only (all-2:4, balanced, block tables)
    names = [n for n in names if not n.startswith("prefill")]
    assert names == [
        "runtime",
        "compress_d128_f16_sm80", "decode_d128_g4_f16_k24_v24_sm80", "decode_d128_g4_f16_km_vm_b64_sm80",
        "compress_d128_bf16_sm80", "decode_d128_g4_bf16_k24_v24_sm80", "decode_d128_g4_bf16_km_vm_b64_sm80",
        "compress_d128_f16_sm90", "decode_d128_g4_f16_k24_v24_sm90", "decode_d128_g4_f16_km_vm_b64_sm90",
        "compress_d128_bf16_sm90", "decode_d128_g4_bf16_k24_v24_sm90", "decode_d128_g4_bf16_km_vm_b64_sm90",
    ]
    mixed = [v for v in expand(llama3) if v.block_size and v.kind == "decode"]
    assert mixed and all(v.template == "decode_mixed.cu.j2" and v.tiles["chunk_tokens"] == 32 for v in mixed)
    prefill = [v for v in expand(llama3) if v.kind == "prefill" and not v.wgmma]
    assert all(v.tiles["warp_queries"] == 24 and v.n_tiles == 3 for v in prefill)
    wgmma = [v for v in expand(llama3) if v.wgmma]
    assert [v.arch for v in wgmma] == ["sm_90a"] * 6 and all(v.template == "prefill_sm90.cu.j2" for v in wgmma)
    assert all(v.compute_capability == (9, 0) for v in wgmma)
    assert [v.tier for v in wgmma] == [Tier("sparse24", "sparse24"), Tier("dense", "sparse24"), Tier("mixed", "mixed")] * 2
    assert [v.block_size for v in wgmma] == [0, 0, 64] * 2  # the block-table kernel: one 64-token block a slab


def _spec_with(**changes):
    data = yaml.safe_load((REPO / "specs" / "llama3.yaml").read_text())
    data.update(changes)
    return parse_spec(data)


def test_sm90a_alone_also_gets_the_warp_level_kernels():
    variants = {v.name: v for v in expand(_spec_with(archs=["sm_90a"], dtypes=["float16"]))}
    assert variants["prefill_d128_g4_f16_k24_v24_wg_sm90a"].wgmma
    # the warp-level all-2:4 kernel of the same tiers too (calls with lengths, chunks)
    assert variants["prefill_d128_g4_f16_k24_v24_sm90a"].template == "prefill.cu.j2"
    assert "decode_d128_g4_f16_k24_v24_sm90a" in variants and "compress_d128_f16_sm90a" in variants
    assert variants["prefill_d128_g4_f16_kd_v24_sm90a"].template == "prefill.cu.j2"  # balanced: warp-level too
    assert variants["prefill_d128_g4_f16_kd_v24_wg_sm90a"].wgmma
    assert len({(v.name) for v in variants.values()}) == len(expand(_spec_with(archs=["sm_90a"],
                                                                                dtypes=["float16"])))


def test_wgmma_prefill_only_where_its_kernel_exists():
    # head_dim 64: no wgmma kernel (the warp-level ones cover it)
    shapes = [{"head_dim": 64, "num_qo_heads": 8, "num_kv_heads": 8},
              {"head_dim": 128, "num_qo_heads": 16, "num_kv_heads": 2}]
    names = [v.name for v in expand(_spec_with(shapes=shapes, archs=["sm_90", "sm_90a"]))]
    assert [n for n in names if n.endswith("sm90a")] == [
        "prefill_d128_g8_f16_k24_v24_wg_sm90a", "prefill_d128_g8_f16_kd_v24_wg_sm90a",
        "prefill_d128_g8_f16_km_vm_b64_wg_sm90a", "prefill_d128_g8_bf16_k24_v24_wg_sm90a",
        "prefill_d128_g8_bf16_kd_v24_wg_sm90a", "prefill_d128_g8_bf16_km_vm_b64_wg_sm90a"]
    # the cache's tier alone: only the block-table kernel, and only for 64-token blocks (a block is a slab)
    mixed = [{"k": "mixed", "v": "mixed"}]
    table = [v for v in expand(_spec_with(archs=["sm_90", "sm_90a"], tiers=mixed)) if v.wgmma]
    assert {(v.tier.k, v.tier.v) for v in table} == {("mixed", "mixed")} and {v.block_size for v in table} == {64}
    cache = {"block_size": 128, "sink": 128, "local_window": 256}
    assert not [v for v in expand(_spec_with(archs=["sm_90", "sm_90a"], tiers=mixed, cache=cache)) if v.wgmma]
    assert not [v for v in expand(_spec_with(archs=["sm_90", "sm_90a"], phases=["decode"])) if v.wgmma]


def test_prefill_tile_oracle():
    from hierasparse_gen.tiles import prefill_smem_bytes, prefill_tiles
    # queries a warp: as many as its registers hold (Q^T and O^T grow with head_dim)
    assert {d: prefill_tiles(d, "sm_90", "sparse24", "sparse24").warp_queries for d in (64, 96, 128, 256)} == \
        {64: 32, 96: 32, 128: 24, 256: 16}
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        for d in range(64, 257, 32):
            for tiers in (("sparse24", "sparse24"), ("dense", "sparse24"), ("mixed", "mixed")):
                t = prefill_tiles(d, arch, *tiers)
                assert prefill_smem_bytes(d, *tiers, t) <= {"sm_80": 163, "sm_86": 99, "sm_89": 99,
                                                            "sm_90": 227}[arch] * 1024
    # Hopper keeps two CTAs of three stages; dense pieces take more room than 2:4 ones
    t = prefill_tiles(128, "sm_90", "mixed", "mixed")
    assert (t.stages, t.min_ctas) == (3, 2)
    assert prefill_smem_bytes(128, "mixed", "mixed", t) > prefill_smem_bytes(128, "sparse24", "sparse24", t)


def test_shapes_sharing_head_dim_and_group_share_a_variant():
    spec = parse_spec({"name": "x", "archs": ["sm_90"], "shapes": [
        {"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8},
        {"head_dim": 128, "num_qo_heads": 64, "num_kv_heads": 16},   # same group 4
        {"head_dim": 64, "num_qo_heads": 12, "num_kv_heads": 4}]})   # group 3
    names = sorted(v.name for v in expand(spec))
    assert names == ["compress_d128_f16_sm90", "compress_d64_f16_sm90", "decode_d128_g4_f16_k24_v24_sm90",
                     "decode_d64_g3_f16_k24_v24_sm90", "runtime"]


def test_tile_oracle_and_overrides():
    assert decode_tiles(128, 4, "sm_90").as_dict() == {"warps": 8, "stages": 2, "chunk_tokens": 32}
    assert decode_tiles(128, 4, "sm_90", stages=3).stages == 3
    # fewer warps where 8 do not fit: head_dim 256 (a 2-stage all-2:4 pipeline is 36 KB a warp)
    assert decode_tiles(256, 16, "sm_90").warps == 6 and decode_tiles(256, 16, "sm_89").warps == 2
    # every default fits the arch's shared memory
    for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
        for d in range(64, 257, 32):
            for g in (1, 4, 5, 8, 16):
                t = decode_tiles(d, g, arch)
                assert decode_smem_bytes(d, g, t) <= {"sm_80": 163, "sm_86": 99, "sm_89": 99, "sm_90": 227}[arch] * 1024
    with pytest.raises(TileError, match="need 1179648 bytes of shared memory for head_dim 256, but sm_90 allows 232448"):
        decode_tiles(256, 4, "sm_90", warps=8, stages=4, chunk_tokens=64)


def test_tile_oracle_counts_the_bytes_each_storage_stages():
    """An e4m3 stage is smaller (2:4 e4m3: D/2 + D/8 + 2 bytes a token for K and for V, dense e4m3 D + 2), so
    the oracle fits a deeper pipeline where the model-dtype stage does not."""
    from hierasparse_gen.spec_schema import Tier
    e24 = Tier("sparse24", "sparse24", "float8_e4m3", "float8_e4m3")
    edense = Tier("dense", "dense", "float8_e4m3", "float8_e4m3")
    from hierasparse_gen.tiles import DecodeTiles
    t = DecodeTiles(4, 3, 32)
    assert decode_smem_bytes(128, 4, t) == 4 * 3 * 32 * 2 * (128 + 16)
    assert decode_smem_bytes(128, 4, t, tier=e24) == 4 * 3 * 32 * 2 * (64 + 16 + 2)
    assert decode_smem_bytes(128, 4, t, tier=edense) == 4 * 3 * 32 * 2 * (128 + 2)
    assert decode_smem_bytes(128, 4, t, tier=Tier("sparse24", "sparse24", v_storage="float8_e4m3")) == \
        4 * 3 * 32 * (128 + 16 + 64 + 16 + 2)
    # where the model-dtype stage leaves room for fewer warps, e4m3's does for more
    assert decode_tiles(256, 4, "sm_89").warps == 2
    assert decode_tiles(256, 4, "sm_89", tier=e24).warps == 4
    # and every e4m3 default fits
    for d in range(64, 257, 32):
        for g in (1, 4, 16):
            for t in (e24, edense):
                assert decode_smem_bytes(d, g, decode_tiles(d, g, "sm_89", tier=t), tier=t) <= 99 * 1024


def test_spec_tiles_that_do_not_fit_are_a_spec_error():
    spec = parse_spec({"name": "x", "archs": ["sm_86"], "shapes": [
        {"head_dim": 256, "num_qo_heads": 8, "num_kv_heads": 8}], "decode": {"warps": 8, "stages": 8}})
    with pytest.raises(SpecError, match="decode tiles warps=8, stages=8.*lower decode.stages"):
        expand(spec)


def test_render_is_deterministic_and_documents_its_spec(llama3):
    for v in expand(llama3):
        a, b = render(v, llama3), render(v, llama3)
        assert a == b
        assert f"variant : {v.name}" in a
        if v.kind == "decode":
            assert "head_dim       = 128" in a and "group          = 4" in a
            assert f"stages         = {v.tiles['stages']}" in a and f"warps          = {v.tiles['warps']}" in a
            assert f"{v.symbol}(" in a and "mma_sp(" in a


def test_hash_covers_source_flags_tools_and_arch(llama3):
    v = next(v for v in expand(llama3) if v.kind == "decode")
    src = render(v, llama3)
    h = variant_hash(src, nvcc_flags(v.arch), TOOLS, v.arch)
    assert h == variant_hash(src, nvcc_flags(v.arch), TOOLS, v.arch)
    assert h != variant_hash(src + " ", nvcc_flags(v.arch), TOOLS, v.arch)
    assert h != variant_hash(src, nvcc_flags(v.arch) + ["-G"], TOOLS, v.arch)
    assert h != variant_hash(src, nvcc_flags(v.arch), dataclasses.replace(TOOLS, nvcc_version="13.1.0"), v.arch)
    assert h != variant_hash(src, nvcc_flags(v.arch), dataclasses.replace(TOOLS, cutlass_version="4.3.0"), v.arch)
    assert h != variant_hash(src, nvcc_flags(v.arch), TOOLS, "sm_86")


def test_hopper_headers_are_inlined_and_hashed(llama3, tmp_path, monkeypatch):
    """The sm_90a kernel's plain C++ headers (sm90/ beside the templates) are inlined at render time, each once:
    the translation unit stays self-contained and a header change changes the source, hence the variant hash."""
    import shutil
    from hierasparse_gen import render as render_module
    templates = render_module.templates_dir()
    v = next(v for v in expand(llama3) if v.wgmma and v.tier.k == "mixed")
    src = render(v, llama3)
    headers = sorted(p.name for p in (templates / "sm90").glob("*.cuh"))
    assert headers and '#include "sm90/' not in src
    for name in headers:
        assert src.count(f"// ---- sm90/{name} ----") == 1, name
    assert "template <bool kTail>\n__global__" in src and "if constexpr (kTable)" in src
    copy = tmp_path / "templates"
    shutil.copytree(templates, copy)
    with open(copy / "sm90" / "softmax.cuh", "a") as fh:
        fh.write("// a changed header\n")
    w = next(v for v in expand(llama3) if v.kind == "prefill" and not v.wgmma)  # includes no sm90 header
    before = render(w, llama3)
    monkeypatch.setattr(render_module, "templates_dir", lambda: copy)
    changed = render(v, llama3)
    assert changed != src and "// a changed header" in changed
    assert variant_hash(changed, nvcc_flags(v.arch), TOOLS, v.arch) != variant_hash(src, nvcc_flags(v.arch), TOOLS,
                                                                                   v.arch)
    assert render(w, llama3) == before


def test_cache_headers_are_inlined_into_the_compress_kernels(llama3):
    """compress.cu.j2 is a thin instantiation over the plain headers of cache/: every one inlined once, none
    left to nvcc's include paths, no Jinja inside them (they are C++ as they stand)."""
    from hierasparse_gen import render as render_module
    folder = render_module.templates_dir() / "cache"
    v = next(v for v in expand(llama3) if v.kind == "compress")
    src = render(v, llama3)
    headers = sorted(folder.glob("*.cuh"))
    assert headers and '#include "cache/' not in src
    # the e4m3 packers, pools and widening: only where the spec has e4m3 tiers
    e4m3_only = ("pack8.cuh", "table8.cuh", "widen8.cuh")
    for path in headers:
        assert src.count(f"// ---- cache/{path.name} ----") == (path.name not in e4m3_only), path.name
        assert "{{" not in path.read_text() and "{%" not in path.read_text(), path.name
    for kernel in ("compress_k_kernel", "compress_v_kernel", "score_kernel", "select_kernel", "append_kernel",
                   "commit_kernel"):
        assert f"{kernel}(" in src, kernel
    fp8 = load_spec(REPO / "specs" / "llama3_fp8.yaml")
    v8 = next(v for v in expand(fp8) if v.kind == "compress")
    src8 = render(v8, fp8)
    assert v8.abi == "compress7f8" and v.abi == "compress7"
    assert all(src8.count(f"// ---- cache/{h} ----") == 1 for h in e4m3_only)
    assert all(f"HSG_COMPRESS8_ENTRY({v8.symbol}_{s}," in src8 for s in ("k8", "v8", "kd8", "vd8"))
    assert all(f"HSG_FILL8_ENTRY({v8.symbol}_fill_{t}8," in src8 for t in "kv") and f"{v8.symbol}_append8(" in src8
    assert "HSG_COMPRESS8_ENTRY" not in src and "_append8(" not in src and "#define HSG_FP8 0" in src


def test_changing_a_tile_changes_only_decode_sources(llama3):
    other = dataclasses.replace(llama3, decode=dataclasses.replace(llama3.decode, warps=2))
    before = {v.name: render(v, llama3) for v in expand(llama3)}
    after = {v.name: render(v, other) for v in expand(other)}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {n for n in before if n.startswith("decode_")}


def test_gencode_flags_are_explicit_pairs():
    flags = nvcc_flags("sm_90")
    assert "-gencode" in flags and "arch=compute_90,code=sm_90" in flags
    assert "-DNDEBUG" in flags and not any(f.startswith("-arch") for f in flags)


def test_build_path_does_not_import_torch():
    code = ("import sys, hierasparse_gen.compiler, hierasparse_gen.cli; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_manifest_records_each_variants_family_and_c_abi(llama3):
    """A variant's kernel family and C ABI are explicit fields, written to the manifest (describe()); the
    registry declares the ctypes signatures by the ABI, never by the template's file name."""
    from hierasparse_gen.abi import ABIS
    described = {v.name: v.describe() for v in expand(llama3)}
    abi = {name: d["abi"] for name, d in described.items()}
    family = {name: d["family"] for name, d in described.items()}
    assert set(abi.values()) <= ABIS
    assert (family["runtime"], abi["runtime"]) == ("host", "runtime")
    assert (family["compress_d128_f16_sm90"], abi["compress_d128_f16_sm90"]) == ("mma_sp", "compress7")
    assert (family["decode_d128_g4_f16_k24_v24_sm90"], abi["decode_d128_g4_f16_k24_v24_sm90"]) == ("mma_sp", "decode")
    assert abi["decode_d128_g4_f16_km_vm_b64_sm90"] == "decode_table"
    for tier in ("k24_v24", "kd_v24", "km_vm_b64"):  # the warp-level prefill: one ABI for every tier mix
        assert (family[f"prefill_d128_g4_f16_{tier}_sm90"], abi[f"prefill_d128_g4_f16_{tier}_sm90"]) == \
            ("mma_sp", "prefill")
    assert {abi[f"prefill_d128_g4_bf16_{tier}_wg_sm90a"]: family[f"prefill_d128_g4_bf16_{tier}_wg_sm90a"]
            for tier in ("k24_v24", "kd_v24", "km_vm_b64")} == {
        "prefill_wgmma": "wgmma", "prefill_wgmma_balanced": "wgmma", "prefill_wgmma_table": "wgmma"}
    # wgmma is the family field, not the template: a variant of the sm_90a template marked warp-level is not wgmma
    v = next(v for v in expand(llama3) if v.wgmma)
    assert not dataclasses.replace(v, family="mma_sp", abi="").wgmma
    with pytest.raises(SpecError, match="variant family 'tensor' is unknown. Fix: use one of mma_sp, wgmma, host"):
        dataclasses.replace(v, family="tensor")


def test_e4m3_decode_variants():
    """An e4m3 tier gives decode variants named by storage with the decode8 ABI (scales after each tensor's
    metadata; decode_table8 for the cache's block tables), no prefill variants of its own (prefill reads e4m3 in
    the model dtype), and a source that converts e4m3 in registers; model-dtype variants' sources do not change."""
    spec = load_spec(REPO / "specs" / "llama3_fp8.yaml")
    by_name = {v.name: v for v in expand(spec)}
    assert {"decode_d128_g4_f16_k24f8_v24f8_sm90", "decode_d128_g4_bf16_k24_v24f8_sm90",
            "decode_d128_g4_f16_k24_v24_sm90", "decode_d128_g4_f16_kmf8_vmf8_b64_sm90"} <= set(by_name)
    assert by_name["decode_d128_g4_f16_kmf8_vmf8_b64_sm90"].abi == "decode_table8"
    prefill = [v for v in by_name.values() if v.kind == "prefill"]
    assert prefill and not any(v.tier.e4m3 for v in prefill)
    assert any(v.wgmma for v in prefill)  # sm_90a: prefill over e4m3 runs the wgmma kernels on H100/H200
    v8 = by_name["decode_d128_g4_f16_k24f8_v24f8_sm90"]
    d = v8.describe()
    assert d["abi"] == "decode8" and d["tier"] == {"k": "sparse24", "v": "sparse24", "k_storage": "float8_e4m3",
                                                   "v_storage": "float8_e4m3"}
    assert by_name["decode_d128_g4_f16_k24_v24_sm90"].describe()["tier"] == {"k": "sparse24", "v": "sparse24"}
    src = render(v8, spec)
    assert "cvt.rn.f16x2.e4m3x2" in src and "const void* k_scales" in src and "scale_keys(" in src
    plain = render(by_name["decode_d128_g4_f16_k24_v24_sm90"], spec)
    assert "cvt.rn.f16x2.e4m3x2" not in plain and "const void* k_scales" not in plain
    v_only = render(by_name["decode_d128_g4_bf16_k24_v24f8_sm90"], spec)
    assert "v_chunk_e4m3<kVDense>(o_acc" in v_only and "scale_keys(s_acc" not in v_only
    # a spec with e4m3 and sm_80 is refused before anything is expanded
    with pytest.raises(SpecError, match="float8_e4m3 needs sm_89 or newer"):
        parse_spec({**yaml.safe_load((REPO / "specs" / "llama3_fp8.yaml").read_text()), "archs": ["sm_80", "sm_90"]})


def test_split_heuristic():
    from hierasparse_gen.tiles import choose_splits
    # many (batch, head) pairs: CTAs a multiple of the SMs, as few splits as that allows
    assert choose_splits(64, 1024, 8, 132, 2) == 2     # Llama-3 shape, B=8, 32K: 128 CTAs
    assert choose_splits(8, 1024, 8, 132, 2) == 16     # one KV head, B=8: 128 CTAs
    # one pair: at most half the SMs and at least two 32-token chunks a warp
    assert choose_splits(1, 1024, 8, 132, 2) == 64     # 32K (61-63 would leave one split a chunk longer)
    assert choose_splits(1, 512, 8, 132, 2) == 32      # 16K: two chunks a warp
    assert choose_splits(1, 4096, 8, 132, 2) == 63     # 128K
    assert choose_splits(1, 40, 8, 132, 2) == 2        # 1280 tokens: two splits of 2.5 chunks a warp
    assert choose_splits(1, 31, 8, 132, 2) == 1        # a short sequence: one split
    for bh in (1, 3, 8, 64, 257):
        for chunks in (1, 33, 1024, 4096):
            s = choose_splits(bh, chunks, 4, 132, 2)
            assert 1 <= s <= max(1, chunks // 8)
