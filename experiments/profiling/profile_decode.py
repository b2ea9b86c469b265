"""One decode call at the Llama-3 shape (B=8, L=32K) for profilers:
    ncu --clock-control none -k regex:decode_kernel -s 2 -c 1 python experiments/profiling/profile_decode.py BUILD
"""
import sys

import torch

import hierasparse_gen

lib = hierasparse_gen.load(sys.argv[1])
B, L = int(sys.argv[2]) if len(sys.argv) > 2 else 8, int(sys.argv[3]) if len(sys.argv) > 3 else 32768
k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
q = torch.randn(B, 32, 128, device="cuda", dtype=torch.float16)
kc, vc = lib.compress_k(k), lib.compress_v(k)
for _ in range(4):
    out, lse = lib.decode(q, kc, vc, check_seqlens=False)
torch.cuda.synchronize()
print("done", out.float().abs().mean().item())
