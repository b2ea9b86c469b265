"""The sm_90a block-table prefill kernel beside the warp-level one, on the same HieraCache (H200 figures:
benchmarks/RESULTS.md): compress_then_attend chunks after cached tokens, and balanced whole prompts (the prompt's
dense K rows, V through its table). Llama-3 shape, fp16, every eligible block 2:4, CUDA-graph medians of 10;
dense-equivalent TFLOP/s = 4 B H n D (cached + (n + 1) / 2) / time.

    python benchmarks/table_prefill.py [BUILD]      (default generated/llama3)
"""
import sys

import torch

import hierasparse_gen
from hierasparse_gen.bench import median_us
from hierasparse_gen.cache import HieraCache
from hierasparse_gen.ops import prefill_cache

H, HKV, D = 32, 8, 128


def _cache(lib, B, cached, n):
    cache = HieraCache(lib, batch=B, num_kv_heads=HKV, head_dim=D, max_seq_len=cached + n, key_ratio=1.0,
                       value_ratio=1.0, dtype=torch.float16)
    k = torch.randn(B, HKV, cached + n, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    return cache, k, v


def _row(label, flops, run):
    """Time run(q) on the wgmma kernel and on the warp-level one; their outputs' max |difference|."""
    wg, warp = run(wgmma=True), run(wgmma=False)
    diff = (wg[0].float() - warp[0].float()).abs().max().item()
    t_wg = median_us(lambda: run(wgmma=True), [()], 10)
    t_warp = median_us(lambda: run(wgmma=False), [()], 10)
    print(f"{label}: wgmma table {flops / t_wg / 1e6:.0f} ({t_wg:.0f} us), warp-level {flops / t_warp / 1e6:.0f} "
          f"({t_warp:.0f} us); max |diff| {diff:.1e}", flush=True)


def chunks(lib):
    for B, cached, n in ((1, 24576, 8192), (8, 24576, 8192), (1, 30000, 2768), (4, 8292, 4096)):
        cache, k, v = _cache(lib, B, cached, n)
        cache.prefill(k[:, :, :cached], v[:, :, :cached])
        cache.prefill(k[:, :, cached:], v[:, :, cached:])
        q = torch.randn(B, H, n, D, device="cuda", dtype=torch.float16)
        qlens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        _row(f"chunk B={B} cached={cached} n={n}", 4 * B * H * n * D * (cached + (n + 1) / 2),
             lambda wgmma: prefill_cache(lib, q, cache, cache.seqlens, qlens, kernel="wgmma" if wgmma else "mma_sp"))
        del cache, k, v, q
        torch.cuda.empty_cache()


def balanced(lib):
    for B, L in ((1, 32768), (8, 32768)):
        cache, k, v = _cache(lib, B, 0, L)
        cache.prefill(k, v)
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
        qlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        zero = torch.zeros_like(qlens)
        _row(f"balanced B={B} L={L}", 4 * B * H * L * L * D / 2,
             lambda wgmma: prefill_cache(lib, q, cache, cache.seqlens, qlens, k_tail=k, tail_start=zero,
                                         kernel="wgmma" if wgmma else "mma_sp", whole=wgmma))
        del cache, k, v, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("table_prefill.py: no CUDA device")
    library = hierasparse_gen.load(sys.argv[1] if len(sys.argv) > 1 else "generated/llama3")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    chunks(library)
    balanced(library)
