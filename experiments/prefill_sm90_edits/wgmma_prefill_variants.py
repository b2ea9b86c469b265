"""Side-by-side timing of experiment builds of the sm_90a prefill kernel (same C entry point), beside cuDNN.

An experiment is the rendered source of one variant (`generated/<build>/src/prefill_..._wg_sm90a.cu`) with one
change, compiled on its own into a shared library with the library's flags, e.g.

    nvcc -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \\
         -shared -Xcompiler -fPIC -cudart static -I<cutlass include> exp.cu -o exp.so

    python experiments/prefill_sm90_edits/wgmma_prefill_variants.py SYMBOL base.so exp.so base.so ...   (on an H200)

SYMBOL is the entry point (`hsg_prefill_d128_g4_f16_k24_v24_wg_sm90a`, or the `_kd_` balanced one, which
takes dense K). Llama-3 shape, fp16, causal; shapes BxL from $SHAPES (any L; default 1x32768,8x32768).
Same timing as `hierasparse-gen bench --prefill` (CUDA-graph medians of 10). Each build's output is compared
with the first build's (max |difference|): an experiment that changes the math shows up there. Builds that
change the math on purpose (diagnostics: exponentials removed and the like) need TIMING_ONLY=1, which lets
their NaN outputs through. Builds listed in $CORE_LAYOUT (comma-separated, as given on the command line) get
the 2:4 values in the core-matrix layout (experiments/n128_prefill/core_layout.py), for experiments that read
them by descriptor (experiments/n128_prefill/wgmma_n128_prefill.cu.j2). Run with the package installed.
"""
import ctypes
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from hierasparse_gen import format as fmt
from hierasparse_gen.bench import median_us


def _core_layout():
    """experiments/n128_prefill/core_layout.py, loaded from its file (the experiments are not a package)."""
    path = Path(__file__).resolve().parent.parent / "n128_prefill" / "core_layout.py"
    spec = importlib.util.spec_from_file_location("core_layout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


symbol, builds = sys.argv[1], sys.argv[2:]
core_layout = {Path(b).resolve() for b in os.environ.get("CORE_LAYOUT", "").split(",") if b}
dense_k = "_kd_" in symbol
H, HKV, D = 32, 8, 128
p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
tail = [i32] * 5 + [ctypes.c_float, p, p, p]  # capacity, batch, Hq, Hkv, queries, scale, out, lse, stream
argtypes = [p, i64, i64, i64] + ([p, i64, i64, i64, i32, p, p] if dense_k else [p, p, p, p]) + tail

for B, L in (tuple(map(int, s.split("x"))) for s in os.environ.get("SHAPES", "1x32768,8x32768").split(",")):
    q = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16)
    (kv, km), (vv, vm) = fmt.pack_k(k), fmt.pack_v(v)
    if core_layout:
        cl = _core_layout()
        kc, vc = cl.k_core_matrices(kv, km), cl.v_core_matrices(vv, vm)
    else:
        kc, vc = None, None
    flops = 4 * B * H * L * L * D / 2
    first = None
    for path in builds:
        fn = getattr(ctypes.CDLL(str(Path(path).resolve())), symbol)
        fn.argtypes, fn.restype = argtypes, i32
        out = torch.full_like(q, float("nan"))
        lse = torch.full((B, H, L), float("nan"), device="cuda")

        core = Path(path).resolve() in core_layout
        k_vals, v_vals = (kc, vc) if core else (kv, vv)

        def call(q):
            k_args = (k.data_ptr(), *k.stride()[:3], L) if dense_k else (k_vals.data_ptr(), km.data_ptr())
            rc = fn(q.data_ptr(), *q.stride()[:3], *k_args, v_vals.data_ptr(), vm.data_ptr(), kv.shape[2], B, H, HKV, L,
                    1 / math.sqrt(D), out.data_ptr(), lse.data_ptr(), torch.cuda.current_stream().cuda_stream)
            assert rc == 0, f"{path}: cudaError {rc}"
        call(q)
        torch.cuda.synchronize()
        # TIMING_ONLY=1: builds that change the math on purpose (diagnostics) may leave NaN
        assert os.environ.get("TIMING_ONLY") or not out.isnan().any(), f"{path}: unwritten or NaN output"
        first = out.clone() if first is None else first
        diff = (out.float() - first.float()).abs().max().item()
        us = median_us(call, [(q,)], 10)
        print(f"B={B} L={L} {Path(path).name:16s} {us:9.0f} us {flops / us / 1e6:5.0f} dense-eq TFLOP/s  "
              f"max |out - first build's| {diff:.1e}", flush=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        us = median_us(lambda q: sdpa(q, k, v, is_causal=True, enable_gqa=True), [(q,)], 10)
    print(f"B={B} L={L} {'cudnn':16s} {us:9.0f} us {flops / us / 1e6:5.0f} dense-eq TFLOP/s", flush=True)
