"""Where a CTA of the sm_90a prefill kernel spends its time, and the SM clock it runs at.

Renders the library's all-2:4 fp16 sm_90a prefill variant of specs/llama3.yaml (or the balanced one) with
timestamps added: every CTA writes %globaltimer (ns) at fixed points -- entry, after the barrier-init
__syncthreads, the producer's first copy, each consumer warpgroup before and after its Q load, when slab 0's
stage is ready, at the end of its slab loop, after its epilogue -- plus %smid and clock64 at entry and at
the end, into a device array that `hsg_read_times` copies out. The kernel's work is unchanged.

    python experiments/cta_timeline/cta_timeline.py render timeline.cu [--balanced] [--spec specs/llama3.yaml]
        (here, with the package installed; then build it as in experiments/prefill_sm90_edits/
        wgmma_prefill_variants.py: nvcc ... -shared timeline.cu -o timeline.so)
    python experiments/cta_timeline/cta_timeline.py run timeline.so [--shapes 1x8192,1x32768,8x32768]   (on an H200)

`run` prints, per shape, the mean time of each point from CTA entry, the share of a CTA's time outside the
slab loop, the clock (clock64 ticks / globaltimer ns of warpgroup 0), and how long SMs sat idle between CTAs
and at the end of the grid. Each point is a text anchor in the rendered source: a template change that
moves one makes `render` fail (tests/test_experiments.py renders and compiles it, under `--experiments`).
"""
import argparse
import ctypes
import math
from pathlib import Path

MAX_CTAS = 70000  # 8 x 32 heads x 256 query blocks of 128 at 32K fit

# Slots of a CTA's row of 16 u64: 0 smid, 1 entry, 2 after __syncthreads, 3/4 Q load start (WG 0/1), 5/6 Q in
# shared memory, 7/8 slab 0's stage ready, 9/10 slab loop end, 11/12 epilogue end, 13 producer's first copy,
# 14/15 clock64 at entry / at WG 0's end.
PROLOGUE = r"""
__device__ unsigned long long hsg_times[%d][16];
__device__ __forceinline__ unsigned long long hsg_now() {
  unsigned long long t;
  asm volatile("mov.u64 %%0, %%globaltimer;" : "=l"(t));
  return t;
}
// the CTA's row, recomputed at each stamp: a register held across the slab loop made the balanced kernel spill
__device__ __forceinline__ int hsg_cta() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }
__device__ __forceinline__ unsigned hsg_smid() {
  unsigned s;
  asm volatile("mov.u32 %%0, %%smid;" : "=r"(s));
  return s;
}
""" % MAX_CTAS


def _insert(src: str, anchor: str, text: str, after: bool = True) -> str:
    """text placed after (or before) the one occurrence of anchor."""
    assert src.count(anchor) == 1, f"anchor not found once in the rendered kernel: {anchor!r}"
    return src.replace(anchor, anchor + text if after else text + anchor)


def instrument(src: str, namespace: str) -> str:
    stamp = lambda slot: f"if (tid == 0) hsg_times[hsg_cta()][{slot}] = hsg_now();\n"
    src = _insert(src, "template <bool kTail>\n__global__", PROLOGUE, after=False)
    src = _insert(src, "  extern __shared__ unsigned char raw[];\n",
                  "  if (threadIdx.x == 0) hsg_times[hsg_cta()][0] = hsg_smid(), hsg_times[hsg_cta()][1] = hsg_now(),"
                  " hsg_times[hsg_cta()][14] = clock64();\n")
    src = _insert(src, "  __syncthreads();\n\n  if (warp >= kConsumers * 4) {",
                  "  if (threadIdx.x == 0) hsg_times[hsg_cta()][2] = hsg_now();\n", after=False)
    src = _insert(src, "        if (chunks) {\n", "        if (j == 0) hsg_times[hsg_cta()][13] = hsg_now();\n",
                  after=False)
    load_q = "  load_q(sm.q[wg], "
    src = _insert(src, load_q, "  " + stamp("3 + wg"), after=False)
    q_done = "  async_proxy_fence();\n  named_barrier(bar, 128);\n"
    i = src.index(load_q)
    j = src.index(q_done, i) + len(q_done)
    src = src[:j] + "  " + stamp("5 + wg") + src[j:]
    src = _insert(src, "  mbar_wait(&sm.full[0], 0);\n", "  " + stamp("7 + wg"))
    # the loop end goes to shared memory first: a global store there (its address held live into the epilogue)
    # made the balanced kernel spill
    src = _insert(src, "  const long long row0 =", "  __shared__ unsigned long long hsg_loop_end[2];\n"
                  "  if (tid == 0) hsg_loop_end[wg] = hsg_now();\n", after=False)
    call = src.index("  epilogue(o, l, m, w, g, qq")
    end = src.index("\n", call) + 1
    src = src[:end] + ("  if (tid == 0) {\n    hsg_times[hsg_cta()][11 + wg] = hsg_now();\n"
                       "    hsg_times[hsg_cta()][9 + wg] = hsg_loop_end[wg];\n"
                       "    if (wg == 0) hsg_times[hsg_cta()][15] = clock64();\n  }\n") + src[end:]
    return src + f"""
HSG_EXPORT int hsg_read_times(void* dst, int ctas) {{
  return cudaMemcpyFromSymbol(dst, {namespace}::hsg_times, (size_t)ctas * 16 * sizeof(unsigned long long));
}}
"""


def render(balanced: bool, spec_path: Path = Path("specs/llama3.yaml")) -> tuple[str, str]:
    """The instrumented source of the spec's fp16 sm_90a prefill variant (all-2:4, or balanced) and its C
    entry point."""
    from hierasparse_gen.render import render as render_variant
    from hierasparse_gen.spec import load_spec
    from hierasparse_gen.variants import expand
    spec = load_spec(spec_path)
    variant = next(v for v in expand(spec) if v.wgmma and v.dtype == "float16"
                   and (v.tier.k == "dense") == balanced)
    return instrument(render_variant(variant, spec), f"{variant.name}_impl"), variant.symbol


def run(lib_path: Path, shapes: list[tuple[int, int]]) -> None:
    import torch
    from hierasparse_gen import format as fmt
    lib = ctypes.CDLL(str(lib_path.resolve()))
    symbol = next(s for s in ("hsg_prefill_d128_g4_f16_k24_v24_wg_sm90a", "hsg_prefill_d128_g4_f16_kd_v24_wg_sm90a")
                  if hasattr(lib, s))
    dense_k = "_kd_" in symbol
    fn = getattr(lib, symbol)
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    fn.argtypes = [p, i64, i64, i64] + ([p, i64, i64, i64, i32, p, p] if dense_k else [p, p, p, p]) + \
        [i32] * 5 + [ctypes.c_float, p, p, p]
    fn.restype = i32
    H, HKV, D = 32, 8, 128
    for B, L in shapes:
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16)
        v = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.float16)
        (kv, km), (vv, vm) = fmt.pack_k(k), fmt.pack_v(v)
        out = torch.full_like(q, float("nan"))
        lse = torch.empty(B, H, L, device="cuda")
        k_args = (k.data_ptr(), *k.stride()[:3], L) if dense_k else (kv.data_ptr(), km.data_ptr())
        for _ in range(3):  # the last call's stamps are read
            rc = fn(q.data_ptr(), *q.stride()[:3], *k_args, vv.data_ptr(), vm.data_ptr(), kv.shape[2], B, H, HKV, L,
                    1 / math.sqrt(D), out.data_ptr(), lse.data_ptr(), torch.cuda.current_stream().cuda_stream)
            assert rc == 0, f"cudaError {rc}"
        torch.cuda.synchronize()
        assert not out.isnan().any()
        ctas = (L + 127) // 128 * H * B
        assert ctas <= MAX_CTAS, f"{ctas} CTAs: raise MAX_CTAS"
        t = torch.zeros(ctas, 16, dtype=torch.int64)
        assert lib.hsg_read_times(ctypes.c_void_p(t.data_ptr()), ctas) == 0
        t = t.double()
        entry = t[:, 1]
        end = torch.maximum(t[:, 11], t[:, 12])
        us = lambda x: x.mean().item() / 1e3
        loop = torch.maximum(t[:, 9], t[:, 10]) - torch.minimum(t[:, 7], t[:, 8])
        outside = 1 - loop.sum().item() / (end - entry).sum().item()
        mhz = ((t[:, 15] - t[:, 14]) / (t[:, 11] - entry)).mean().item() * 1e3
        span = end.max().item() - entry.min().item()
        sms = int(t[:, 0].max().item()) + 1
        gaps, last = 0.0, []
        for s in range(sms):  # idle time between consecutive CTAs of an SM, and when each SM ran out of CTAs
            mine = (t[:, 0] == s).nonzero().flatten()
            order = entry[mine].argsort()
            e, x = entry[mine][order], end[mine][order]
            gaps += (e[1:] - x[:-1]).clamp(min=0).sum().item()
            last.append(x[-1].item())
        tail = end.max().item() - sum(last) / len(last)
        print(f"{symbol} B={B} L={L}: means over {ctas} CTAs, us from CTA entry:\n"
              f"  barrier init done {us(t[:, 2] - entry):.2f}; producer's first copy {us(t[:, 13] - entry):.2f}\n"
              f"  Q load start {us(t[:, 3] - entry):.2f} / {us(t[:, 4] - entry):.2f}, Q in shared memory "
              f"{us(t[:, 5] - entry):.2f} / {us(t[:, 6] - entry):.2f}, slab 0 ready {us(t[:, 7] - entry):.2f} / "
              f"{us(t[:, 8] - entry):.2f} (warpgroup 0 / 1)\n"
              f"  slab loop {us(t[:, 9] - t[:, 7]):.1f} / {us(t[:, 10] - t[:, 8]):.1f}; epilogue "
              f"{us(t[:, 11] - t[:, 9]):.2f} / {us(t[:, 12] - t[:, 10]):.2f}\n"
              f"  outside the slab loop {outside * 100:.1f} % of a CTA; SM clock {mhz:.0f} MHz; SMs idle between CTAs "
              f"{gaps / (sms * span) * 100:.2f} %, at the end of the grid {tail / span * 100:.2f} %", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write the instrumented source")
    r.add_argument("out", type=Path)
    r.add_argument("--balanced", action="store_true", help="the dense-K (balanced) variant")
    r.add_argument("--spec", type=Path, default=Path("specs/llama3.yaml"), help="the spec whose variant is rendered")
    g = sub.add_parser("run", help="run a build of it and print the timeline (GPU)")
    g.add_argument("lib", type=Path)
    g.add_argument("--shapes", default="1x8192,1x32768,8x32768")
    a = ap.parse_args()
    if a.cmd == "render":
        a.out.write_text(render(a.balanced, a.spec)[0])
    else:
        run(a.lib, [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")])
