"""One decode call at the Llama-3 shape (default B=8, L=32K) for profilers; FORMAT is the stored K/V:
model (2:4 in the model dtype, the default), e4m3 (2:4 e4m3) or dense-e4m3 (a library with those tiers,
specs/llama3_fp8.yaml).
    ncu --clock-control none -k regex:decode_kernel -s 2 -c 1 python experiments/profiling/profile_decode.py BUILD [B L FORMAT]
"""
import sys

import torch

import hierasparse_gen

lib = hierasparse_gen.load(sys.argv[1])
B, L = int(sys.argv[2]) if len(sys.argv) > 2 else 8, int(sys.argv[3]) if len(sys.argv) > 3 else 32768
fmt = sys.argv[4] if len(sys.argv) > 4 else "model"
store = {"model": {}, "e4m3": {"storage": "float8_e4m3"}, "dense-e4m3": {"storage": "float8_e4m3", "sparse": False}}[fmt]
k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
q = torch.randn(B, 32, 128, device="cuda", dtype=torch.float16)
kc, vc = lib.compress_k(k, **store), lib.compress_v(k, **store)
for _ in range(4):
    out, lse = lib.decode(q, kc, vc, check_seqlens=False)
torch.cuda.synchronize()
print("done", out.float().abs().mean().item())
