"""Drive benchmarks/wgmma_attention_probe.cu (the sm_90a prefill design of docs/hopper.md):
check each stage against torch on the cache's own 2:4 formats, then time it.

    python benchmarks/hopper_probe.py build        # here: nvcc -> generated/hopper-probe/probe.so
    python benchmarks/hopper_probe.py run          # on an H200, with generated/hopper-probe copied there

Stages, in order (a failure names the first layout that is wrong):
  st         S^T = K Q^T of one 64-key x 64-query tile (A: K fragments, B: Q, 128B swizzle)
  ot         O = P V of one 64-key slab (A: V fragments, B: P, 128B swizzle)
  attention  causal attention, 2 heads x 1024 tokens, against the float64 reference
  ws         the warp-specialized kernel (wgmma_attention_ws.cu): GQA 4/2 heads x 1024 tokens,
             then keys growing along the sequence and large scores (the lazy softmax's exact path)
  timing     Llama-3 shape (32/8 heads) x 8K / 32K tokens, dense-equivalent TFLOP/s beside SDPA
             (cuDNN, flash); the first probe runs its 32 heads on 32 KV heads (no GQA)
"""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "generated" / "hopper-probe" / "probe.so"
OUT_WS = REPO / "generated" / "hopper-probe" / "ws.so"
D = 128


# Experiments (benchmarks/wgmma_attention_ws.cu macros): name -> nvcc defines; timed by `variants`
VARIANTS = {"ws": [], "no-exp": ["-DPROBE_NO_EXP"], "no-softmax": ["-DPROBE_NO_SOFTMAX"],
            "pingpong": ["-DPROBE_PINGPONG"]}


def build_variants() -> None:
    for name, defs in VARIANTS.items():
        cmd = ["nvcc", "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90a,code=sm_90a",
               *defs, str(REPO / "benchmarks" / "wgmma_attention_ws.cu"), "-o", str(OUT.parent / f"v-{name}.so")]
        subprocess.run(cmd, check=True)


def variants() -> None:
    """Time each experiment at the Llama-3 shape, 32K (results of the broken-math ones are not checked)."""
    import torch
    sys.path.insert(0, str(REPO))
    from hierasparse_gen import format as fmt
    L, H, Hkv = 32768, 32, 8
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.float16)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.float16)
    v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.float16)
    kv, km = fmt.pack_k(k)
    vv, vm = fmt.pack_v(v)
    out = torch.empty_like(q)
    lse = torch.empty(1, H, L, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    args = (q.data_ptr(), kv.data_ptr(), km.data_ptr(), vv.data_ptr(), vm.data_ptr(), kv[0, 0].numel() // 8,
            km[0, 0].numel() // 2, out.data_ptr(), lse.data_ptr(), H, Hkv, L, 1 / math.sqrt(D), stream)
    flops = 4 * H * L * L * D / 2
    p = ctypes.c_void_p
    names = list(VARIANTS) + (["prev"] if (OUT.parent / "v-prev.so").exists() else [])
    for name in names:
        lib = ctypes.CDLL(str(OUT.parent / f"v-{name}.so"))
        fn = lib.probe_attention_ws
        fn.argtypes = [p] * 5 + [ctypes.c_longlong] * 2 + [p, p] + [ctypes.c_int] * 3 + [ctypes.c_float, p]
        assert fn(*args) == 0
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            fn(*args)
        b.record()
        torch.cuda.synchronize()
        us = a.elapsed_time(b) / 3 * 1e3
        print(f"variant {name:12s} {us:9.0f} us {flops / us / 1e6:6.0f} dense-eq TFLOP/s", flush=True)


def profile() -> None:
    """One launch of the ws kernel at 8K for a profiler."""
    import torch
    sys.path.insert(0, str(REPO))
    from hierasparse_gen import format as fmt
    L, H, Hkv = 8192, 32, 8
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.float16)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.float16)
    v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.float16)
    kv, km = fmt.pack_k(k)
    vv, vm = fmt.pack_v(v)
    out = torch.empty_like(q)
    lse = torch.empty(1, H, L, device="cuda")
    p = ctypes.c_void_p
    fn = ctypes.CDLL(str(OUT_WS)).probe_attention_ws
    fn.argtypes = [p] * 5 + [ctypes.c_longlong] * 2 + [p, p] + [ctypes.c_int] * 3 + [ctypes.c_float, p]
    assert fn(q.data_ptr(), kv.data_ptr(), km.data_ptr(), vv.data_ptr(), vm.data_ptr(), kv[0, 0].numel() // 8,
              km[0, 0].numel() // 2, out.data_ptr(), lse.data_ptr(), H, Hkv, L, 1 / math.sqrt(D),
              torch.cuda.current_stream().cuda_stream) == 0
    torch.cuda.synchronize()


def build() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for src, out in (("wgmma_attention_probe.cu", OUT), ("wgmma_attention_ws.cu", OUT_WS)):
        cmd = ["nvcc", "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode",
               "arch=compute_90a,code=sm_90a", str(REPO / "benchmarks" / src), "-o", str(out)]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


def run() -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from hierasparse_gen import format as fmt
    from hierasparse_gen.reference import prefill_reference

    lib = ctypes.CDLL(str(OUT))
    ws = ctypes.CDLL(str(OUT_WS))
    p = ctypes.c_void_p
    for fn in (ws.probe_attention_ws,):
        fn.argtypes = [p] * 5 + [ctypes.c_longlong] * 2 + [p, p] + [ctypes.c_int] * 3 + [ctypes.c_float, p]
    stream = torch.cuda.current_stream().cuda_stream
    for name, args in (("probe_st", [p] * 5), ("probe_ot", [p] * 5),
                       ("probe_attention", [p] * 5 + [ctypes.c_longlong] * 2 + [p, p, ctypes.c_int, ctypes.c_int,
                                                                               ctypes.c_float, p])):
        getattr(lib, name).argtypes = args
    torch.manual_seed(0)
    dev = dict(device="cuda", dtype=torch.float16)

    def check(code: int, what: str) -> None:
        torch.cuda.synchronize()
        if code:
            raise RuntimeError(f"{what}: cudaError {code}")

    def verdict(stage: str, err: float, scale: float, tol: float) -> None:
        print(f"{stage}: max |err| {err:.3e} of {scale:.2f} -> {'ok' if err <= tol else 'WRONG'}")
        if not err <= tol:  # NaN fails too: stop at the first wrong layout
            sys.exit(f"{stage} is wrong; later stages depend on it")

    # st: S^T of keys 0..63 x queries 0..63
    q = torch.randn(64, D, **dev)
    k = torch.randn(1, 1, 64, D, **dev)
    kv, km = fmt.pack_k(k)
    st = torch.full((64, 64), float("nan"), device="cuda")
    check(lib.probe_st(q.data_ptr(), kv.data_ptr(), km.data_ptr(), st.data_ptr(), stream), "probe_st")
    want = fmt.prune_k(k)[0, 0].float() @ q.float().T
    verdict("st", (st - want).abs().max().item(), want.abs().max().item(), 1e-2)

    # ot: O = P V for the first 64 tokens
    v = torch.randn(1, 1, 64, D, **dev)
    vv, vm = fmt.pack_v(v)
    pm = torch.rand(64, 64, **dev)
    o = torch.full((64, D), float("nan"), device="cuda")
    check(lib.probe_ot(pm.data_ptr(), vv.data_ptr(), vm.data_ptr(), o.data_ptr(), stream), "probe_ot")
    want = pm.float() @ fmt.prune_v(v)[0, 0].float()
    verdict("ot", (o - want).abs().max().item(), want.abs().max().item(), 1e-2)

    def attention(H: int, L: int):
        q = torch.randn(1, H, L, D, **dev)
        k = torch.randn(1, H, L, D, **dev)
        v = torch.randn(1, H, L, D, **dev)
        kv, km = fmt.pack_k(k)
        vv, vm = fmt.pack_v(v)
        out = torch.full((1, H, L, D), float("nan"), **dev)
        lse = torch.full((1, H, L), float("nan"), device="cuda")
        args = (q.data_ptr(), kv.data_ptr(), km.data_ptr(), vv.data_ptr(), vm.data_ptr(), kv[0, 0].numel() // 8,
                km[0, 0].numel() // 2, out.data_ptr(), lse.data_ptr(), H, L, 1 / math.sqrt(D), stream)
        return q, k, v, out, lse, args

    q, k, v, out, lse, args = attention(2, 1024)
    check(lib.probe_attention(*args), "probe_attention")
    ref, ref_lse = prefill_reference(q, fmt.prune_k(k), fmt.prune_v(v))
    verdict("attention out", (out.double() - ref).abs().max().item(), ref.abs().max().item(), 3e-3)
    verdict("attention lse", (lse.double() - ref_lse).abs().max().item(), ref_lse.abs().max().item(), 1e-3)

    def attention_gqa(H: int, Hkv: int, L: int, k_ramp: float = 0.0, q_gain: float = 1.0):
        q = torch.randn(1, H, L, D, **dev) * q_gain
        k = torch.randn(1, Hkv, L, D, **dev)
        if k_ramp:
            k = k * (1 + k_ramp * torch.arange(L, device="cuda").view(1, 1, L, 1) / L).half()
        v = torch.randn(1, Hkv, L, D, **dev)
        kv, km = fmt.pack_k(k)
        vv, vm = fmt.pack_v(v)
        out = torch.full((1, H, L, D), float("nan"), **dev)
        lse = torch.full((1, H, L), float("nan"), device="cuda")
        args = (q.data_ptr(), kv.data_ptr(), km.data_ptr(), vv.data_ptr(), vm.data_ptr(), kv[0, 0].numel() // 8,
                km[0, 0].numel() // 2, out.data_ptr(), lse.data_ptr(), H, Hkv, L, 1 / math.sqrt(D), stream)
        return q, k, v, out, lse, args, (kv, km, vv, vm)

    for name, shape in (("ws", dict(H=4, Hkv=2, L=1024)), ("ws 4K", dict(H=2, Hkv=1, L=4096)),
                        ("ws growing keys", dict(H=2, Hkv=1, L=2048, k_ramp=3.0)),
                        ("ws large scores", dict(H=2, Hkv=1, L=1024, q_gain=4.0))):
        for kname, fn in (("", ws.probe_attention_ws),):
            q, k, v, out, lse, args, _ = attention_gqa(**shape)
            check(fn(*args), name + kname)
            ref, ref_lse = prefill_reference(q, fmt.prune_k(k), fmt.prune_v(v))
            verdict(f"{name}{kname} out", (out.double() - ref).abs().max().item(), ref.abs().max().item(), 3e-3)
            verdict(f"{name}{kname} lse", (lse.double() - ref_lse).abs().max().item(), ref_lse.abs().max().item(),
                    2e-3)

    def time_us(fn) -> float:
        fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(5):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 5 * 1e3

    from torch.nn.attention import SDPBackend, sdpa_kernel
    first = "--all" in sys.argv
    for B, L in ((1, 8192), (1, 32768), (8, 32768)):
        H, Hkv = 32 * B, 8 * B  # batch b's heads are heads b*32.. (b*8.. for K/V): the same work as [B, 32, L, D]
        flops = 4 * H * L * L * D / 2
        q, k, v, out, lse, args, _ = attention_gqa(H, Hkv, L)
        rows = {"ws (all-2:4)": time_us(lambda: ws.probe_attention_ws(*args))}
        if first and B == 1:
            *_, args1 = attention(H, L)
            rows["probe (all-2:4)"] = time_us(lambda: lib.probe_attention(*args1))
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    rows[name] = time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q.view(B, 32, L, D), k.view(B, 8, L, D), v.view(B, 8, L, D), is_causal=True,
                        enable_gqa=True))
            except RuntimeError as e:
                print(f"timing: {name} unavailable ({str(e).splitlines()[0]})")
        for name, us in rows.items():
            vs = f" ({rows['cudnn'] / us:.2f}x cuDNN)" if "cudnn" in rows else ""
            print(f"timing B={B} H=32/8 L={L}: {name:16s} {us:9.0f} us {flops / us / 1e6:6.0f} dense-eq TFLOP/s"
                  f" {flops / us / 1e6 / 1979:5.1%} of 1979{vs}")


if __name__ == "__main__":
    {"build": build, "run": run, "build-variants": build_variants, "variants": variants, "profile": profile}[sys.argv[1] if len(sys.argv) > 1 else "run"]()
