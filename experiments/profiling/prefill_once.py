"""One causal prefill launch per kernel (all-2:4, balanced) for a profiler:
ncu ... python experiments/profiling/prefill_once.py BUILD [S]"""
import sys

import torch

import hierasparse_gen

lib = hierasparse_gen.load(sys.argv[1])
L = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
v = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
kc, vc = lib.compress_k(k), lib.compress_v(v)
lib.prefill(q, kc, vc)
lib.prefill(q, k, vc)
torch.cuda.synchronize()
print("done")
