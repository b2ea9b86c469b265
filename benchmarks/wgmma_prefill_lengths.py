"""Whole-prompt all-2:4 prefill (the sm_90a wgmma kernel where the build has it) beside cuDNN at
lengths of one's choice, e.g. a tail that is not a multiple of 128. Same timing as
`hierasparse-gen bench --prefill` (CUDA-graph medians of 10); Llama-3 shape, fp16, causal.

    python benchmarks/wgmma_prefill_lengths.py BUILD [L ...]     (default 8192 32768 32845)
"""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import hierasparse_gen
from hierasparse_gen.bench import median_us

lib = hierasparse_gen.load(sys.argv[1])
for L in [int(x) for x in sys.argv[2:]] or [8192, 32768, 32768 + 77]:
    B = 1
    q = torch.randn(B, 32, L, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
    v = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    flops = 4 * B * 32 * L * L * 128 / 2
    a = median_us(lambda q: lib.prefill(q, kc, vc), [(q,)], 10)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        c = median_us(lambda q: sdpa(q, k, v, is_causal=True, enable_gqa=True), [(q,)], 10)
    print(f"B={B} L={L}: wgmma {a:.0f} us {flops / a / 1e6:.0f} TFLOP/s, cudnn {c:.0f} us "
          f"{flops / c / 1e6:.0f} -> {c / a:.2f}x", flush=True)
