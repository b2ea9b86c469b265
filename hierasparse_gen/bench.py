"""The benchmarks behind ``hierasparse-gen bench`` (decode, cache ratios, prefill; dense SDPA in the same run)
and the public timing helper they share with ``benchmarks/``: :func:`median_us`.

Times are medians of CUDA-event timings of CUDA-graph replays (no host overhead in the
figure); consecutive calls read different input sets (rotating copies, so the working set
exceeds the L2); inputs are random.
Effective bandwidth counts the bytes each kernel must read and write once: for the
sparse kernel the packed K/V (values + metadata) of the attended tokens plus Q and O.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .errors import HieraSparseError
from .ops.base import DTYPES as _DTYPES

L2_BYTES = 60 << 20


def median_us(fn, sets=((),), iters: int = 30, warmup: int = 3) -> float:
    """Median device time of one ``fn(*args)`` call in microseconds, from CUDA-graph replays.

    ``sets``: the argument tuples, one call each per replay (several sets rotate the inputs so the
    working set stays out of L2; the default calls ``fn()`` once). Each replay of one graph holding
    one call per set is timed with CUDA events and divided by ``len(sets)``; the median of ``iters``
    replays after ``warmup`` eager rounds is returned. Replaying keeps host overhead (Python,
    dispatch, allocation) out of the figure, for this package's kernels and the baselines alike,
    so ``fn`` must be capturable (no host synchronisation, no allocation that outlives the graph).

        us = median_us(lambda q: lib.prefill(q, kc, vc), [(q,)], iters=10)
    """
    for _ in range(warmup):
        for args in sets:
            fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(sets))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 1 GiB copy, timed eagerly
    (a 0.25 ms copy dwarfs launch overhead; a graph-captured memcpy node runs slower)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.fill_(1)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return 2 * x.numel() / statistics.median(times)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def run(q, k, v):
        with sdpa_kernel(backend):
            return sdpa(q, k, v, enable_gqa=True)
    return run


def bench_decode(lib, batches, lengths, dtype=torch.float16, hq=32, hkv=8, d=128, iters=30):
    from torch.nn.attention import SDPBackend
    rows = []
    bw = copy_bandwidth()
    baselines = {"cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION), "flash": _sdpa(SDPBackend.FLASH_ATTENTION)}
    for B in batches:
        for L in lengths:
            dense_bytes = 2 * B * hkv * L * d * 2
            n_sets = max(2, min(8, -(-3 * L2_BYTES // dense_bytes)))
            dense_sets, sparse_sets = [], []
            for _ in range(n_sets):
                k = torch.randn(B, hkv, L, d, device="cuda", dtype=dtype)
                v = torch.randn(B, hkv, L, d, device="cuda", dtype=dtype)
                q = torch.randn(B, hq, d, device="cuda", dtype=dtype)
                kc, vc = lib.compress_k(k), lib.compress_v(v)
                seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
                dense_sets.append((q.unsqueeze(2), k, v))
                sparse_sets.append((q, kc, vc, seqlens))
                del k, v
            ours = median_us(lambda q, kc, vc, s: lib.decode(q, kc, vc, s, check_seqlens=False),
                              sparse_sets, iters)
            base = {}
            for name, fn in baselines.items():
                try:
                    base[name] = median_us(fn, dense_sets, iters)
                except RuntimeError as e:  # a backend that refuses the shape
                    base[name] = float("nan")
                    print(f"  {name} unavailable at B={B} L={L}: {str(e).splitlines()[0]}")
            kc, vc = sparse_sets[0][1], sparse_sets[0][2]
            moved = (kc.nbytes() + vc.nbytes()) * L // kc.capacity + 2 * B * hq * d * 2
            best = min(x for x in base.values() if x == x)
            rows.append(dict(B=B, L=L, ours_us=ours, cudnn_us=base["cudnn"], flash_us=base["flash"],
                             speedup_best=best / ours, speedup_cudnn=base["cudnn"] / ours,
                             tbps=moved / (ours * 1e-6) / 1e12, frac_copy=moved / (ours * 1e-6) / bw,
                             dense_tbps=(dense_bytes + 2 * B * hq * d * 2) / (best * 1e-6) / 1e12))
            del dense_sets, sparse_sets
            torch.cuda.empty_cache()
    return rows, bw


def format_table(rows, bw) -> str:
    lines = [f"copy bandwidth (read+write) measured in this run: {bw / 1e12:.2f} TB/s", "",
             "| B | L | 2:4 decode (us) | cuDNN (us) | flash (us) | speedup vs best dense | vs cuDNN "
             "| 2:4 TB/s | of copy BW | dense best TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['L'] // 1024}K | {r['ours_us']:.1f} | {r['cudnn_us']:.1f} | "
                     f"{r['flash_us']:.1f} | {r['speedup_best']:.2f}x | {r['speedup_cudnn']:.2f}x | "
                     f"{r['tbps']:.2f} | {100 * r['frac_copy']:.0f} % | {r['dense_tbps']:.2f} |")
    return "\n".join(lines)


def bench_cache_ratios(lib, ratios=(0.0, 0.25, 0.5, 0.75, 1.0), B=8, L=32768, hq=32, hkv=8, d=128,
                       dtype=torch.float16, iters=20, storage=("model", "model")):
    """Mixed-tier decode over a HieraCache across key x value ratios, beside cuDNN dense.

    The byte model: time proportional to the bytes of the blocks read (dense 2 bytes an element,
    2:4 1.125; e4m3 ``storage``: 1 and 0.625 plus 2 bytes of scale a token), so the predicted speedup over
    dense decode is dense_bytes / cache_bytes."""
    from torch.nn.attention import SDPBackend
    from .cache import HieraCache
    k = torch.randn(B, hkv, L, d, device="cuda", dtype=dtype)
    v = torch.randn(B, hkv, L, d, device="cuda", dtype=dtype)
    qs = [torch.randn(B, hq, d, device="cuda", dtype=dtype) for _ in range(2)]
    cudnn = median_us(_sdpa(SDPBackend.CUDNN_ATTENTION), [(q.unsqueeze(2), k, v) for q in qs], iters)
    rows = []
    for kr in ratios:
        for vr in ratios:
            caches = []
            for _ in range(2):  # two caches so consecutive calls do not hit L2
                c = HieraCache(lib, batch=B, num_kv_heads=hkv, head_dim=d, max_seq_len=L, key_ratio=kr,
                               value_ratio=vr, dtype=dtype, key_storage=storage[0], value_storage=storage[1])
                c.prefill(k, v)
                caches.append(c)
            us = median_us(lambda q, c: c.attend(q), list(zip(qs, caches)), iters)
            nb = caches[0].nbytes()
            data = nb["total"] - nb["table"]
            rows.append(dict(kr=kr, vr=vr, us=us, speedup=cudnn / us, model=nb["dense_equivalent"] / data,
                             tbps=data / (us * 1e-6) / 1e12))
            del caches
            torch.cuda.empty_cache()
    return rows, cudnn


def prefill_fill_cost(lib, L=32768, hq=32, hkv=8, d=128, dtype=torch.float16, ratio=0.5):
    """Wall time of HieraCache.prefill (scoring, selection, packing) for one prompt vs the
    prompt's causal prefill attention (cuDNN SDPA), in ms."""
    import time
    from torch.nn.attention import SDPBackend
    from .cache import HieraCache
    k = torch.randn(1, hkv, L, d, device="cuda", dtype=dtype)
    v = torch.randn(1, hkv, L, d, device="cuda", dtype=dtype)
    q = torch.randn(1, hq, L, d, device="cuda", dtype=dtype)
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def attn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)
    attn_us = median_us(attn, [(q, k, v)], iters=10)
    cache = HieraCache(lib, batch=1, num_kv_heads=hkv, head_dim=d, max_seq_len=L, key_ratio=ratio,
                       value_ratio=ratio, dtype=dtype)
    times = []
    for i in range(6):
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache.prefill(k, v)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    fill_ms = statistics.median(times[1:]) * 1e3
    return fill_ms, attn_us / 1e3


def bench_prefill(lib, batches=(1, 8), lengths=(8192, 32768), hq=32, hkv=8, d=128, dtype=torch.float16,
                  iters=10):
    """Causal prefill of whole prompts against dense cuDNN and flash SDPA, same inputs, same run:
    all-2:4 K and V (in the model dtype and, on sm_90a, in e4m3), balanced (dense K, 2:4 V), and the
    block-table kernel of HieraCache (compress_then_attend at ratio 1: every block 2:4 but the dense sink and
    window)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from .cache import HieraCache
    from .ops import prefill_cache
    rows = []
    for B in batches:
        for L in lengths:
            q = torch.randn(B, hq, L, d, device="cuda", dtype=dtype)
            k = torch.randn(B, hkv, L, d, device="cuda", dtype=dtype)
            v = torch.randn(B, hkv, L, d, device="cuda", dtype=dtype)
            kc, vc = lib.compress_k(k), lib.compress_v(v)
            seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            flops = 4 * B * hq * L * L * d / 2  # causal, dense-equivalent
            row = dict(B=B, L=L, flops=flops)
            find = dict(head_dim=d, dtype=_DTYPES[dtype], cc=torch.cuda.get_device_capability(), group=hq // hkv)
            # a whole prompt without seqlens: the sm_90a kernels
            if lib.find("prefill", family="wgmma", tier=("sparse24", "sparse24"), **find):
                row["all-2:4 wgmma"] = median_us(lambda q: lib.prefill(q, kc, vc), [(q,)], iters)
                # K and V 2:4 in e4m3: read in q's dtype (the O(L) conversion is timed with the kernel)
                k8, v8 = lib.compress_k(k, storage="float8_e4m3"), lib.compress_v(v, storage="float8_e4m3")
                row["all-2:4 e4m3 wgmma"] = median_us(lambda q: lib.prefill(q, k8, v8), [(q,)], iters)
                del k8, v8
            if lib.find("prefill", family="wgmma", tier=("dense", "sparse24"), **find):
                row["balanced wgmma"] = median_us(lambda q: lib.prefill(q, k, vc), [(q,)], iters)
            row["all-2:4"] = median_us(lambda q: lib.prefill(q, kc, vc, seqlens), [(q,)], iters)
            row["balanced"] = median_us(lambda q: lib.prefill(q, k, vc, seqlens), [(q,)], iters)
            del kc
            cache = HieraCache(lib, batch=B, num_kv_heads=hkv, head_dim=d, max_seq_len=L, key_ratio=1.0,
                               value_ratio=1.0, dtype=dtype)
            cache.prefill(k, v)
            # the prompt as HieraCache.prefill passes it
            if lib.find("prefill", family="wgmma", tier=("mixed", "mixed"), **find):
                row["table wgmma"] = median_us(
                    lambda q: prefill_cache(lib, q, cache, cache.seqlens, seqlens, whole=True), [(q,)], iters)
            row["table"] = median_us(lambda q: prefill_cache(lib, q, cache, cache.seqlens, seqlens, kernel="mma_sp"),
                                      [(q,)], iters)
            del cache
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                def run(q, backend=backend):
                    with sdpa_kernel(backend):
                        return sdpa(q, k, v, is_causal=True, enable_gqa=True)
                row[name] = median_us(run, [(q,)], iters)
            rows.append(row)
            del q, k, v, vc
            torch.cuda.empty_cache()
    return rows


def format_prefill(rows) -> str:
    """Markdown table; "of ceiling": of the measured mma.sp ceiling (961 dense-equivalent TFLOP/s on the
    H200) for the warp-level kernels and SDPA, of the 1979 sparse wgmma peak for the all-2:4 wgmma kernel,
    of 1319 for the balanced one (half its FLOPs at the dense peak of 989: 1 / (0.5 / 989 + 0.5 / 1979)); "table":
    a HieraCache with every eligible block 2:4 (the sink and the window dense), its wgmma kernel against 1979."""
    out = ["| B | S | kernel | us | dense-eq TFLOP/s | of ceiling | vs cuDNN | vs flash |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("all-2:4 wgmma", "all-2:4 e4m3 wgmma", "all-2:4", "balanced wgmma", "balanced", "table wgmma",
                     "table", "cudnn", "flash"):
            if name not in r:
                continue
            tflops = r["flops"] / r[name] / 1e6
            ceiling = {"all-2:4 wgmma": 1979, "all-2:4 e4m3 wgmma": 1979, "balanced wgmma": 1319,
                       "table wgmma": 1979}.get(name, 961)
            out.append(f"| {r['B']} | {r['L'] // 1024}K | {name} | {r[name]:.0f} | {tflops:.0f} | "
                       f"{100 * tflops / ceiling:.0f} % of {ceiling} | {r['cudnn'] / r[name]:.2f}x | "
                       f"{r['flash'] / r[name]:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    import hierasparse_gen
    ap = argparse.ArgumentParser(prog="hierasparse-gen bench", description=__doc__.splitlines()[0])
    ap.add_argument("build", help="build folder (or spec YAML) holding a head_dim-128, group-4 decode")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--length", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cache", action="store_true",
                    help="HieraCache decode across key/value ratios (B=8, L=32K) and the prefill fill cost")
    ap.add_argument("--plot", help="with --cache: write a PNG of speedup against the ratios")
    ap.add_argument("--storage", default="model/model", metavar="K/V",
                    help="with --cache: K's and V's storage, model or float8_e4m3 (e.g. float8_e4m3/float8_e4m3)")
    ap.add_argument("--prefill", action="store_true", help="causal prefill (all-2:4, balanced, block table) against dense SDPA")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("hierasparse-gen bench: error: no CUDA device. Fix: run it on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2
    try:
        lib = hierasparse_gen.load(args.build)
    except HieraSparseError as e:
        print(f"hierasparse-gen bench: error: {e}", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    if args.prefill:
        rows = bench_prefill(lib, dtype=getattr(torch, args.dtype))
        print(format_prefill(rows))
        return 0
    if args.cache:
        storage = tuple(args.storage.split("/"))
        if len(storage) != 2:
            ap.error(f"--storage {args.storage!r}: give K/V, e.g. float8_e4m3/float8_e4m3")
        rows, cudnn = bench_cache_ratios(lib, dtype=getattr(torch, args.dtype), storage=storage)
        print(f"HieraCache decode, B=8, L=32K, sink 64, window 256, block 64, storage K/V {args.storage}; "
              f"cuDNN dense {cudnn:.1f} us")
        print("| key ratio | value ratio | us | speedup vs cuDNN | byte model | measured / model | TB/s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kr']:.2f} | {r['vr']:.2f} | {r['us']:.1f} | {r['speedup']:.2f}x | {r['model']:.2f}x | "
                  f"{r['speedup'] / r['model']:.2f} | {r['tbps']:.2f} |")
        fill_ms, attn_ms = prefill_fill_cost(lib, dtype=getattr(torch, args.dtype))
        print(f"prefill fill (score + select + pack) of a 32K prompt: {fill_ms:.2f} ms; causal prefill "
              f"attention (cuDNN): {attn_ms:.2f} ms; ratio {100 * fill_ms / attn_ms:.1f} %")
        if args.plot:
            _plot(rows, cudnn, args.plot)
        return 0
    rows, bw = bench_decode(lib, args.batch, args.length, getattr(torch, args.dtype), iters=args.iters)
    print(format_table(rows, bw))
    return 0


def _plot(rows, cudnn, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for vr in sorted({r["vr"] for r in rows}):
        sel = [r for r in rows if r["vr"] == vr]
        line, = ax.plot([r["kr"] for r in sel], [r["speedup"] for r in sel], "o-", label=f"value ratio {vr:.2f}")
        ax.plot([r["kr"] for r in sel], [r["model"] for r in sel], "--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("key ratio (fraction of eligible blocks stored 2:4)")
    ax.set_ylabel(f"speedup over cuDNN dense decode ({cudnn:.0f} us)")
    ax.set_title("HieraCache decode, Llama-3 shape, B=8, L=32K, H200 (dashed: byte model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
