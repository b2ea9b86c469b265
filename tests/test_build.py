"""Compile tests (nvcc, no GPU): the library, its manifest and SASS, incremental and
concurrent builds, loading with ctypes without a GPU, dispatch messages, the CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import hierasparse_gen
from hierasparse_gen.compiler import CompileError, build
from hierasparse_gen.registry import CudaError, DispatchError

pytestmark = pytest.mark.nvcc
REPO = Path(__file__).resolve().parent.parent
TINY = {"name": "tiny", "archs": ["sm_90"], "dtypes": ["float16"],
        "shapes": [{"head_dim": 64, "num_qo_heads": 2, "num_kv_heads": 1}]}


def _cuobjdump() -> list[str]:
    """cuobjdump (with nvdisasm on PATH): the toolkit's, else the nvidia-cuda-cuobjdump wheel's."""
    candidates = [shutil.which("cuobjdump")]
    try:
        import nvidia.cu13
        candidates.append(os.path.join(list(nvidia.cu13.__path__)[0], "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return [c]
    pytest.skip("cuobjdump not available (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def _sass(lib: Path) -> str:
    tool = _cuobjdump()[0]
    env = dict(os.environ, PATH=os.path.dirname(tool) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([tool, "-sass", str(lib)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _kernels(sass: str) -> dict[str, str]:
    """SASS text per kernel function."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


def _write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_manifest_records_variants_hashes_and_tools(llama3_build):
    m = json.loads((llama3_build / "manifest.json").read_text())
    assert m["spec"]["name"] == "llama3" and (llama3_build / m["library"]).is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+", m["tools"]["nvcc"]) and m["tools"]["cutlass"] == "4.2.0.0"
    names = {v["name"] for v in m["variants"]}
    assert {"decode_d128_g4_f16_k24_v24_sm90", "decode_d128_g4_bf16_k24_v24_sm80",
            "compress_d128_bf16_sm90", "runtime"} <= names
    for v in m["variants"]:
        assert len(v["hash"]) == 64 and (llama3_build / v["source"]).is_file()
        assert (llama3_build / v["object"]).is_file() and v["hash"][:16] in v["object"]
    dec = next(v for v in m["variants"] if v["name"] == "decode_d128_g4_f16_k24_v24_sm90")
    assert dec["tiles"] == {"warps": 8, "stages": 2, "chunk_tokens": 32}
    assert "hsg_decode_d128_g4_f16_k24_v24_sm90" in dec["entry_points"]
    assert "arch=compute_90,code=sm_90" in dec["flags"]
    assert (dec["family"], dec["abi"]) == ("mma_sp", "decode")  # the registry declares its ctypes by these
    wg = next(v for v in m["variants"] if v["name"] == "prefill_d128_g4_f16_km_vm_b64_wg_sm90a")
    assert (wg["family"], wg["abi"]) == ("wgmma", "prefill_wgmma_table")


def test_sass_uses_sparse_tensor_cores_without_traps_or_local_memory(llama3_build):
    kernels = _kernels(_sass(llama3_build / "libhierasparse_llama3.so"))
    decode = {k: v for k, v in kernels.items() if "decode_kernel" in k or "decode_mixed_kernel" in k}
    assert len(decode) == 8  # f16/bf16 x sm_80/sm_90 x flat/mixed
    for name, text in decode.items():
        assert "HMMA.SP.16832.F32" in text, name
        assert "MOVM" in text, name          # P^T built in registers, not through shared memory
        assert "LDGSTS" in text, name        # cp.async pipeline
        for bad in ("BPT.TRAP", "LDL", "STL"):
            assert bad not in text, (name, bad)
    assert any(".BF16" in t for k, t in decode.items() if "bf16" in k)
    for name, text in decode.items():
        if "mixed" in name:  # dense blocks: ldmatrix (and its transposed form for V) + mma.sync
            assert "LDSM.16.M88.4" in text and "LDSM.16.MT88.4" in text and "HMMA.16816.F32" in text, name
    for name, text in kernels.items():
        assert "BPT.TRAP" not in text, name
        if "append_kernel" in name:  # see test_ptxas_reports_no_spills: at most two values parked for the kernel
            assert text.count("LDL") <= 2 and text.count("STL") <= 2, name
        elif "prefill_kernel" not in name or "sm90a" in name:  # warp-level prefill: see test_ptxas_reports_no_spills
            assert "LDL" not in text and "STL" not in text, name
    wgmma = {k: v for k, v in kernels.items() if "prefill_kernel" in k and "sm90a" in k}
    assert len(wgmma) == 12  # f16/bf16 on sm_90a x all-2:4 / balanced / block tables x whole tiles / tail
    for name, text in wgmma.items():  # sparse warpgroup MMA fed by bulk copies, P^T through stmatrix
        assert "HGMMA.SP.64x64x32.F32" in text and "UBLKCP" in text and "STSM" in text, name
        assert "HMMA" not in text, name
        # balanced and block tables: dense rows by TMA tile loads into a dense warpgroup MMA; the tables' dense
        # V blocks read MN-major (V^T as A)
        dense = "_kd_v24_" in name or "_km_vm_" in name
        assert ("UTMALDG.4D" in text) == dense and ("HGMMA.64x64x16.F32" in text) == dense, name
        assert (".tnspA" in text) == ("_km_vm_" in name), name
    assert sum("_kd_v24_" in k for k in wgmma) == 4 and sum("_km_vm_b64_" in k for k in wgmma) == 4
    assert any(".BF16" in t for k, t in wgmma.items() if "bf16" in k)
    prefill = {k: v for k, v in kernels.items() if "prefill_kernel" in k and "sm90a" not in k}
    assert len(prefill) == 12  # f16/bf16 x sm_80/sm_90 x all-2:4, balanced, block table
    for name, text in prefill.items():
        assert "HMMA.SP.16832.F32" in text and "MOVM" in text and "LDGSTS" in text, name
        if "kd_v24" in name or "km_vm" in name:  # dense K pieces: ldmatrix + mma.sync
            assert "LDSM.16.M88.4" in text and "HMMA.16816.F32" in text, name
        if "km_vm" in name:  # dense V pieces: transposed ldmatrix
            assert "LDSM.16.MT88.4" in text, name


def test_ptxas_reports_no_spills(llama3_build):
    # decode and compression: none. Prefill at head_dim 128 (24 queries a warp, 64-key
    # steps) fills all 255 registers; ptxas parks a few loop-invariant addresses in local
    # memory (16-24 bytes, read back about twice a 128-key stage and in the epilogue), which
    # measured faster than 32-key steps without spills (438 against 404 TFLOP/s on the H200).
    # The sm_90a kernels: no spills and no ptxas "serialized" message (C751x/C7520: every wgmma of the
    # function would wait to completion). Compression: V's compensation divides in IEEE float32 (bit-exact with
    # format.compensate_v), a fast path plus a slow-path CALL; around those calls ptxas may park a value or two in
    # local memory for the whole kernel (the bf16 append kernel: two 4-byte values, stored at entry and loaded at
    # exit, since V's units read a token's 32 bytes by lane pairs).
    logs = [p for p in (llama3_build / "obj").glob("*.log") if not p.name.startswith("runtime")]  # no kernels
    assert logs and any("sm90a" in p.name for p in logs)
    for log in logs:
        text = log.read_text()
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert spills, log.name
        if "sm90a" in log.name:
            assert all(st == ld == "0" for st, ld in spills), (log.name, spills)
        limit = 32 if log.name.startswith("prefill_") else 8 if log.name.startswith("compress_") else 0
        assert all(int(st) <= limit for st, _ in spills), (log.name, spills)
        # the block-table kernel picks the dense or 2:4 wgmma per slab by a branch inside the wgmma window:
        # ptxas injects warpgroup arrives there (C7519, a fence) but must not serialize or inject waits
        bad = r"C751[0-8]|C7520" if "_km_vm_b64_wg_" in log.name else r"C751[0-9]|C7520"
        assert not re.search(bad, text), (log.name, text)


def test_library_exports_only_the_c_abi(llama3_build):
    lib = llama3_build / "libhierasparse_llama3.so"
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    symbols = [line.split()[-1] for line in out.splitlines() if " T " in line]
    assert symbols and all(s.startswith("hsg_") for s in symbols), symbols
    assert not any("cuda" in s for s in symbols)  # static cudart stays hidden
    deps = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
    assert "libcudart" not in deps and "libtorch" not in deps


def test_load_without_gpu_gives_a_clear_error(llama3_build):
    lib = hierasparse_gen.load(llama3_build)
    assert {v.name for v in lib.variants if v.kind == "decode"} == {
        f"decode_d128_g4_{t}_{tier}_{a}" for t in ("f16", "bf16") for a in ("sm80", "sm90")
        for tier in ("k24_v24", "km_vm_b64")}
    dec = lib.select("decode", head_dim=128, dtype="float16", cc=(9, 0), group=4, tier=("sparse24", "sparse24"))
    assert dec.smem_bytes == 8 * 2 * 9216 and dec.threads == 256
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        with pytest.raises(CudaError, match="no CUDA device available to libhierasparse_llama3.so"):
            lib.device_count()


def test_dispatch_prefers_the_newest_matching_arch_and_explains_rejections(llama3_build):
    lib = hierasparse_gen.load(llama3_build)
    pick = lambda cc: lib.select("decode", head_dim=128, dtype="bfloat16", cc=cc, group=4,
                                 tier=("sparse24", "sparse24")).name
    assert pick((9, 0)) == "decode_d128_g4_bf16_k24_v24_sm90"
    assert pick((8, 9)) == "decode_d128_g4_bf16_k24_v24_sm80"  # sm_80 cubins run on 8.x
    with pytest.raises(DispatchError) as e:
        lib.select("decode", head_dim=96, dtype="float16", cc=(9, 0), group=5, tier=("sparse24", "sparse24"))
    msg = str(e.value)
    assert "decode_d128_g4_f16_k24_v24_sm90: head_dim 128 != 96; GQA group 4 != 5" in msg
    assert "head_dim 96 and num_qo_heads/num_kv_heads = 5 under `shapes`" in msg
    assert "specs/llama3.yaml" in msg
    with pytest.raises(DispatchError, match="built for sm_90, device is sm_100"):
        lib.select("compress", head_dim=128, dtype="float16", cc=(10, 0))
    # the sm_90a wgmma prefill: only on compute capability 9.0 exactly, selected by its family
    wgmma = dict(family="wgmma", head_dim=128)
    find = lambda cc, dtype="float16", group=4: lib.find("prefill", dtype=dtype, cc=cc, group=group,
                                                         tier=("sparse24", "sparse24"), **wgmma)
    assert find((9, 0)).name == "prefill_d128_g4_f16_k24_v24_wg_sm90a"
    assert find((9, 0), "bfloat16").name == "prefill_d128_g4_bf16_k24_v24_wg_sm90a"
    assert find((8, 9)) is None and find((10, 0)) is None and find((9, 0), group=8) is None
    assert lib.find("prefill", dtype="float16", cc=(9, 0), group=4,
                    tier=("dense", "sparse24"), **wgmma).name == "prefill_d128_g4_f16_kd_v24_wg_sm90a"
    assert lib.find("prefill", dtype="float16", cc=(9, 0), group=4,
                    tier=("mixed", "mixed"), **wgmma).name == "prefill_d128_g4_f16_km_vm_b64_wg_sm90a"
    assert lib.find("prefill", dtype="float16", cc=(9, 0), group=8, tier=("mixed", "mixed"), **wgmma) is None
    assert lib.select("prefill", head_dim=128, dtype="float16", cc=(9, 0), group=4,
                      tier=("sparse24", "sparse24")).name == "prefill_d128_g4_f16_k24_v24_sm90"


def test_wgmma_kernel_built_for_the_wrong_target_fails_to_compile(tmp_path):
    from hierasparse_gen.render import render
    from hierasparse_gen.spec import load_spec
    from hierasparse_gen.variants import expand
    spec = load_spec(REPO / "specs" / "llama3.yaml")
    v = next(v for v in expand(spec) if v.wgmma)
    src = tmp_path / "wgmma.cu"
    src.write_text(render(v, spec))
    from hierasparse_gen.compiler import find_toolchain
    tools = find_toolchain()
    proc = subprocess.run([tools.nvcc, "-std=c++17", "-c", *tools.includes, "-gencode", "arch=compute_90,code=sm_90",
                           str(src), "-o", str(tmp_path / "o.o")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "build it for sm_90a" in proc.stdout + proc.stderr


def test_cpu_tensors_are_refused_before_any_launch(llama3_build):
    import torch
    lib = hierasparse_gen.load(llama3_build)
    with pytest.raises(ValueError, match=r"k: tensor is on cpu. Fix: move it to the GPU"):
        lib.compress_k(torch.randn(1, 8, 10, 128, dtype=torch.float16))


def test_incremental_rebuild(tmp_path):
    spec = _write_spec(tmp_path, TINY)
    out = tmp_path / "out"
    first = build(spec, out_dir=out, log=None)
    assert {bv.variant.name for bv in first.compiled} == {"runtime", "compress_d64_f16_sm90",
                                                         "decode_d64_g2_f16_k24_v24_sm90"}
    lib_stat = (out / "libhierasparse_tiny.so").stat()
    src_mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "src").iterdir()}
    t0 = time.monotonic()
    again = build(spec, out_dir=out, log=None)
    assert time.monotonic() - t0 < 2.0
    assert not again.compiled and not again.linked
    assert (out / "libhierasparse_tiny.so").stat().st_mtime_ns == lib_stat.st_mtime_ns
    assert {p.name: p.stat().st_mtime_ns for p in (out / "src").iterdir()} == src_mtimes  # not rewritten
    # one tile changes: only the decode variant recompiles, and its old object goes away
    spec = _write_spec(tmp_path, dict(TINY, decode={"stages": 3}))
    third = build(spec, out_dir=out, log=None)
    assert [bv.variant.name for bv in third.compiled] == ["decode_d64_g2_f16_k24_v24_sm90"] and third.linked
    assert len(list((out / "obj").glob("decode_*.o"))) == 1


def test_concurrent_builds_of_one_spec_are_safe(tmp_path):
    spec = _write_spec(tmp_path, dict(TINY, name="twice"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hierasparse_gen.cli", "build", str(spec), "--out", str(out), "--jobs", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    # the summary line of each build: one compiled everything, the other waited and reused it
    summaries = sorted(re.search(r"^(\d+) compiled, (\d+) up to date", log, re.M).groups() for log in logs)
    assert summaries == [("0", "3"), ("3", "0")], logs
    lib = hierasparse_gen.load(out)
    assert lib.select("decode", head_dim=64, dtype="float16", cc=(9, 0), group=2).name == \
        "decode_d64_g2_f16_k24_v24_sm90"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_nvcc_failure_names_variant_command_and_error(tmp_path, monkeypatch):
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    broken = (templates / "compress.cu.j2").read_text().replace("namespace {{ namespace }} {",
                                                               "namespace {{ namespace }} { this_is_not_cuda;", 1)
    (templates / "compress.cu.j2").write_text(broken)
    monkeypatch.setenv("HIERASPARSE_TEMPLATES", str(templates))
    with pytest.raises(CompileError) as e:
        build(_write_spec(tmp_path, TINY), out_dir=tmp_path / "out", log=None, jobs=1)
    msg = str(e.value)
    assert "nvcc failed on variant compress_d64_f16_sm90" in msg
    assert "command: " in msg and "-gencode arch=compute_90,code=sm_90" in msg
    assert "this_is_not_cuda" in msg


def test_cli_build_list_clean(tmp_path):
    spec = _write_spec(tmp_path, dict(TINY, name="cli"))
    out = tmp_path / "build"
    run = lambda *a: subprocess.run([sys.executable, "-m", "hierasparse_gen.cli", *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run("build", str(spec), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^3 compiled, 0 up to date", r.stdout, re.M) and "decode_d64_g2_f16_k24_v24_sm90" in r.stdout
    r = run("list", str(out))
    assert r.returncode == 0 and "compress_d64_f16_sm90" in r.stdout and "hsg_compress_d64_f16_sm90_k" in r.stdout
    r = run("clean", str(out))
    assert r.returncode == 0 and not out.exists()


@pytest.mark.parametrize("text,fragment", [
    ("name: x\narchs: [sm_90]\nshapes: [{head_dim: 100, num_qo_heads: 8, num_kv_heads: 8}]\n",
     "shapes[0].head_dim: 100 is not supported"),
    ("name: x\narchs: [sm_90]\nshape: []\n", "did you mean 'shapes'"),
    ("name: x\narchs: [sm_90\n", "line"),
])
def test_cli_rejects_bad_specs_without_traceback(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "hierasparse_gen.cli", "build", str(path), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def _compile_sm90a(src: Path, tmp_path: Path, *flags: str) -> tuple[str, str]:
    """Compile one sm_90a source alone; assert it built with no ptxas serialization message (C751x, C7520:
    every wgmma of the function would wait to completion), no register spills and no trap in the SASS.
    Returns the ptxas log and the SASS."""
    out = tmp_path / (src.stem + ".o")
    proc = subprocess.run(["nvcc", "-std=c++17", "-O3", "-DNDEBUG", "-c", *flags, "-gencode",
                           "arch=compute_90a,code=sm_90a", "-Xptxas", "-v", str(src), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert not re.search(r"C751[0-6]|C7520", log), log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(x == ("0", "0") for x in spills), log
    sass = _sass(out)
    assert "BPT.TRAP" not in sass
    return log, sass
